//! What every reclaimer of guest memory shares.
//!
//! Page sharing (`tps`), the host swapper (`swapd`) and the active-memory sampler of
//! the policy all change or watch how guest pages are backed while vCPUs and device
//! threads use them. They need the same facts and the same rules, and a newcomer should
//! find each of them once:
//!
//! | module | what |
//! |---|---|
//! | [`anon`] | anonymous memory shaped like guest RAM, a memfd shaped like the sharing pool (measurements, tests) |
//! | [`page`] | the page size, copying a guest page out soundly, the zero test |
//! | [`pause`] | [`RunControl`]: holding every writer of a VM's memory still (vCPUs out of `KVM_RUN`, device threads out), the reclaimers' exclusion, the device gate |
//! | [`accessed`] | did the guest read or write a page since a point in time: `clear_refs`, dropping KVM's mapping, `/proc/kpageflags` |
//! | [`pagemap`] | `/proc/self/pagemap`: is a page resident, private, a file page, the zero page |
//! | [`maps`] | `/proc/self/maps`: which mappings are private anonymous memory, how many VMAs |
//! | [`residency`] | `mincore` and `smaps`: what is resident, per mapping and for the process |
//! | [`discard`] | dropping pages, many ranges per system call |
//! | [`guest`] | [`GuestVm`]: a VM as a reclaimer sees it (regions, pause, off-limits pages, fatal errors) |
//! | [`changes`] | [`RamChanges`]: the one ordered path by which a discard or a remap made by one party reaches the others |
//!
//! # Invariants every reclaimer keeps
//! - **A page's backing changes only with its VM paused** by a
//!   [`ReclaimGuard`] (exclusive among reclaimers), except where
//!   nobody can be using the page (a discard of pages the guest gave away, a fault on a
//!   missing page, which blocks every accessor until it is filled).
//! - **Guest memory is never borrowed as a Rust reference**: vCPUs and device threads
//!   write it at any moment, so it is copied out ([`page::copy_page`]) before it is
//!   hashed or compared, and decisions are checked again under the pause.
//! - **Off-limits pages are never touched** ([`GuestVm::off_limits`]): the memory the
//!   VMM writes without pausing the guest, and pages the guest gave away.
//! - **Every discard and every remap goes through [`RamChanges`]**, which tells the
//!   other reclaimers in a fixed order.

pub mod accessed;
pub mod anon;
pub mod changes;
pub mod discard;
pub mod guest;
pub mod maps;
pub mod page;
pub mod pagemap;
pub mod pause;
pub mod residency;

pub use changes::{RamChanges, SharingHooks, SwapHooks};
pub use guest::{GuestVm, Region};
pub use page::{Page, PAGE_SIZE};
pub use pause::{DeviceGuard, Mode, PauseError, PauseGuard, ReclaimGuard, RunControl};
