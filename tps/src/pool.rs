//! The pool: one memfd holding the single copy of every shared non-zero page.
//!
//! A shared guest page is a `MAP_PRIVATE` mapping of one pool page, so the pool's
//! content never changes while a guest maps it (guest writes copy). Pool pages are
//! written once with `pwrite`, counted (`refs`: guest pages mapping them and not yet
//! broken) and freed with `fallocate(PUNCH_HOLE)` when nothing maps them any more.
//! The file is sparse: its size grows in steps and costs nothing until written.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

use crate::{Page, PAGE_SIZE};

/// Pool indices are stored in 31 bits of a guest page's slot (see `region.rs`).
pub(crate) const MAX_POOL_PAGES: u32 = (1 << 31) - 2;
/// File size is grown this many pages at a time.
const GROW_PAGES: u32 = 4096;

/// Bookkeeping of one pool page.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PoolPage {
    /// Guest pages mapping it whose share is not known to be broken.
    pub(crate) refs: u32,
    /// Its key in the hash table.
    pub(crate) key: u64,
    /// Sharing domain: only guest pages of the same domain may map it.
    pub(crate) domain: u64,
    /// First page of its replica block (itself unless it is a replica, see `state.rs`).
    pub(crate) base: u32,
    live: bool,
    /// Freed, but not reusable until the pending batch is applied.
    released: bool,
}

pub(crate) struct Pool {
    file: File,
    pages: Vec<PoolPage>,
    /// Freed indices below `pages.len()`, reusable.
    free: BTreeSet<u32>,
    /// Indices freed since the last batch was applied. That batch may still name
    /// them (ops planned before a `reset_range`, a `remove_vm` or a broken share
    /// freed the page): were one reused for a new page in the same batch, those ops
    /// would pass the commit's checks against the new page, mapping guest pages
    /// one by one onto a page planned for others (a VMA each), not as planned.
    released: Vec<u32>,
    /// Live pages with references: those written for a batch not yet applied have
    /// none.
    mapped: usize,
    file_pages: u32,
}

