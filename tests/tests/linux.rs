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

use common::{require_kvm, run_one, temp_file, Running};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use serde_json::Value;
use vmm::api::{server, Reply, Request};
use vmm::config::{Kernel, VmConfig};
use vmm::devices::guest_errors::GuestErrors;
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use vmm::devices::virtio::{Interrupt, INT_CONFIG};
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
    let err = common::create(&[c]).err().expect("refused");
    assert!(err.contains("the command line is") && err.contains("at most"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

/// The vector the balloon's GSI is routed to in the interrupt tests.
const VECTOR: u64 = 0x35;

/// A VM with KVM's irqchip and PIT, as a Linux guest gets them.
fn vm_with_irqchip() -> (kvm_ioctls::Kvm, kvm_ioctls::VmFd) {
    require_kvm();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    irqchip::create(&vm).unwrap();
    (kvm, vm)
}

/// What a guest's drivers would do: enable `vcpu`'s LAPIC (spurious vector
/// register) and route IOAPIC pin [`BALLOON_GSI`] to [`VECTOR`], edge, unmasked, to
/// APIC 0.
fn route_balloon_gsi(vm: &kvm_ioctls::VmFd, vcpu: &kvm_ioctls::VcpuFd) {
    let mut lapic = vcpu.get_lapic().unwrap();
    set_lapic_reg(&mut lapic.regs, 0xf0, 0x1ff);
    vcpu.set_lapic(&lapic).unwrap();
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: the chip is the IOAPIC (chip_id), so `ioapic` is the union's member.
    unsafe { chip.chip.ioapic.redirtbl[BALLOON_GSI as usize].bits = VECTOR };
    vm.set_irqchip(&chip).unwrap();
}

#[test]
fn irqchip_pit_and_irqfds_are_created_and_a_balloon_interrupt_reaches_the_lapic() {
    let (_kvm, vm) = vm_with_irqchip();
    assert!(vm.create_irq_chip().is_err(), "the irqchip exists already");
    assert!(vm.create_pit2(Default::default()).is_err(), "the PIT exists already");
    let vcpu = vm.create_vcpu(0).unwrap();
    irqchip::set_lints(&vcpu).unwrap();
    let lapic = vcpu.get_lapic().unwrap();
    assert_eq!(lapic_reg(&lapic.regs, 0x350) & 0x700, 0x700, "LINT0 = ExtINT");
    assert_eq!(lapic_reg(&lapic.regs, 0x360) & 0x700, 0x400, "LINT1 = NMI");
    route_balloon_gsi(&vm, &vcpu);

    // The balloon wired as Vm::create wires it for a Linux guest.
    let irq = irqchip::irqfd(&vm, BALLOON_GSI).unwrap();
    let interrupt = Arc::new(Interrupt::with_irqfd(irq));
    let ram = Arc::new(GuestRam::new(64 * MIB, HostPages::Small).unwrap());
    let errors = Arc::new(GuestErrors::new("t/balloon"));
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
        lapic_reg(&regs, 0x200 + VECTOR as usize / 32 * 0x10) & (1 << (VECTOR % 32)) != 0
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
    let created = common::create(&[c]);
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
        let lines = common::json_objects(&vm.console().lines());
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
fn api(vm: &Running, req: Request) -> Reply {
    let resp = server::handle(req, vm.host().shared());
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
    let Reply::BalloonStats(stats) = api(&vm, Request::BalloonStats { vm: None }) else { panic!("balloon stats") };
    assert!(!stats["debian"].guest_stats.is_empty(), "Linux sent memory statistics: {stats:?}");
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

/// A hand-assembled guest, loaded at 1 MiB (`as --64`, then `objcopy -O binary`):
///
/// ```text
/// start:  lea rax, [rip + idtr]; lidt [rax]
///         mov byte ptr [0x8000], 1        ; PVM VIF.if = 1 (plain memory on VMX)
///         sti                             ; IF = 1 on VMX/SVM
///         mov byte ptr [0x102000], 1      ; ready
///         rdtsc; shl rdx, 32; or rax, rdx; mov rcx, rax
///         mov r8, [0x102008]              ; deadline in TSC ticks
/// spin:   cmp byte ptr [0x8001], 0        ; VIF.pending?
///         je 1f
///         inc qword ptr [0x102010]        ; count it, and `out 0x80` as PVM asks
///         out 0x80, al
/// 1:      pause
///         rdtsc; shl rdx, 32; or rax, rdx; sub rax, rcx; cmp rax, r8; jb spin
///         mov eax, 0x99; mov dx, 0x501; out dx, eax; hlt   ; deadline: no interrupt
/// .balign 16
/// handler: mov eax, 0x42; mov dx, 0x501; out dx, eax; hlt  ; +0x70, vector 0x35
/// .balign 16
/// idtr:   .word 4095; .quad 0x101000
/// ```
const IRQ_GUEST: [u8; 138] = [
    0x48, 0x8d, 0x05, 0x79, 0x00, 0x00, 0x00, 0x0f, 0x01, 0x18, 0xc6, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0x01, 0xfb,
    0xc6, 0x04, 0x25, 0x00, 0x20, 0x10, 0x00, 0x01, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x89,
    0xc1, 0x4c, 0x8b, 0x04, 0x25, 0x08, 0x20, 0x10, 0x00, 0x80, 0x3c, 0x25, 0x01, 0x80, 0x00, 0x00, 0x00, 0x74, 0x0a,
    0x48, 0xff, 0x04, 0x25, 0x10, 0x20, 0x10, 0x00, 0xe6, 0x80, 0xf3, 0x90, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48,
    0x09, 0xd0, 0x48, 0x29, 0xc8, 0x4c, 0x39, 0xc0, 0x72, 0xd9, 0xb8, 0x99, 0x00, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05,
    0xef, 0xf4, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x1f, 0x40, 0x00, 0xb8, 0x42,
    0x00, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef, 0xf4, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0xff, 0x0f, 0x00, 0x10, 0x10,
    0x00, 0x00, 0x00, 0x00, 0x00,
];

/// Delivery of a balloon interrupt into a running guest through the in-kernel
/// irqchip, on the host's backend: the device raises its irqfd, KVM's IOAPIC and
/// LAPIC route it, and the guest's IDT handler runs. On PVM, with the guest's
/// interrupt flag in its VIF area, this works, and KVM_RUN returns
/// KVM_EXIT_SHUTDOWN once before the handler runs (seen on every run, also for the
/// first `int3`: the guest resumes correctly when entered again). The test guest
/// keeps polling (docs/linux.md); this is what a Linux guest relies on.
#[test]
fn a_balloon_interrupt_is_delivered_into_a_running_guest() {
    use vm_memory::{Bytes, GuestAddress};
    let (kvm, vm) = vm_with_irqchip();
    let ram = Arc::new(GuestRam::new(32 * MIB, HostPages::Small).unwrap());
    let vm = Arc::new(vm);
    // SAFETY: `ram` outlives the VM fd and the slots (declared after it, dropped first).
    let _slots = unsafe { vmm::memory::slots::MemorySlots::register(vm.clone(), &ram) }.unwrap();
    let mem = ram.mem();
    mem.write_slice(&IRQ_GUEST, GuestAddress(0x10_0000)).unwrap();
    let handler = 0x10_0070u64;
    let gate: u128 = (handler & 0xffff) as u128
        | (0x10u128 << 16)
        | (0x8eu128 << 40)
        | (((handler >> 16) & 0xffff) as u128) << 48
        | ((handler >> 32) as u128) << 64;
    mem.write_obj(gate, GuestAddress(0x10_1000 + VECTOR * 16)).unwrap();
    vmm::x86::regs::write_gdt(mem).unwrap();
    let cr3 = vmm::x86::paging::build_identity_map(mem, 32 * MIB).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap()).unwrap();
    let tsc_khz = vcpu.get_tsc_khz().unwrap() as u64;
    mem.write_obj(tsc_khz * 2000, GuestAddress(0x10_2008)).unwrap();
    let backend = Backend::detect(&vcpu);
    if backend == Backend::Pvm {
        vmm::x86::pvm::register_vif(&vcpu, 0x8000).unwrap();
    }
    let sregs = vcpu.get_sregs().unwrap();
    vcpu.set_sregs(&vmm::x86::regs::long_mode_sregs(sregs, cr3)).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x10_0000, rsp: 0x10_4000, rflags: 2, ..Default::default() }).unwrap();
    irqchip::set_lints(&vcpu).unwrap();
    route_balloon_gsi(&vm, &vcpu);
    let interrupt = Arc::new(Interrupt::with_irqfd(irqchip::irqfd(&vm, BALLOON_GSI).unwrap()));
    let runner = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        let mut exits = Vec::new();
        loop {
            match vcpu.run() {
                Ok(kvm_ioctls::VcpuExit::IoOut(0x501, data)) => return (data[0], exits),
                Ok(other) => exits.push(format!("{other:?}")),
                Err(e) => exits.push(format!("error {e}")),
            }
            if exits.len() > 100 {
                return (0, exits);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while mem.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap() != 1 {
        assert!(Instant::now() < deadline, "the guest never flagged itself ready");
        std::thread::sleep(Duration::from_millis(1));
    }
    interrupt.raise(INT_CONFIG);
    let (code, exits) = runner.join().unwrap();
    let pending_seen: u64 = mem.read_obj(GuestAddress(0x10_2010)).unwrap();
    let vif: [u8; 2] = mem.read_obj(GuestAddress(0x8000)).unwrap();
    eprintln!("{backend:?}: exit code {code:#x}, VIF.pending seen {pending_seen} times, VIF if/pending {vif:?}, other exits {exits:?}");
    assert_eq!(code, 0x42, "the handler of vector {VECTOR:#x} ran (0x99: the deadline passed without it)");
    let allowed_shutdowns = if backend == Backend::Pvm { 1 } else { 0 };
    assert!(exits.iter().all(|e| e == "Shutdown") && exits.len() <= allowed_shutdowns, "{exits:?}");
    if backend == Backend::Pvm {
        assert_eq!(vif[0], 0, "delivering the interrupt cleared VIF.if, as it clears IF");
    }
}

#[test]
fn reboot_through_the_i8042_and_the_exit_register_end_the_vm() {
    require_kvm();
    let config = |name: &str| {
        let mut c = VmConfig::new(name, 64 * MIB);
        c.kernel = Kernel::BuiltinBzImage;
        c
    };
    let host = common::create(&[config("reboot"), config("exit")]).unwrap();
    let vms = host.vms();
    // What Linux's `reboot=k` does: CPU reset (0xfe) on the i8042's command port.
    let mut status = [0xffu8];
    vms[0].shared().pio().read(0x64, &mut status);
    assert_eq!(status[0] & 2, 0, "input buffer empty: Linux's kbd_wait finishes at once");
    vms[0].shared().pio().write(0x64, &[0xfe]);
    assert_eq!(vms[0].ending(), Some(Ending::GuestExit(0)));
    // What `busybox devmem 0xd0100000 32 42` does.
    let exit_register = vmm::devices::legacy::EXIT_MMIO_GPA;
    assert!(vms[1].shared().mmio().write(exit_register, &42u32.to_le_bytes()));
    assert_eq!(vms[1].ending(), Some(Ending::GuestExit(42)));
    // The CMOS clock answers in BCD, 24-hour mode.
    let mut reg_b = [0u8];
    vms[1].shared().pio().write(0x70, &[0x0b]);
    vms[1].shared().pio().read(0x71, &mut reg_b);
    assert_eq!(reg_b[0], 0x02);
}
