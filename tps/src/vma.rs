//! The VMA budget: how many VMAs sharing adds, and the limit it must stay under.
//!
//! The region model (`region.rs`) gives the VMA cost of each merge before it is made.
//! The kernel does not always merge what the model merges (two neighbouring mappings
//! that both received private copies carry different `anon_vma`s and stay apart), so
//! the truth is counted from `/proc/self/maps` at the end of every pass and when a
//! merge comes near the limit; in between, counts are the last count plus the model's
//! change since.

use std::time::Instant;

use pagestate::maps::{count_vmas, max_map_count};

use crate::region::Regions;

pub(crate) struct VmaBudget {
    pub(crate) limit: usize,
    /// VMAs of the process at the last count.
    process: usize,
    /// VMAs in registered regions beyond one per region, at the last count.
    added: usize,
    /// The model's `vmas_added` at the last count.
    model: usize,
    counted_at: Instant,
    /// Whether the count was taken again near the limit since the last pass ended.
    recounted: bool,
    warned: bool,
}

impl VmaBudget {
    pub(crate) fn new(limit: usize, regions: &Regions) -> Self {
        let mut b =
            Self { limit, process: 0, added: 0, model: 0, counted_at: Instant::now(), recounted: false, warned: false };
        b.count(regions);
        b
    }

    fn count(&mut self, regions: &Regions) {
        let ranges = regions.ranges();
        match count_vmas(&ranges) {
            Ok((process, inside)) => {
                self.process = process;
                self.added = inside.saturating_sub(ranges.len());
                self.model = regions.vmas_added();
                self.counted_at = Instant::now();
            }
            Err(e) => log::warn!("tps: counting VMAs: {e}"),
        }
    }

    fn since(&self, regions: &Regions, at_count: usize) -> usize {
        (at_count + regions.vmas_added()).saturating_sub(self.model)
    }

    /// VMAs of the process now (estimate).
    pub(crate) fn process(&self, regions: &Regions) -> usize {
        self.since(regions, self.process)
    }

    /// VMAs sharing added to the registered regions now (estimate).
    pub(crate) fn added(&self, regions: &Regions) -> usize {
        self.since(regions, self.added)
    }

    /// A pass ended: count again, and warn again at the next refusal.
    pub(crate) fn end_pass(&mut self, regions: &Regions) {
        self.count(regions);
        self.recounted = false;
        self.warned = false;
    }

    /// Whether a merge costing `delta` more VMAs fits.
    pub(crate) fn allows(&mut self, regions: &Regions, delta: isize) -> bool {
        if delta <= 0 {
            return true;
        }
        let after = |b: &Self| b.process(regions).saturating_add_signed(delta);
        // Near the limit, count again (other threads' mappings, stacks and the VMM's
        // own, change the count too): once per pass, then at most once a second.
        let near = after(self) > self.limit - self.limit / 8;
        if near && (!self.recounted || self.counted_at.elapsed().as_secs() >= 1) {
            self.count(regions);
            self.recounted = true;
        }
        if after(self) <= self.limit {
            return true;
        }
        if !self.warned {
            self.warned = true;
            log::warn!(
                "tps: the process has ~{} VMAs, sharing may use up to {} (vm.max_map_count {}); \
                 merges that need more VMAs are skipped until shares are broken or freed",
                self.process(regions),
                self.limit,
                max_map_count()
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Slot;
    use crate::remap::Advice;
    use crate::Region;
    use pagestate::anon::AnonMap;

    #[test]
    fn counts_follow_the_model_and_the_limit_holds() {
        let m = AnonMap::pages(16);
        let mut regions = Regions::default();
        let r = Region { vm: 0, gpa: 0, host_addr: m.addr(), len: m.len() };
        regions.add(&r, Advice::default()).unwrap();
        let mut b = VmaBudget::new(usize::MAX, &regions);
        assert_eq!(b.added(&regions), 0);
        let base = b.process(&regions);
        // The model says page 3 left the anonymous VMA: +2.
        regions.set_slot(m.addr(), 3, Slot::Pool { idx: 0, broken: false });
        assert_eq!((b.added(&regions), b.process(&regions)), (2, base + 2));
        // The kernel still has one VMA there: a count sets the truth again.
        b.end_pass(&regions);
        assert_eq!((b.added(&regions), b.process(&regions)), (0, base));

        b.limit = base + 1;
        assert!(b.allows(&regions, 0) && b.allows(&regions, 1));
        assert!(!b.allows(&regions, 2), "over the limit");
        assert!(b.warned && b.recounted);
    }
}
