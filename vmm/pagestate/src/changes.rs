//! The one path by which a change one party makes to how guest RAM is backed reaches
//! the others, in a fixed order: [`RamChanges`], one per VM.
//!
//! Two events cross between the reclaimers:
//!
//! **Discard** (balloon inflation, free page reporting: the guest gave pages away, the
//! VMM frees their memory), [`RamChanges::discard`], in this order:
//! 1. **The swapper forgets** its copies of those pages ([`SwapHooks::forget`]).
//!    First, because once the range is gone a touch faults, and the fault must find no
//!    slot and read zeros, as a freed page does; a slot left behind would bring the old
//!    page back from the swap file.
//! 2. **Page sharing frees the range** ([`SharingHooks::discard`]) if it covers this
//!    VM: a page it shared is a private mapping of its pool file, where a bare
//!    `MADV_DONTNEED` would bring the pool's content back instead of zeros; it maps
//!    fresh anonymous memory there instead, which is a remap (below). Without page
//!    sharing, `MADV_DONTNEED`.
//!
//! **Remap** (page sharing replaced the mapping of a range: a merge, or the reset of a
//! discard), [`RamChanges::remapped`]: the new mapping is a new VMA, which no
//! userfaultfd covers; **the swapper registers it again** ([`SwapHooks::remapped`]),
//! still under the pause (or the discard) that made it, so that a page evicted from it
//! later faults back in instead of reading zeros.
//!
//! Each reclaimer attaches itself when it starts covering the VM and is held weakly:
//! a reclaimer that has gone (its VM ended, it was shut down) is simply not told.

use std::io;
use std::sync::{RwLock, Weak};

use crate::discard::dontneed;

/// What the swapper of a VM does when others change its RAM.
pub trait SwapHooks: Send + Sync {
    /// `[gpa, gpa + len)` is about to be discarded: forget the copies of those pages,
    /// so that the next touch reads zeros.
    fn forget(&self, gpa: u64, len: u64);
    /// `[host_addr, host_addr + len)` is a new mapping of guest RAM: cover it again.
    fn remapped(&self, host_addr: usize, len: usize) -> io::Result<()>;
}

/// What page sharing does when a VM's RAM is discarded.
pub trait SharingHooks: Send + Sync {
    /// Makes `[host_addr, host_addr + len)` plain anonymous memory that reads zeros
    /// and holds no memory (shared pages included), telling [`RamChanges::remapped`]
    /// of every new mapping.
    fn discard(&self, host_addr: usize, len: usize) -> io::Result<()>;
}

/// Who must hear about a change of one VM's RAM. See the module documentation for the
/// order and why.
#[derive(Default)]
pub struct RamChanges {
    swapper: RwLock<Option<Weak<dyn SwapHooks>>>,
    sharing: RwLock<Option<Weak<dyn SharingHooks>>>,
}

/// A second reclaimer of the same kind tried to attach to one VM.
#[derive(Debug, thiserror::Error)]
#[error("this VM's RAM is already covered by another {0}")]
pub struct AlreadyAttached(&'static str);

fn attach<T: ?Sized>(
    slot: &RwLock<Option<Weak<T>>>,
    hooks: Weak<T>,
    what: &'static str,
) -> Result<(), AlreadyAttached> {
    let mut slot = slot.write().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|w| w.strong_count() > 0) {
        return Err(AlreadyAttached(what));
    }
    *slot = Some(hooks);
    Ok(())
}

fn live<T: ?Sized>(slot: &RwLock<Option<Weak<T>>>) -> Option<std::sync::Arc<T>> {
    slot.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(Weak::upgrade)
}

impl RamChanges {
    /// The VM's swapper starts covering its RAM.
    pub fn attach_swapper(&self, hooks: Weak<dyn SwapHooks>) -> Result<(), AlreadyAttached> {
        attach(&self.swapper, hooks, "swapper")
    }

