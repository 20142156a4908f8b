//! Per-vCPU CPUID: what KVM supports, with each vCPU's own APIC ID and the topology
//! of the VM.
//!
//! KVM reports one table for the host (`KVM_GET_SUPPORTED_CPUID`, which already
//! holds KVM's paravirtual leaves `0x40000000..`: kvmclock and friends); the VMM must
//! give each vCPU its identity. The initial APIC ID (leaf 1 `EBX[31:24]`, and the
//! x2APIC ID in `EDX` of leaves 0xB and 0x1F) is the vCPU index, as the MADT says.
//! Linux takes CPU numbers from these. The topology is one package of `vcpus` cores
//! with one thread each. The hypervisor bit is set, and TSC-deadline where KVM
//! emulates it; the invariant-TSC bit (leaf 0x80000007) and KVM's own leaves stay as
//! KVM reports them.
//!
//! Seen on KVM's PVM backend: a guest's `cpuid` leaf 1 returns the host CPU's
//! initial APIC ID, not this table's (a test guest pinned to host CPU 0 read 0, on
//! host CPU 1 it read another value), so a guest there cannot learn its index from
//! CPUID; KVM still holds the table (`KVM_GET_CPUID2`), and VMX/SVM hosts use it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 `ECX`: TSC-deadline timer mode of the local APIC.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 `ECX`: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 `EDX`: `EBX[23:16]` is valid (more than one logical processor).
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB/0x1F level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPUID of vCPU `cpu` of `vcpus`, from KVM's `supported` table;
/// `tsc_deadline`: KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
pub fn for_vcpu(supported: &CpuId, cpu: u32, vcpus: u32, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    // Bits of the APIC ID that number the cores.
    let core_bits = vcpus.next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (cpu << 24) | (vcpus.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads per cache - 1.
                e.eax = (e.eax & 0x3fff) | ((vcpus.next_power_of_two() - 1) << 26);
            }
            0xb | 0x1f => topology_level(e, cpu, vcpus, core_bits),
            _ => {}
        }
    }
    cpuid
}

/// One sub-leaf of the extended topology leaves.
fn topology_level(e: &mut kvm_cpuid_entry2, cpu: u32, vcpus: u32, core_bits: u32) {
    e.edx = cpu;
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = LEVEL_SMT << 8;
        }
        1 => {
            e.eax = core_bits;
            e.ebx = vcpus;
            e.ecx = (LEVEL_CORE << 8) | 1;
        }
        n => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = n;
        }
    }
}

/// The initial APIC ID a table gives (leaf 1 `EBX[31:24]`).
pub fn apic_id(cpuid: &CpuId) -> Option<u32> {
    cpuid.as_slice().iter().find(|e| e.function == 1).map(|e| e.ebx >> 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0xaabb_ccdd, edx: 1 << 28, ..Default::default() }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[entry(0, 0), entry(1, 0), entry(4, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_the_topology() {
        let base = table();
        for cpu in 0..4 {
            let c = for_vcpu(&base, cpu, 4, true);
            assert_eq!(apic_id(&c), Some(cpu));
            let leaf1 = c.as_slice()[1];
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
            assert_eq!(leaf1.ebx & 0xffff, 0xccdd, "the rest of EBX is KVM's");
            assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
            let b: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0xb).collect();
            assert!(b.iter().all(|e| e.edx == cpu), "x2APIC ID in every sub-leaf");
            assert_eq!((b[0].ebx, b[0].ecx), (1, 0x100));
            assert_eq!((b[1].eax, b[1].ebx, b[1].ecx), (2, 4, 0x201));
            assert_eq!((b[2].ebx, b[2].ecx), (0, 2), "the list ends");
            assert_eq!(c.as_slice()[2].eax >> 26, 3, "4 cores per package");
        }
        let one = for_vcpu(&base, 0, 1, false);
        assert_eq!(one.as_slice()[1].edx & EDX_HTT, 0);
        assert_eq!(one.as_slice()[1].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(base.as_slice()[1].ebx, 0xaabb_ccdd, "the supported table is left alone");
    }
}
