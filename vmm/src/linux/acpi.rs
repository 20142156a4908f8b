//! ACPI tables for guests booted through the Linux boot protocol, built with the
//! rust-vmm `acpi_tables` crate: RSDP, XSDT, FADT, MADT and DSDT.
//!
//! Why ACPI: Debian's kernels are built without `VIRTIO_MMIO_CMDLINE_DEVICES`, so
//! their `virtio_mmio` driver only binds devices that ACPI (or a device tree)
//! describes, as `_HID "LNRO0005"` devices. The same tables tell a guest its
//! processors (MADT, one local APIC per vCPU, APIC ID = vCPU index) and its legacy
//! devices: COM1 (`PNP0501`, IRQ 4) and the i8042 controller (`PNP0303`, IRQ 1),
//! whose reset line ends the VM on `reboot`.
//!
//! The FADT is hardware-reduced (no PM timer, no SCI, no fixed-feature registers):
//! the platform has no ACPI power-management hardware, as Firecracker's has none.
//! Tables lie from [`super::ACPI_GPA`] (the RSDP first, where a BIOS would leave
//! it) in the reserved legacy area below 1 MiB, each 16-byte aligned.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::irqchip::{I8042_GSI, IOAPIC_GPA, LAPIC_GPA, SERIAL_GSI};
use super::LinuxBootError;

const OEM_ID: [u8; 6] = *b"VMMRCL";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: no VGA, no MSI, ASPM unsupported; the i8042 is
/// there (Linux reads bit 1 to decide whether to probe it).
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4);
/// MADT flag: the platform has dual 8259 PICs too (`PCAT_COMPAT`).
const MADT_PCAT_COMPAT: u32 = 1;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// GPA of its 4 KiB register window.
    pub base: u64,
    /// Its GSI (edge-triggered, active high).
    pub gsi: u32,
}

/// The tables, each with the GPA it is written at.
pub struct Tables {
    /// (GPA, bytes), RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// GPA of the RSDP (for the zero page's `acpi_rsdp_addr`).
    pub fn rsdp(&self) -> u64 {
        self.blobs[0].0
    }

    /// GPA just past the last table.
    pub fn end(&self) -> u64 {
        self.blobs.iter().map(|(gpa, b)| gpa + b.len() as u64).max().unwrap_or(0)
    }
}

/// Builds the tables for `vcpus` processors and `devices`, laid out from `base` and
/// ending at or below `limit`.
pub fn build(base: u64, limit: u64, vcpus: u32, devices: &[VirtioMmio]) -> Result<Tables, LinuxBootError> {
    let dsdt = dsdt(devices)?;
    let madt = madt(vcpus)?;
    // Layout: RSDP, XSDT (3 entries), FADT, MADT, DSDT.
    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_gpa = base;
    let xsdt_gpa = align(rsdp_gpa + Rsdp::len() as u64);
    let xsdt_len = 36 + 3 * 8;
    let fadt_gpa = align(xsdt_gpa + xsdt_len);
    let madt_gpa = align(fadt_gpa + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_gpa = align(madt_gpa + madt.len() as u64);
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VMMFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .dsdt_64(dsdt_gpa);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let fadt = bytes(&fadt.finalize());
    let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", OEM_REVISION);
    for gpa in [fadt_gpa, madt_gpa, dsdt_gpa] {
        xsdt.add_entry(gpa);
    }
    let tables = Tables {
        blobs: vec![
            (rsdp_gpa, bytes(&Rsdp::new(OEM_ID, xsdt_gpa))),
            (xsdt_gpa, bytes(&xsdt)),
            (fadt_gpa, fadt),
            (madt_gpa, madt),
            (dsdt_gpa, dsdt),
        ],
    };
    if tables.end() > limit {
        return Err(LinuxBootError::AcpiTooLarge { bytes: tables.end() - base, room: limit - base });
    }
    Ok(tables)
}

/// The bytes of a table.
fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// One local APIC per vCPU (APIC ID and processor UID = vCPU index), one I/O APIC.
fn madt(vcpus: u32) -> Result<Vec<u8>, LinuxBootError> {
    let mut madt = MADT::new(OEM_ID, *b"VMMMADT ", OEM_REVISION, LocalInterruptController::Address(LAPIC_GPA));
    for cpu in 0..vcpus {
        let id = u8::try_from(cpu).map_err(|_| LinuxBootError::TooManyCpus(vcpus))?;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_GPA, 0));
    let mut bytes = bytes(&madt);
    // Flags at offset 40 (the crate leaves them 0): PCAT_COMPAT, then re-checksum.
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    Ok(bytes)
}

