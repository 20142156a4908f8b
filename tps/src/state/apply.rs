//! Applying a batch, with the VMs it touches paused: re-check every page, then
//! `mmap`/`madvise` runs of pages, keeping the counts and the VMA model true.

use pagestate::page::{copy_page, is_zero};

use super::{Remapped, State};
use crate::batch::{Batch, Op, Target};
use pagestate::discard::dontneed;
use pagestate::pagemap::{Backing, PageInfo};
use pagestate::residency::is_mapped;

use crate::region::Slot;
use crate::remap::{self, Advice};
use crate::{Page, PAGE_SIZE};

impl State {
    /// Re-checks every op of `batch` and applies those whose page still holds what
    /// was planned. The caller has paused every VM of the ops and dropped those of
    /// VMs gone or pages now skipped. Returns the new mappings made.
    pub(crate) fn apply(&mut self, batch: &mut Batch) -> Vec<Remapped> {
        batch.ops.sort_by_key(|op| op.addr());
        let mut ok = self.verify(batch);
        // A new pool page must end up with its users, or it is not worth its VMAs.
        for &(idx, min) in &batch.new_pools {
            let users = batch.ops.iter().zip(&ok).filter(|(op, &k)| k && op.target == Target::Pool(idx));
            if users.count() < min {
                for (op, k) in batch.ops.iter().zip(ok.iter_mut()) {
                    *k &= op.target != Target::Pool(idx);
                }
            }
        }
        let mut remapped = Vec::new();
        let ops = &batch.ops;
        let mut i = 0;
        while i < ops.len() {
            if !ok[i] {
                i += 1;
                continue;
            }
            let r = self.regions.get(ops[i].region, ops[i].region_id).expect("verified");
            let in_pool_vma = r.slot(ops[i].page).in_pool_vma();
            let mut j = i + 1;
            while j < ops.len()
                && ok[j]
                && ops[j].region == ops[i].region
                && ops[j].page == ops[j - 1].page + 1
                && match (ops[j - 1].target, ops[j].target) {
                    (Target::Zero, Target::Zero) => r.slot(ops[j].page).in_pool_vma() == in_pool_vma,
                    (Target::Pool(a), Target::Pool(b)) => b == a + 1,
                    _ => false,
                }
            {
                j += 1;
            }
            self.apply_run(&ops[i..j], batch, &mut remapped);
            i = j;
        }
        for &(idx, _) in &batch.new_pools {
            if self.pool.get(idx).is_some_and(|pp| pp.refs == 0) {
                let key = self.pool.free(idx);
                self.table.remove_pool(key, idx);
            }
        }
        self.pool.batch_done();
        self.stats.batches += 1;
        remapped
    }

    /// Which ops still hold: region registered, page mergeable, resident and
    /// private (never fault a page in), and content exactly as planned.
    fn verify(&mut self, batch: &Batch) -> Vec<bool> {
        let ops = &batch.ops;
        let mut infos = vec![PageInfo::default(); ops.len()];
        let mut window = [PageInfo::default(); 512];
        let mut i = 0;
        while i < ops.len() {
            let start = ops[i].addr();
            let j = i + ops[i..].iter().take_while(|op| op.addr() < start + 512 * PAGE_SIZE).count();
            let span = (ops[j - 1].addr() - start) / PAGE_SIZE + 1;
            match self.pagemap.read(start, &mut window[..span]) {
                Ok(()) => {
                    for k in i..j {
                        infos[k] = window[(ops[k].addr() - start) / PAGE_SIZE];
                    }
                }
                Err(e) => self.count_error("reading /proc/self/pagemap", e),
            }
            i = j;
        }
        let mut ok = vec![false; ops.len()];
        let mut copies = self.copies.take().expect("applying is not re-entered");
        for (k, op) in ops.iter().enumerate() {
            let Some(r) = self.regions.get(op.region, op.region_id) else {
                continue;
            };
            let mergeable = matches!(r.slot(op.page), Slot::Anon | Slot::Pool { broken: true, .. });
            let resident = infos[k].backing() == Backing::Anon;
            if mergeable && resident {
                // SAFETY: a resident page of a registered region (mapped while the state
                // lock is held); every writer of its VM is paused, so the copy is what
                // the remap will keep.
                unsafe { copy_page(op.addr(), &mut copies.page) };
                ok[k] = match op.target {
                    Target::Zero => is_zero(&copies.page),
                    Target::Pool(p) => self.pool.get(p).is_some() && batch.content(p) == Some(&copies.page),
                };
            }
            if !ok[k] {
                self.stats.race_aborts += 1;
            }
        }
        self.copies = Some(copies);
        ok
    }

