//! The free-memory policy of the vmm: when the host runs short of memory, how much
//! to take back from which VM, and with which mechanism.
//!
//! Pure logic, no KVM and no threads: once per tick the VMM samples host memory
//! (a [`HostMemSource`]) and each VM's memory and balloon device ([`VmMemInfo`]),
//! calls [`Policy::tick`], and applies the [`Decision`]: balloon targets through
//! the balloon devices, evictions through each VM's swapper, pauses. With the
//! balloon alone the policy balloons; with swappers it also swaps and pauses.
//! See `docs/policy.md` for the states, the amounts and the rules.
//!
//! | module | what |
//! |---|---|
//! | [`state`] | ESX free-memory states and the hysteresis between them |
//! | [`decide`] | the per-tick decision, one [`VmPlan`] per VM built in small steps |
//! | [`allocation`] | min / max / shares: each VM's target when memory is overcommitted |
//! | [`active`] | a VM's active memory estimate from sampling periods (slow, fast, current) |
//! | [`revocation`] | who gives: min-funding revocation with the idle memory tax |
//! | [`vm`] | one VM as the policy sees it at a tick (memory, balloon device, swapper) |
//! | [`host_mem`] | host memory figures: `/proc/meminfo`, a memory cgroup, a budget |
//! | [`config`] | thresholds, amounts, caps |
//! | [`stats`] | counters and the history of state changes |

pub mod active;
pub mod allocation;
pub mod config;
pub mod decide;
pub mod host_mem;
pub mod revocation;
pub mod state;
pub mod stats;
pub mod vm;

pub use active::ActiveEstimate;
pub use allocation::{Claimant, Shares, SharesError};
pub use config::{check_tax, PolicyConfig, TaxError};
pub use decide::{Decision, Policy, VmPlan};
pub use host_mem::{Budget, Cgroup, HostMem, HostMemError, HostMemSource, MemInfo};
pub use state::FreeState;
pub use stats::{PolicyStats, StateChange};
pub use vm::{BalloonInfo, VmMemInfo};