/// Sets the checksum byte (offset 9) so that the table sums to zero.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// COM1, the i8042 and the virtio-mmio devices, in `\_SB`.
fn dsdt(devices: &[VirtioMmio]) -> Result<Vec<u8>, LinuxBootError> {
    let mut body = Vec::new();
    let (io, irq) = (aml::IO::new(0x3f8, 0x3f8, 0, 8), aml::Interrupt::new(true, true, false, false, SERIAL_GSI));
    device("_SB_.COM1", &aml::EISAName::new("PNP0501"), 0, &[&io, &irq], false, &mut body);
    let (data, cmd) = (aml::IO::new(0x60, 0x60, 1, 1), aml::IO::new(0x64, 0x64, 1, 1));
    let irq = aml::Interrupt::new(true, true, false, false, I8042_GSI);
    device("_SB_.PS2_", &aml::EISAName::new("PNP0303"), 0, &[&data, &cmd, &irq], false, &mut body);
    for (i, dev) in devices.iter().enumerate() {
        let base = u32::try_from(dev.base).map_err(|_| LinuxBootError::DeviceAbove4G(dev.base))?;
        let window = aml::Memory32Fixed::new(true, base, 0x1000);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let hid = guest_abi::linux::VIRTIO_MMIO_HID;
        device(&format!("_SB_.VR{i:02X}"), &hid, i as u32, &[&window, &irq], true, &mut body);
    }
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMMDSDT ", OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// Appends `Device (path) { _HID, _UID, [_CCA = 1,] _CRS }` to `sink`; `coherent`:
/// the device does cache-coherent DMA (`_CCA`), as virtio devices do.
fn device(path: &str, hid: &dyn Aml, uid: u32, resources: &[&dyn Aml], coherent: bool, sink: &mut Vec<u8>) {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let (hid, uid) = (aml::Name::new("_HID".into(), hid), aml::Name::new("_UID".into(), &uid));
    let (cca, crs) = (aml::Name::new("_CCA".into(), &aml::ONE), aml::Name::new("_CRS".into(), &crs));
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    if coherent {
        children.push(&cca);
    }
    children.push(&crs);
    aml::Device::new(path.into(), children).to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use guest_abi::linux::acpi as read;
    use guest_abi::linux::aml as read_aml;

    use super::*;

    fn tables(vcpus: u32) -> Tables {
        let devs = [VirtioMmio { base: 0xd000_0000, gsi: 5 }, VirtioMmio { base: 0xd000_1000, gsi: 6 }];
        build(0xe_0000, 0x10_0000, vcpus, &devs).unwrap()
    }

    fn find(t: &Tables, gpa: u64) -> &[u8] {
        &t.blobs.iter().find(|(g, _)| *g == gpa).expect("a table at that address").1
    }

    #[test]
    fn every_checksum_holds_and_every_length_is_exact() {
        let t = tables(4);
        let rsdp = &t.blobs[0].1;
        assert_eq!(rsdp.len(), read::RSDP_LEN);
        let xsdt_gpa = read::rsdp_xsdt(rsdp).unwrap();
        let xsdt = find(&t, xsdt_gpa);
        read::check_table(xsdt, b"XSDT").unwrap();
        let sigs: Vec<[u8; 4]> = read::xsdt_entries(xsdt).map(|g| find(&t, g)[..4].try_into().unwrap()).collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"DSDT"]);
        for gpa in read::xsdt_entries(xsdt) {
            let table = find(&t, gpa);
            read::check_table(table, &table[..4].try_into().unwrap()).unwrap();
            assert_eq!(gpa % 16, 0);
        }
        assert!(t.end() <= 0x10_0000);
        // Any flipped byte breaks a checksum.
        let mut broken = find(&t, xsdt_gpa).to_vec();
        broken[40] ^= 1;
        assert!(read::check_table(&broken, b"XSDT").is_err());
    }

    #[test]
    fn the_fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let t = tables(1);
        let fadt = &t.blobs[2].1;
        assert_eq!(&fadt[..4], b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes(fadt[109..111].try_into().unwrap()), IAPC_BOOT_ARCH);
        assert_eq!(read::fadt_dsdt(fadt), Some(t.blobs[4].0));
    }

    #[test]
    fn the_madt_lists_one_local_apic_per_vcpu_and_the_io_apic() {
        let t = tables(3);
        let madt = &t.blobs[3].1;
        assert_eq!(u32::from_le_bytes(madt[36..40].try_into().unwrap()), LAPIC_GPA);
        assert_eq!(u32::from_le_bytes(madt[40..44].try_into().unwrap()), MADT_PCAT_COMPAT);
        assert_eq!(read::madt_apic_ids(madt).collect::<Vec<_>>(), [0, 1, 2]);
        // The I/O APIC entry: type 1, length 12, at 0xfec00000, GSI base 0.
        let io = &madt[madt.len() - 12..];
        assert_eq!((io[0], io[1]), (read::MADT_IO_APIC, 12));
        assert_eq!(u32::from_le_bytes(io[4..8].try_into().unwrap()), IOAPIC_GPA);
        assert!(build(0xe_0000, 0x10_0000, 300, &[]).is_err(), "APIC IDs are 8 bits here");
    }

    #[test]
    fn the_dsdt_describes_com1_the_i8042_and_each_virtio_mmio_device() {
        let t = tables(1);
        let dsdt = &t.blobs[4].1;
        let mut devices = Vec::new();
        assert!(read_aml::devices(&dsdt[read::HEADER_LEN..], |d| devices.push(d)), "the reader understood all of it");
        let hids: Vec<String> =
            devices.iter().map(|d| String::from_utf8_lossy(&d.hid).trim_end_matches('\0').to_string()).collect();
        assert_eq!(hids, ["PNP0501", "PNP0303", "LNRO0005", "LNRO0005"]);
        assert_eq!(devices[0].interrupt, Some(SERIAL_GSI));
        assert_eq!(devices[1].interrupt, Some(I8042_GSI));
        assert_eq!((devices[2].memory, devices[2].interrupt), (Some((0xd000_0000, 0x1000)), Some(5)));
        assert_eq!((devices[3].memory, devices[3].interrupt), (Some((0xd000_1000, 0x1000)), Some(6)));
        assert_eq!(&devices[3].name, b"VR01");
        // The raw AML of the first virtio device, as ASL `Name (_HID, "LNRO0005")`.
        let needle = [&[0x08u8][..], b"_HID", &[0x0d], b"LNRO0005", &[0]].concat();
        assert!(dsdt.windows(needle.len()).any(|w| w == needle));
    }
}
