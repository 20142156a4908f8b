//! The columns of `vmm top`, named as ESX's `esxtop` names them, and how each is
//! read from two samples: one table for the screen and the batch CSV.

use crate::sample::{HostSample, VmSample};

/// A column of the per-VM table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// Configured guest RAM.
    Memsz,
    /// Resident guest RAM.
    Grant,
    /// The policy's target for resident memory.
    Sztgt,
    /// Active memory estimate.
    Tchd,
    /// Balloon size.
    Mctlsz,
    /// Balloon target.
    Mctltgt,
    /// Balloon maximum.
    Mctlmax,
    /// Swapped now.
    Swcur,
    /// Swap target.
    Swtgt,
    /// Swap-in rate.
    SwrRate,
    /// Swap-out rate.
    SwwRate,
    /// Shared memory.
    Shrd,
    /// Zero pages.
    Zero,
    /// Saved by sharing.
    Shrdsvd,
}

impl Column {
    /// Every column, in display order.
    pub const ALL: [Column; 14] = [
        Column::Memsz,
        Column::Grant,
        Column::Sztgt,
        Column::Tchd,
        Column::Mctlsz,
        Column::Mctltgt,
        Column::Mctlmax,
        Column::Swcur,
        Column::Swtgt,
        Column::SwrRate,
        Column::SwwRate,
        Column::Shrd,
        Column::Zero,
        Column::Shrdsvd,
    ];

    /// ESX's name of the column.
    pub fn name(self) -> &'static str {
        match self {
            Column::Memsz => "MEMSZ",
            Column::Grant => "GRANT",
            Column::Sztgt => "SZTGT",
            Column::Tchd => "TCHD",
            Column::Mctlsz => "MCTLSZ",
            Column::Mctltgt => "MCTLTGT",
            Column::Mctlmax => "MCTLMAX",
            Column::Swcur => "SWCUR",
            Column::Swtgt => "SWTGT",
            Column::SwrRate => "SWR/s",
            Column::SwwRate => "SWW/s",
            Column::Shrd => "SHRD",
            Column::Zero => "ZERO",
            Column::Shrdsvd => "SHRDSVD",
        }
    }

    /// The column whose name is `name` (any case).
    pub fn parse(name: &str) -> Option<Column> {
        Column::ALL.into_iter().find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// The value of this column for `vm` (MiB, or MiB/s for rates), `None` where the
    /// data does not exist. `prev` is the same VM one refresh earlier, `dt_s` the
    /// seconds between the two.
    pub fn value(self, vm: &VmSample, prev: Option<&VmSample>, dt_s: f64) -> Option<f64> {
        let rate = |f: fn(&VmSample) -> Option<f64>| {
            let (now, before) = (f(vm)?, f(prev?)?);
            (dt_s > 0.0).then(|| (now - before).max(0.0) / dt_s)
        };
        match self {
            Column::Memsz => Some(vm.memsz_mib),
            Column::Grant => Some(vm.resident_mib),
            Column::Sztgt => vm.target_mib,
            Column::Tchd => vm.active_mib,
            Column::Mctlsz => vm.balloon_mib,
            Column::Mctltgt => vm.balloon_target_mib,
            Column::Mctlmax => vm.balloon_max_mib,
            Column::Swcur => vm.swapped_mib,
            Column::Swtgt => vm.swap_target_mib,
            Column::SwrRate => rate(|v| v.swap_read_mib),
            Column::SwwRate => rate(|v| v.swap_written_mib),
            Column::Shrd => vm.shared_mib,
            Column::Zero => vm.zero_mib,
            Column::Shrdsvd => vm.saved_mib,
        }
    }
}

/// The header line of a host sample: the state, free memory and the tax (esxtop's
/// "MEM overcommit" lines), and page sharing's host-wide figures.
pub fn header(s: &HostSample) -> Vec<String> {
    let policy = match &s.policy {
        Some(p) => format!(
            "state {}  free {:.1} of {:.1} MiB ({:.2}%)  tax {:.2}",
            p.state, p.free_mib, p.total_mib, p.free_pct, p.idle_tax
        ),
        None => "state -  (free-memory policy off)".to_string(),
    };
    let sharing = match &s.sharing {
        Some(t) => format!(
            "SHRD {:.2}  ZERO {:.2}  SHRDSVD {:.2} MiB (all VMs; passes {})",
            t.shared_mib, t.zero_mib, t.saved_mib, t.full_passes
        ),
        None => "page sharing off".to_string(),
    };
    vec![format!("MEM {policy}  guest {:.1} MiB  VMs {}", s.guest_mib, s.vms.len()), sharing]
}
