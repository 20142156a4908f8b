//! Planning, while the guests run: classify each page, look its hash up, compare,
//! write new pool pages, and record what to do in the batch.

use pagestate::page::{copy_page, is_zero};

use super::{Copies, State};
use crate::batch::{Batch, Op, Target};
use crate::hash_table::Entry;
use pagestate::pagemap::{Backing, PageInfo};

use crate::pass::{Chunk, PassRegion};
use crate::region::Slot;
use crate::Page;

impl State {
    /// Plans the merges of one chunk. `infos` (pagemap) and `skip` (the VMM's
    /// `skip_page`) were read for its pages without the lock, after the caller last
    /// held it, when `resets` was `seen_resets` (updated here).
    ///
    /// A page is read only if `infos` says it is resident: reading a page that a
    /// `reset_range` has dropped since would fault it in (the zero page, or a
    /// userfaultfd fault with the lock held). So if a reset ran since, `infos` is
    /// read again, under the lock. (`skip` may then miss a page that became
    /// resident: the commit asks `skip_page` again for every page.)
    pub(crate) fn plan_chunk(
        &mut self,
        chunk: &Chunk,
        infos: &mut [PageInfo],
        skip: &[bool],
        seen_resets: &mut u64,
        batch: &mut Batch,
    ) {
        let PassRegion { id, host_addr, .. } = chunk.region;
        if self.regions.get(host_addr, id).is_none() {
            return; // removed since the pass started
        }
        if batch.is_empty() {
            self.pool.batch_done(); // no op names a pool page freed since
        }
        if std::mem::replace(seen_resets, self.resets) != self.resets {
            if let Err(e) = self.pagemap.read(chunk.addr(0), infos) {
                return self.count_error("reading /proc/self/pagemap", e);
            }
        }
        for i in 0..chunk.pages {
            self.visit(chunk, i, infos[i], skip[i], batch);
        }
        self.stats.pages_scanned += chunk.pages as u64;
    }

    fn visit(&mut self, chunk: &Chunk, i: usize, info: PageInfo, skip: bool, batch: &mut Batch) {
        let host = chunk.region.host_addr;
        let (page, addr) = (chunk.first + i, chunk.addr(i));
        if batch.planned(addr).is_some() {
            return;
        }
        let backing = info.backing();
        match self.regions.get(host, chunk.region.id).expect("checked").slot(page) {
            Slot::Pool { idx, broken: false } => {
                if backing != Backing::Anon {
                    return; // still shared (or not faulted in since)
                }
                self.stats.broken_shares += 1;
                self.regions.set_slot(host, page, Slot::Pool { idx, broken: true });
                self.release(idx);
            }
            Slot::Zero => {
                if backing != Backing::Anon {
                    return; // still dropped, or the shared zero page
                }
                self.stats.zero_pages -= 1;
                self.regions.set_slot(host, page, Slot::Anon);
            }
            Slot::Anon | Slot::Pool { broken: true, .. } => {}
        }
        if skip || backing != Backing::Anon {
            return;
        }
        self.stats.pages_hashed += 1;
        let op = Op {
            region: host,
            region_id: chunk.region.id,
            page,
            vm: chunk.region.vm,
            gpa: chunk.gpa(i),
            target: Target::Zero,
        };
        let mut copies = self.copies.take().expect("planning is not re-entered");
        // SAFETY: a resident page of a registered region (checked above), which stays
        // mapped while the state lock is held. The guest may be writing it: the copy is
        // a hint, checked again under the pause.
        unsafe { copy_page(addr, &mut copies.page) };
        self.plan_page(op, &mut copies, batch);
        self.copies = Some(copies);
    }

    /// Plans what to do with the page of `op`, whose copy is `copies.page`.
    fn plan_page(&mut self, op: Op, copies: &mut Copies, batch: &mut Batch) {
        let g = &copies.page;
        if is_zero(g) {
            batch.push(op);
            return;
        }
        let addr = op.addr();
        let domain = self.domain(op.vm);
        let key = Self::hash(g, domain);
        match self.table.get(key) {
            None => self.table.set(key, Entry::Hint(addr)),
            Some(Entry::Hint(h)) if h == addr => self.table.set(key, Entry::Hint(addr)),
            Some(Entry::Hint(h)) => self.match_hint(h, key, domain, op, g, &mut copies.hint, batch),
            Some(Entry::Pool(p)) => self.join(p, key, domain, op, g, batch),
        }
    }

    /// Pool page the VMA maps at the page before `addr` in its region (planned or
    /// done), if any.
    fn offset_before(&self, addr: usize, batch: &Batch) -> Option<u32> {
        let r = self.regions.find(addr)?;
        let before = r.page_of(addr)?.checked_sub(1)?;
        match batch.planned(r.addr(before)) {
            Some(Target::Pool(q)) => Some(q),
            Some(Target::Zero) => None,
            None => r.slot(before).pool_offset(),
        }
    }

    /// The op for hint `h` if it still holds the content of `key` and can be merged;
    /// `copy` then holds a copy of it.
    fn hint_op(&self, h: usize, key: u64, domain: u64, batch: &Batch, copy: &mut Page) -> Option<Op> {
        let r = self.regions.find(h)?;
        let page = r.page_of(h)?;
        let mergeable = matches!(r.slot(page), Slot::Anon | Slot::Pool { broken: true, .. });
        if !mergeable || self.domain(r.vm) != domain || batch.planned(h).is_some() {
            return None;
        }
        if self.pagemap.one(h).ok()?.backing() != Backing::Anon {
            return None;
        }
        // SAFETY: `h` is a resident page of a registered region (checked above), which
        // stays mapped while the state lock is held; the copy is a hint.
        unsafe { copy_page(h, copy) };
        (Self::hash(copy, domain) == key).then(|| Op {
            region: r.host_addr,
            region_id: r.id,
            page,
            vm: r.vm,
            gpa: r.gpa_of(page),
            target: Target::Zero,
        })
    }

