//! A merge batch: what the scan decided, waiting for the pause that makes it safe.
//!
//! Planning (while the guests run) records one [`Op`] per guest page to drop as zero
//! or to map onto a pool page, and keeps a copy of the content of every pool page
//! involved. The commit (`state.rs`, with the VMs paused) re-checks each guest page
//! against that copy: whatever a vCPU wrote in between is seen there, and that page
//! is left alone.

use std::collections::HashMap;
use std::io;

use crate::pool::Pool;
use crate::{Page, PAGE_SIZE};

/// What to do with a guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// It is all zeros: drop it.
    Zero,
    /// It holds the content of this pool page: map that page over it.
    Pool(u32),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    /// The region (registration address and id) and page.
    pub(crate) region: usize,
    pub(crate) region_id: u64,
    pub(crate) page: usize,
    pub(crate) vm: u32,
    pub(crate) gpa: u64,
    pub(crate) target: Target,
}

impl Op {
    pub(crate) fn addr(&self) -> usize {
        self.region + self.page * PAGE_SIZE
    }
}

#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    planned: HashMap<usize, Target>,
    /// Pool page -> index in `bufs` of a copy of its content.
    contents: HashMap<u32, usize>,
    bufs: Vec<Box<Page>>,
    used: usize,
    /// Pool pages allocated by this batch, and how many guest pages must end up
    /// mapping each for it to be kept.
    pub(crate) new_pools: Vec<(u32, usize)>,
}

impl Batch {
    pub(crate) fn push(&mut self, op: Op) {
        self.planned.insert(op.addr(), op.target);
        self.ops.push(op);
    }

    /// What this batch will do with the page at `addr`.
    pub(crate) fn planned(&self, addr: usize) -> Option<Target> {
        self.planned.get(&addr).copied()
    }

    /// A buffer holding a copy of `page`, for a new pool page.
    pub(crate) fn copy_in(&mut self, page: &Page) -> usize {
        if self.used == self.bufs.len() {
            self.bufs.push(Box::new([0; PAGE_SIZE]));
        }
        self.bufs[self.used].copy_from_slice(page);
        self.used += 1;
        self.used - 1
    }

    /// Gives back the buffer of the last `copy_in`, unused.
    pub(crate) fn drop_last_copy(&mut self) {
        self.used -= 1;
    }

    /// Records that pool page `idx`, new in this batch, holds buffer `buf` and needs
    /// `min_users` guest pages.
    pub(crate) fn bind_new(&mut self, idx: u32, buf: usize, min_users: usize) {
        self.contents.insert(idx, buf);
        self.new_pools.push((idx, min_users));
    }

    /// The buffer index of pool page `idx`'s content, read from the pool if needed.
    pub(crate) fn load(&mut self, pool: &Pool, idx: u32) -> io::Result<usize> {
        if let Some(&b) = self.contents.get(&idx) {
            return Ok(b);
        }
        if self.used == self.bufs.len() {
            self.bufs.push(Box::new([0; PAGE_SIZE]));
        }
        pool.read(idx, &mut self.bufs[self.used])?;
        self.contents.insert(idx, self.used);
        self.used += 1;
        Ok(self.used - 1)
    }

    pub(crate) fn buf(&self, b: usize) -> &Page {
        &self.bufs[b]
    }

    /// The content of a pool page of this batch.
    pub(crate) fn content(&self, idx: u32) -> Option<&Page> {
        self.contents.get(&idx).map(|&b| &*self.bufs[b])
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.new_pools.is_empty()
    }

    /// Forgets everything, keeping the buffers for the next batch.
    pub(crate) fn clear(&mut self) {
        self.ops.clear();
        self.planned.clear();
        self.contents.clear();
        self.new_pools.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let mut pool = Pool::new().unwrap();
        let idx = pool.alloc(None, &[7; PAGE_SIZE], 1, 0, None).unwrap();
        let mut b = Batch::default();
        let copy = b.copy_in(&[1; PAGE_SIZE]);
        b.bind_new(40, copy, 2);
        let loaded = b.load(&pool, idx).unwrap();
        assert_eq!(b.load(&pool, idx).unwrap(), loaded, "read once");
        assert_eq!(b.content(idx).unwrap()[0], 7);
        assert_eq!(b.content(40).unwrap()[0], 1);
        assert_eq!(b.buf(copy)[0], 1);
        let op = Op { region: 0x10000, region_id: 0, page: 2, vm: 0, gpa: 0, target: Target::Zero };
        b.push(op);
        assert_eq!(b.planned(0x12000), Some(Target::Zero));
        assert!(!b.is_empty());
        let scratch = b.copy_in(&[2; PAGE_SIZE]);
        b.drop_last_copy();
        b.clear();
        assert!(b.is_empty() && b.planned(0x12000).is_none() && b.content(idx).is_none());
        assert_eq!(b.copy_in(&[3; PAGE_SIZE]), 0);
        assert_eq!(scratch, 2);
        assert_eq!(b.bufs.len(), 3, "no new allocation");
    }
}