    /// Page sharing starts covering the VM's RAM.
    pub fn attach_sharing(&self, hooks: Weak<dyn SharingHooks>) -> Result<(), AlreadyAttached> {
        attach(&self.sharing, hooks, "page sharing scanner")
    }

    /// Frees the memory behind guest pages `[gpa, gpa + len)`, mapped at `host_addr`
    /// (page aligned, inside one region): the guest reads zeros there next time. The
    /// caller knows nobody uses the range (the guest gave it away).
    pub fn discard(&self, gpa: u64, host_addr: usize, len: usize) -> io::Result<()> {
        if let Some(swapper) = live(&self.swapper) {
            swapper.forget(gpa, len as u64);
        }
        match live(&self.sharing) {
            Some(sharing) => sharing.discard(host_addr, len),
            None => dontneed(host_addr, len),
        }
    }

    /// Page sharing replaced the mapping of `[host_addr, host_addr + len)`.
    pub fn remapped(&self, host_addr: usize, len: usize) -> io::Result<()> {
        match live(&self.swapper) {
            Some(swapper) => swapper.remapped(host_addr, len),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::anon::AnonMap;
    use crate::page::PAGE_SIZE;

    /// The calls of both reclaimers, in order.
    type Journal = Arc<Mutex<Vec<String>>>;

    /// Swapper stand-in: records what it is told.
    struct Swapper(Journal);

    impl SwapHooks for Swapper {
        fn forget(&self, gpa: u64, len: u64) {
            self.0.lock().unwrap().push(format!("forget {gpa:#x}+{len:#x}"));
        }
        fn remapped(&self, _host_addr: usize, len: usize) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("remapped +{len:#x}"));
            Ok(())
        }
    }

    /// Page sharing stand-in that discards for real and reports one remap.
    struct Sharing(Journal, Arc<RamChanges>);

    impl SharingHooks for Sharing {
        fn discard(&self, host_addr: usize, len: usize) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("sharing discards +{len:#x}"));
            dontneed(host_addr, len)?;
            self.1.remapped(host_addr, len)
        }
    }

    #[test]
    fn the_swapper_forgets_before_sharing_frees_then_hears_of_the_remap() {
        let m = AnonMap::pages(4);
        // SAFETY: a page of the test mapping.
        unsafe { (m.addr() as *mut u8).write_volatile(9) };
        let changes = Arc::new(RamChanges::default());
        let journal = Journal::default();
        let swapper: Arc<dyn SwapHooks> = Arc::new(Swapper(journal.clone()));
        changes.attach_swapper(Arc::downgrade(&swapper)).unwrap();
        assert!(changes.attach_swapper(Arc::downgrade(&swapper)).is_err(), "one swapper per VM");

        changes.discard(0x10_0000, m.addr(), PAGE_SIZE).unwrap();
        // SAFETY: a page of the test mapping.
        assert_eq!(unsafe { (m.addr() as *const u8).read_volatile() }, 0, "no page sharing: plain DONTNEED");

        let sharing: Arc<dyn SharingHooks> = Arc::new(Sharing(journal.clone(), changes.clone()));
        changes.attach_sharing(Arc::downgrade(&sharing)).unwrap();
        changes.discard(0x20_0000, m.addr(), 2 * PAGE_SIZE).unwrap();
        assert_eq!(
            *journal.lock().unwrap(),
            ["forget 0x100000+0x1000", "forget 0x200000+0x2000", "sharing discards +0x2000", "remapped +0x2000"]
        );

        drop(swapper);
        changes.remapped(m.addr(), PAGE_SIZE).unwrap();
        assert_eq!(journal.lock().unwrap().len(), 4, "a swapper that has gone is not told");
        let again: Arc<dyn SwapHooks> = Arc::new(Swapper(journal.clone()));
        changes.attach_swapper(Arc::downgrade(&again)).expect("the slot of a gone swapper can be taken");
    }
}