    /// A page matches hint `h`: both go onto a new pool page if `h` is unchanged.
    #[allow(clippy::too_many_arguments)]
    fn match_hint(&mut self, h: usize, key: u64, domain: u64, op: Op, g: &Page, hint: &mut Page, batch: &mut Batch) {
        let Some(hop) = self.hint_op(h, key, domain, batch, hint) else {
            self.stats.stale_hints += 1;
            self.table.set(key, Entry::Hint(op.addr()));
            return;
        };
        if hint != g {
            self.stats.hash_collisions += 1;
            return;
        }
        // Continue a run of pool pages after either page's predecessor.
        let want = self.offset_before(op.addr(), batch).or_else(|| self.offset_before(h, batch)).map(|q| q + 1);
        let buf = batch.copy_in(g);
        match self.pool.alloc(want, batch.buf(buf), key, domain, None) {
            Ok(idx) => {
                batch.bind_new(idx, buf, 2);
                self.table.set(key, Entry::Pool(idx));
                batch.push(Op { target: Target::Pool(idx), ..hop });
                batch.push(Op { target: Target::Pool(idx), ..op });
            }
            Err(e) => {
                batch.drop_last_copy();
                self.count_error("writing a pool page", e);
            }
        }
    }

    /// A page matches pool page `p`: map it there, or onto the replica that
    /// continues the run of the page before it.
    fn join(&mut self, p: u32, key: u64, domain: u64, op: Op, g: &Page, batch: &mut Batch) {
        if self.pool.get(p).is_none_or(|pp| pp.domain != domain) {
            self.stats.hash_collisions += 1;
            return;
        }
        let buf = match batch.load(&self.pool, p) {
            Ok(b) => b,
            Err(e) => return self.count_error("reading a pool page", e),
        };
        if batch.buf(buf) != g {
            self.stats.hash_collisions += 1;
            return;
        }
        let target = self.run_target(op.addr(), key, domain, g, buf, batch).unwrap_or(p);
        batch.push(Op { target: Target::Pool(target), ..op });
    }

    /// The pool page after the one mapped at the page before `addr`, if it holds
    /// this content (`g`, also in `buf`), or can be made a replica of it to extend a
    /// run of identical pages.
    fn run_target(
        &mut self,
        addr: usize,
        key: u64,
        domain: u64,
        g: &Page,
        buf: usize,
        batch: &mut Batch,
    ) -> Option<u32> {
        let q = self.offset_before(addr, batch)?;
        let next = q + 1;
        let same = |pp: &crate::pool::PoolPage| pp.key == key && pp.domain == domain;
        if let Some(n) = self.pool.get(next) {
            if !same(n) {
                return None;
            }
            // Equal keys are only a hint: compare (and keep the content for the commit).
            return match batch.load(&self.pool, next) {
                Ok(b) => (batch.buf(b) == g).then_some(next),
                Err(e) => {
                    self.count_error("reading a pool page", e);
                    None
                }
            };
        }
        let prev = self.pool.get(q).filter(|pp| same(pp))?;
        let base = prev.base;
        if next - base >= self.run_replicas || !self.pool.is_free(next) {
            return None;
        }
        match self.pool.alloc(Some(next), batch.buf(buf), key, domain, Some(base)) {
            Ok(idx) => {
                debug_assert_eq!(idx, next);
                batch.bind_new(idx, buf, 1);
                Some(idx)
            }
            Err(e) => {
                self.count_error("writing a pool page", e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pass::Chunk;
    use crate::{Region, PAGE_SIZE};
    use pagestate::anon::AnonMap;
    use pagestate::pagemap::Pagemap;

    /// A chunk's pagemap is read without the lock; a `reset_range` between that
    /// read and the plan must not make the plan read (and so fault in) the pages
    /// it dropped.
    #[test]
    fn a_reset_after_the_pagemap_read_is_seen() {
        let m = AnonMap::pages(8);
        for i in 0..8 {
            // SAFETY: our own mapping; pages 0..4 zero, 4..8 unique.
            unsafe { std::ptr::write_bytes((m.addr() + i * PAGE_SIZE) as *mut u8, (i / 4 * (i + 1)) as u8, PAGE_SIZE) };
        }
        let mut st = State::new(&Config::default()).unwrap();
        st.add_region(&Region { vm: 0, gpa: 0, host_addr: m.addr(), len: m.len() }).unwrap();
        let chunk = Chunk { region: st.pass_regions()[0], first: 0, pages: 8 };
        let pagemap = Pagemap::open().unwrap();
        let mut infos = vec![PageInfo::default(); 8];
        pagemap.read(m.addr(), &mut infos).unwrap();
        assert!(infos.iter().all(|i| i.backing() == Backing::Anon));
        let mut seen = st.resets;

        st.reset_range(m.addr(), m.len(), &mut Vec::new()).unwrap();
        let mut batch = Batch::default();
        st.plan_chunk(&chunk, &mut infos, &[false; 8], &mut seen, &mut batch);
        pagemap.read(m.addr(), &mut infos).unwrap();
        assert!(infos.iter().all(|i| !i.present()), "a dropped page was read: {infos:?}");
        assert!(batch.is_empty() && st.stats.pages_hashed == 0);
        assert_eq!(seen, st.resets);
    }
}
