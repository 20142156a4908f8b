//! The Linux boot protocol end to end.
//!
//! Here (any KVM): the test guest packaged as a bzImage boots through exactly the
//! path a Linux kernel takes and reports what it found (e820, command line, initrd,
//! processors and its balloon from ACPI); the in-kernel irqchip, PIT and irqfds are
//! created and a balloon interrupt raised by the device reaches the LAPIC; a Linux
//! kernel is refused up front on a PVM host. The balloon tests of balloon.rs also
//! run through this path (`bzimage::*`).
//!
//! On a host with VMX/SVM only: Debian's cloud kernel and the initramfs of
//! `images/build-linux.sh` boot, load the virtio modules, and follow the balloon
//! the host inflates and deflates. On a PVM host that test says loudly that it
//! cannot run and why (docs/linux.md).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_kvm, run_one, temp_file};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use serde_json::Value;
use vmm::api::{server, Request};
use vmm::config::{Kernel, VmConfig};
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use vmm::devices::virtio::{GuestErrors, Interrupt, INT_CONFIG};
use vmm::linux::irqchip::{self, lapic_reg, set_lapic_reg};
use vmm::linux::platform::{host_backend, BALLOON_GSI};
use vmm::memory::{GuestRam, HostPages};
use vmm::vm::{Ending, Vm};
use vmm::x86::Backend;

const MIB: u64 = 1 << 20;

fn backend() -> Backend {
    require_kvm();
    host_backend(&kvm_ioctls::Kvm::new().unwrap()).unwrap()
}

/// The test guest's bzImage, written to a file (so the file path is tested too).
fn bzimage_file(name: &str) -> PathBuf {
    let image = vmm::linux::guest_image::bzimage(vmm::loader::BUILTIN_GUEST).unwrap();
    temp_file(name, &image)
}

#[test]
fn the_test_guest_boots_as_a_bzimage_through_the_linux_protocol() {
    let initrd: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut c = common::guest("bz", 128 * MIB, "alloc 16M unique; touch 8M; verify; exit 3");
    c.kernel = Kernel::Path(bzimage_file("guest.bzImage"));
    c.initrd = Some(temp_file("guest.initrd", &initrd));
    c.cmdline = Some("quiet".into());
    c.vcpus = 2;
    let run = run_one(c);
    assert_eq!(run.exit_code(0), 3);
    let lines = run.json(0);
    let boot = lines.iter().find(|l| l["event"] == "linux-boot").expect("a linux-boot line");
    assert_eq!(boot["e820"], 3, "RAM below 640K, the reserved legacy area, RAM from 1 MiB: {boot}");
    assert_eq!(boot["cpus"], 2, "two local APICs in the MADT: {boot}");
    assert_eq!((boot["virtio_mmio"].as_u64(), boot["balloon_gsi"].as_u64()), (Some(1), Some(BALLOON_GSI as u64)));
    assert_eq!(boot["initrd_bytes"], initrd.len() as u64);
    assert_eq!(boot["initrd_fnv"], guest_abi::linux::fnv1a64(&initrd), "the guest read the initrd intact");
    let info = lines.iter().find(|l| l["event"] == "boot").expect("a boot line");
    assert!(info["balloon"].as_u64().is_some(), "the balloon found through ACPI was driven: {info}");
    assert_eq!(info["vcpus"], 2);
    let backend = run.report.vms[0].backend;
    assert_eq!(info["backend"], serde_json::to_value(backend).unwrap(), "vmm.backend on the command line");
    // Both vCPUs found their index in CPUID (a wrong APIC ID would start two BSPs).
    let verify = lines.iter().find(|l| l["op"] == "verify").unwrap();
    assert_eq!((verify["pages"].as_u64(), verify["bad"].as_u64()), (Some(4096), Some(0)));
}