    /// Applies a run of ops on consecutive pages of one region, all alike.
    fn apply_run(&mut self, run: &[Op], batch: &Batch, remapped: &mut Vec<Remapped>) {
        let first = run[0];
        let (addr, n) = (first.addr(), run.len());
        let len = n * PAGE_SIZE;
        let r = self.regions.get(first.region, first.region_id).expect("verified");
        let advice = r.advice;
        let in_pool_vma = r.slot(first.page).in_pool_vma();
        let slot = match first.target {
            Target::Zero => Slot::Zero,
            Target::Pool(idx) => Slot::Pool { idx, broken: false },
        };
        let delta = r.run_delta(first.page, n, slot);
        if !self.vma.allows(&self.regions, delta) {
            self.stats.vma_limited_pages += n as u64;
            return;
        }
        let result = match first.target {
            Target::Zero if !in_pool_vma => dontneed(addr, len),
            // DONTNEED inside a pool mapping would bring the pool page back.
            Target::Zero => remap::map_anon(addr, len, advice),
            Target::Pool(idx) => remap::map_pool(addr, len, self.pool.fd(), idx as u64 * PAGE_SIZE as u64, advice),
        };
        self.stats.remap_calls += 1;
        if let Err(e) = result {
            self.count_error(&format!("remapping {addr:#x}+{len:#x}"), e);
            return self.recover(run, batch, advice, remapped);
        }
        for (i, op) in run.iter().enumerate() {
            let s = match slot {
                Slot::Pool { idx, .. } => Slot::Pool { idx: idx + i as u32, broken: false },
                s => s,
            };
            self.regions.set_slot(op.region, op.page, s);
            if let Slot::Pool { idx, .. } = s {
                self.pool.add_ref(idx);
            }
        }
        match slot {
            Slot::Pool { .. } => {
                self.stats.merges += n as u64;
                self.stats.pool_mapped_pages += n as u64;
            }
            _ => {
                self.stats.zero_pages_freed += n as u64;
                self.stats.zero_pages += n as u64;
            }
        }
        if first.target != Target::Zero || in_pool_vma {
            remapped.push((first.vm, addr, len));
        }
    }

    /// A failed `mmap(MAP_FIXED)` may have unmapped the range before failing. The
    /// writers are still paused and the content is known (it was just verified), so
    /// put anonymous memory back and the content into it.
    fn recover(&mut self, run: &[Op], batch: &Batch, advice: Advice, remapped: &mut Vec<Remapped>) {
        let (addr, len) = (run[0].addr(), run.len() * PAGE_SIZE);
        if is_mapped(addr, len) {
            return; // the old mapping, and its content, are still there
        }
        log::error!("tps: a failed mmap left {addr:#x}+{len:#x} unmapped; restoring its content");
        if let Err(e) = remap::map_anon(addr, len, advice) {
            log::error!("tps: guest memory {addr:#x}+{len:#x} is lost: {e}");
            self.stats.errors += 1;
            return;
        }
        for op in run {
            if let Some(content) = op_content(op, batch) {
                // SAFETY: freshly mapped anonymous memory, writers paused.
                unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), op.addr() as *mut u8, PAGE_SIZE) };
            }
            self.regions.set_slot(op.region, op.page, Slot::Anon);
        }
        remapped.push((run[0].vm, addr, len));
    }
}

/// The content an op's page was verified to hold.
fn op_content<'a>(op: &Op, batch: &'a Batch) -> Option<&'a Page> {
    match op.target {
        Target::Zero => None,
        Target::Pool(p) => batch.content(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pass::Chunk;
    use crate::Region;
    use pagestate::anon::AnonMap;
    use pagestate::pagemap::Pagemap;

    /// Ops planned onto a pool page that is freed before the batch is applied (here
    /// by a `reset_range`) must not land on a new page that reuses its index.
    #[test]
    fn a_pool_page_freed_during_a_batch_is_not_reused_by_it() {
        let m = AnonMap::pages(8);
        // SAFETY: fills page `i` of the test mapping.
        let fill = |i: usize| unsafe { std::ptr::write_bytes((m.addr() + i * PAGE_SIZE) as *mut u8, 7, PAGE_SIZE) };
        // No replicas: page 2 joins the pool page itself.
        let mut st = State::new(&Config { run_replicas: 0, ..Config::default() }).unwrap();
        st.add_region(&Region { vm: 0, gpa: 0, host_addr: m.addr(), len: m.len() }).unwrap();
        let region = st.pass_regions()[0];
        let pagemap = Pagemap::open().unwrap();
        let mut seen = 0;
        let mut plan = |st: &mut State, first, pages, batch: &mut Batch| {
            let mut infos = vec![PageInfo::default(); pages];
            pagemap.read(m.addr() + first * PAGE_SIZE, &mut infos).unwrap();
            st.plan_chunk(&Chunk { region, first, pages }, &mut infos, &vec![false; pages], &mut seen, batch);
        };
        let mut batch = Batch::default();
        (0..3).for_each(fill);
        plan(&mut st, 0, 2, &mut batch);
        assert_eq!(batch.new_pools.len(), 1);
        let old = batch.new_pools[0].0;
        st.apply(&mut batch);
        batch.clear();
        assert_eq!(st.stats.pool_mapped_pages, 2);

        // Page 2 is planned onto the pool page; pages 0 and 1 are reset: the pool
        // page is freed while the batch is pending.
        plan(&mut st, 2, 1, &mut batch);
        assert_eq!(batch.ops[0].target, Target::Pool(old));
        st.reset_range(m.addr(), 2 * PAGE_SIZE, &mut Vec::new()).unwrap();
        assert!(st.pool.get(old).is_none());
        // The same batch goes on and needs a new pool page for the same content.
        (5..7).for_each(fill);
        plan(&mut st, 5, 2, &mut batch);
        let new = batch.new_pools[0].0;
        assert_ne!(new, old, "a freed index is reused in the batch that names it");
        st.apply(&mut batch);
        assert_eq!(st.stats.race_aborts, 1, "page 2's op: its pool page is gone");
        let mut infos = vec![PageInfo::default(); 7];
        pagemap.read(m.addr(), &mut infos).unwrap();
        assert_eq!(infos[2].backing(), Backing::Anon, "page 2 left private");
        assert!(infos[5..7].iter().all(|i| i.backing() != Backing::Anon), "pages 5, 6 shared");
        assert_eq!((st.stats.pool_mapped_pages, st.pool.mapped_pages()), (2, 1));
        assert!(st.pool.is_free(old), "reusable once the batch is applied");
    }
}