impl Pool {
    pub(crate) fn new() -> io::Result<Self> {
        let name: &CStr = c"tps-pool";
        // SAFETY: plain syscall with a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file, pages: Vec::new(), free: BTreeSet::new(), released: Vec::new(), mapped: 0, file_pages: 0 })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Pool pages that guest pages map: not those written for a batch that is not
    /// applied yet (a snapshot taken then would count pages that may never be used).
    pub(crate) fn mapped_pages(&self) -> usize {
        self.mapped
    }

    /// The page at `idx` if it is in use.
    pub(crate) fn get(&self, idx: u32) -> Option<&PoolPage> {
        self.pages.get(idx as usize).filter(|p| p.live)
    }

    /// Whether `alloc(Some(idx), ..)` would give `idx`.
    pub(crate) fn is_free(&self, idx: u32) -> bool {
        let unused = |p: &PoolPage| !p.live && !p.released;
        idx < MAX_POOL_PAGES && idx as usize <= self.pages.len() && self.pages.get(idx as usize).is_none_or(unused)
    }

    /// Writes `content` into a free pool page and returns its index: `want` if it is
    /// free (to extend a run of consecutive pool pages), else the lowest free one.
    /// `base` names the replica block the page belongs to (None: its own).
    pub(crate) fn alloc(
        &mut self,
        want: Option<u32>,
        content: &Page,
        key: u64,
        domain: u64,
        base: Option<u32>,
    ) -> io::Result<u32> {
        let idx = match want.filter(|&w| self.is_free(w)) {
            Some(w) => w,
            None => self.free.first().copied().unwrap_or(self.pages.len() as u32),
        };
        if idx >= MAX_POOL_PAGES {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if idx >= self.file_pages {
            let pages = (idx / GROW_PAGES + 1) * GROW_PAGES;
            self.file.set_len(pages as u64 * PAGE_SIZE as u64)?;
            self.file_pages = pages;
        }
        self.file.write_all_at(content, idx as u64 * PAGE_SIZE as u64)?;
        if idx as usize == self.pages.len() {
            self.pages.push(PoolPage::default());
        } else {
            self.free.remove(&idx);
        }
        self.pages[idx as usize] =
            PoolPage { refs: 0, key, domain, base: base.unwrap_or(idx), live: true, released: false };
        Ok(idx)
    }

    /// Reads the content of a pool page.
    pub(crate) fn read(&self, idx: u32, buf: &mut Page) -> io::Result<()> {
        self.file.read_exact_at(buf, idx as u64 * PAGE_SIZE as u64)
    }

    pub(crate) fn add_ref(&mut self, idx: u32) {
        let p = &mut self.pages[idx as usize];
        self.mapped += (p.refs == 0) as usize;
        p.refs += 1;
    }

    /// Drops one reference; frees the page when it was the last one and returns the
    /// freed page's key (for the caller to drop it from the hash table).
    pub(crate) fn drop_ref(&mut self, idx: u32) -> Option<u64> {
        if self.pages[idx as usize].refs <= 1 {
            return Some(self.free(idx));
        }
        self.pages[idx as usize].refs -= 1;
        None
    }

    /// Frees a page (whatever its references) and returns its key.
    pub(crate) fn free(&mut self, idx: u32) -> u64 {
        let PoolPage { key, refs, live, .. } = self.pages[idx as usize];
        if !live {
            return key;
        }
        self.mapped -= (refs > 0) as usize;
        self.pages[idx as usize] = PoolPage { released: true, ..PoolPage::default() };
        self.released.push(idx);
        let off = idx as i64 * PAGE_SIZE as i64;
        // SAFETY: plain syscall on our own fd.
        let r = unsafe {
            libc::fallocate(self.fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, PAGE_SIZE as i64)
        };
        if r != 0 {
            log::warn!("tps: freeing pool page {idx}: {}", io::Error::last_os_error());
        }
        key
    }

    /// The pending batch was applied (or dropped): the pages freed since may be
    /// reused.
    pub(crate) fn batch_done(&mut self) {
        for idx in self.released.drain(..) {
            self.pages[idx as usize].released = false;
            self.free.insert(idx);
        }
    }

    /// Bytes of bookkeeping.
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<PoolPage>() + (self.free.len() + self.released.capacity()) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(pool: &Pool) -> usize {
        pool.pages.iter().filter(|p| p.live).count()
    }

    fn resident_bytes(pool: &Pool) -> u64 {
        pool.file.metadata().map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap()
    }

    #[test]
    fn alloc_prefers_the_wanted_page_then_the_lowest_free() {
        let mut pool = Pool::new().unwrap();
        let page = |b: u8| [b; PAGE_SIZE];
        assert_eq!(pool.alloc(None, &page(1), 11, 0, None).unwrap(), 0);
        assert_eq!(pool.alloc(Some(1), &page(2), 12, 0, None).unwrap(), 1);
        assert_eq!(pool.alloc(Some(0), &page(3), 13, 0, None).unwrap(), 2, "0 is taken");
        assert_eq!(pool.alloc(Some(9), &page(4), 14, 0, Some(2)).unwrap(), 3, "9 is past the end");
        assert_eq!(pool.get(3).unwrap().base, 2);
        assert_eq!(pool.get(1).unwrap().base, 1);
        assert_eq!((live(&pool), pool.mapped_pages()), (4, 0), "written, mapped by none yet");
        let mut buf = [0; PAGE_SIZE];
        pool.read(1, &mut buf).unwrap();
        assert_eq!(buf, page(2));

        pool.add_ref(1);
        pool.add_ref(1);
        pool.add_ref(2);
        assert_eq!(pool.mapped_pages(), 2);
        assert_eq!(pool.drop_ref(1), None);
        assert_eq!(pool.mapped_pages(), 2);
        assert!(!pool.is_free(1));
        assert_eq!(pool.drop_ref(1), Some(12), "last reference frees");
        assert!(pool.get(1).is_none());
        assert!(!pool.is_free(1), "not reusable before the batch is done");
        assert_eq!(pool.alloc(Some(1), &page(6), 16, 0, None).unwrap(), 4, "nor the lowest free");
        pool.batch_done();
        assert!(pool.is_free(1));
        assert_eq!((live(&pool), pool.mapped_pages()), (4, 1));
        pool.free(2);
        pool.batch_done();
        assert_eq!((live(&pool), pool.mapped_pages()), (3, 0), "freed with its references");
        assert_eq!(pool.alloc(None, &page(5), 15, 0, None).unwrap(), 1, "lowest free page");
        assert!(pool.is_free(5) && !pool.is_free(6), "only the next page past the end");
    }

    #[test]
    fn free_punches_a_hole() {
        let mut pool = Pool::new().unwrap();
        for i in 0..64 {
            pool.alloc(None, &[i as u8 + 1; PAGE_SIZE], i, 0, None).unwrap();
        }
        let before = resident_bytes(&pool);
        assert!(before >= 64 * PAGE_SIZE as u64);
        for i in 0..32 {
            assert_eq!(pool.free(i), i as u64);
        }
        assert_eq!(before - resident_bytes(&pool), 32 * PAGE_SIZE as u64);
        let mut buf = [1; PAGE_SIZE];
        pool.read(3, &mut buf).unwrap();
        assert_eq!(buf, [0; PAGE_SIZE], "a hole reads as zeros");
    }
}