#[test]
fn a_workload_too_long_for_the_bzimage_command_line_is_refused() {
    let mut c = common::guest("long", 64 * MIB, "exit 0");
    c.kernel = Kernel::BuiltinBzImage;
    c.cmdline = Some("x".repeat(guest_abi::linux::TEST_GUEST_CMDLINE_MAX));
    let err = vmm::host::create_all(&[c], Instant::now()).err().expect("refused");
    assert!(err.contains("the command line is") && err.contains("at most"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn irqchip_pit_and_irqfds_are_created_and_a_balloon_interrupt_reaches_the_lapic() {
    const VECTOR: usize = 0x35;
    require_kvm();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    irqchip::create(&vm).unwrap();
    assert!(vm.create_irq_chip().is_err(), "the irqchip exists already");
    assert!(vm.create_pit2(Default::default()).is_err(), "the PIT exists already");
    let vcpu = vm.create_vcpu(0).unwrap();
    irqchip::set_lints(&vcpu).unwrap();
    let mut lapic = vcpu.get_lapic().unwrap();
    assert_eq!(lapic_reg(&lapic.regs, 0x350) & 0x700, 0x700, "LINT0 = ExtINT");
    assert_eq!(lapic_reg(&lapic.regs, 0x360) & 0x700, 0x400, "LINT1 = NMI");
    // What the guest's drivers would do: enable the LAPIC (spurious vector
    // register) and route IOAPIC pin 5 to VECTOR, edge, unmasked, to APIC 0.
    set_lapic_reg(&mut lapic.regs, 0xf0, 0x1ff);
    vcpu.set_lapic(&lapic).unwrap();
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: the chip is the IOAPIC (chip_id), so `ioapic` is the union's member.
    unsafe { chip.chip.ioapic.redirtbl[BALLOON_GSI as usize].bits = VECTOR as u64 };
    vm.set_irqchip(&chip).unwrap();

    // The balloon wired as Vm::create wires it for a Linux guest.
    let irq = irqchip::irqfd(&vm, BALLOON_GSI).unwrap();
    let interrupt = Arc::new(Interrupt::with_irqfd(irq));
    let ram = Arc::new(GuestRam::new(64 * MIB, HostPages::Small).unwrap());
    let errors = Arc::new(GuestErrors::default());
    let mut balloon = Balloon::new(
        "t/balloon",
        BalloonConfig::default(),
        ram,
        interrupt.clone(),
        errors,
        Arc::new(AtomicU32::new(0)),
    );
    let irr = |vcpu: &kvm_ioctls::VcpuFd| {
        let regs = vcpu.get_lapic().unwrap().regs;
        lapic_reg(&regs, 0x200 + VECTOR / 32 * 0x10) & (1 << (VECTOR % 32)) != 0
    };
    assert!(!irr(&vcpu), "nothing pending before the device raises it");
    balloon.set_target(16 * MIB).unwrap();
    assert_ne!(interrupt.status() & INT_CONFIG, 0, "InterruptStatus says: configuration changed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !irr(&vcpu) {
        assert!(Instant::now() < deadline, "the irqfd never set IRR bit {VECTOR:#x}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A bzImage that says it is Linux: the test guest's, with Debian's version string.
fn linux_looking_bzimage() -> Vec<u8> {
    let mut image = vmm::linux::guest_image::bzimage(vmm::loader::BUILTIN_GUEST).unwrap();
    let at = 0x200 + u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize;
    let version = b"6.1.0-48-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
    image[at..at + version.len()].copy_from_slice(version);
    image
}

#[test]
fn a_linux_kernel_is_refused_up_front_on_a_pvm_host() {
    let mut c = VmConfig::new("linux", 256 * MIB);
    c.kernel = Kernel::Path(temp_file("linux.bzImage", &linux_looking_bzimage()));
    let created = vmm::host::create_all(&[c], Instant::now());
    match backend() {
        Backend::Pvm => {
            let err = created.err().expect("refused");
            assert!(
                err.contains("cannot boot a Linux kernel here") && err.contains("PVM backend (no VMX/SVM)"),
                "{err}"
            );
            assert!(err.contains("instruction emulator") && !err.contains('\n'), "{err}");
        }
        // With VMX/SVM it is a Linux guest like any other: created with its irqchip.
        Backend::Hardware => assert!(created.is_ok(), "{:?}", created.err()),
    }
}

/// images/ of the repository.
fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

/// Waits for a console line `{"linux":step,...}` of `vm` and returns it.
fn wait_linux_step(vm: &Vm, step: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let lines = common::parse_lines(&vm.console().lines());
        if let Some(l) = lines.iter().find(|l| l["linux"] == step) {
            return l.clone();
        }
        if let Some(l) = lines.iter().find(|l| l["linux"] == "error") {
            panic!("the guest failed: {l}\n{}", vm.console().lines().join("\n"));
        }
        assert!(vm.ending().is_none(), "ended: {:?}\n{}", vm.ending(), vm.console().lines().join("\n"));
        assert!(Instant::now() < deadline, "no {step:?} within {limit:?}:\n{}", vm.console().lines().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `req` to the control API's handler for `vm` (what `vmm ctl` reaches).
fn api(vm: &Vm, req: Request) -> Value {
    let resp = server::handle(req, &server::Targets { vms: vec![vm.shared().clone()], tps: None });
    assert!(resp.ok, "{:?}", resp.error);
    resp.result.expect("a result")
}

#[test]
fn a_debian_kernel_boots_and_follows_the_balloon_on_hosts_with_vmx_or_svm() {
    if backend() == Backend::Pvm {
        eprintln!(
            "\n==================== NOT RUN HERE ====================\n\
             a_debian_kernel_boots_and_follows_the_balloon_on_hosts_with_vmx_or_svm:\n\
             this host's /dev/kvm is the PVM backend (no VMX/SVM). Debian's kernel starts\n\
             with real-mode and decompressor code that PVM runs in KVM's instruction\n\
             emulator (~0.5 M instructions/s): booting would take hours. The VMM refuses\n\
             it up front (a_linux_kernel_is_refused_up_front_on_a_pvm_host). Everything\n\
             else of the Linux path ran here through the test guest's bzImage. This test\n\
             runs on hosts with VMX or SVM (see docs/linux.md).\n\
             ======================================================\n"
        );
        return;
    }
    let dir = images_dir();
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    if !kernel.exists() || !initrd.exists() {
        let status = std::process::Command::new("bash").arg(dir.join("build-linux.sh")).status().unwrap();
        assert!(status.success(), "images/build-linux.sh failed (it needs apt-get update once)");
    }
    let mut c = VmConfig::new("debian", 256 * MIB);
    c.kernel = Kernel::Path(kernel);
    c.initrd = Some(initrd);
    c.workload = String::new();
    // MemTotal follows the balloon only without deflate-on-OOM (Linux's driver).
    c.balloon = Some(BalloonConfig { deflate_on_oom: false, ..BalloonConfig::default() });
    let vm = common::start(c);
    let ready = wait_linux_step(&vm, "ready", Duration::from_secs(120));
    assert_eq!(ready["driver"], "virtio_balloon", "{ready}");
    api(&vm, Request::BalloonSet { size: "64M".into(), vm: None });
    wait_linux_step(&vm, "inflated", Duration::from_secs(60));
    let snap = vm.balloon().unwrap().lock().unwrap().snapshot();
    assert_eq!(snap.actual_pages, 64 * MIB / 4096, "{snap:?}");
    wait_linux_step(&vm, "allocated", Duration::from_secs(60));
    let stats = api(&vm, Request::BalloonStats { vm: None });
    assert!(!stats["debian"]["guest_stats"].is_null(), "Linux sent memory statistics: {stats}");
    api(&vm, Request::BalloonSet { size: "0".into(), vm: None });
    wait_linux_step(&vm, "deflated", Duration::from_secs(60));
    assert_eq!(vm.wait(Duration::from_secs(60)), Some(Ending::GuestExit(0)), "{}", vm.console().lines().join("\n"));
}

#[test]
fn kvm_holds_each_vcpus_own_cpuid_table() {
    require_kvm();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    for cpu in 0..3 {
        let vcpu = vm.create_vcpu(cpu as u64).unwrap();
        vcpu.set_cpuid2(&vmm::x86::cpuid::for_vcpu(&supported, cpu, 3, true)).unwrap();
        let back = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        assert_eq!(vmm::x86::cpuid::apic_id(&back), Some(cpu));
        let topo = back.as_slice().iter().find(|e| e.function == 0xb && e.index == 1).map(|e| (e.ebx, e.edx));
        assert!(topo.is_none() || topo == Some((3, cpu)), "leaf 0xB: {topo:?}");
    }
}
