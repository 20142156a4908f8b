//! Registered guest RAM: what the scanner did to each page, and the VMAs that follow.
//!
//! Each page has a 4-byte slot (0.1% of the memory it describes): untouched by the
//! scanner, freed as a zero page, or mapped from pool page N (and whether the guest
//! has since broken that share with a write: the page is then a private copy, but
//! still inside the pool mapping's VMA).
//!
//! The slots also give a model of the VMAs of the region: two neighbouring pages are
//! in one VMA when both are anonymous or both map pool pages at the same distance
//! (consecutive guest pages on consecutive pool pages). The model follows every
//! change, so a merge knows its VMA cost before it is made (the kernel may keep
//! apart what the model joins: see `vma.rs`).

use std::collections::BTreeMap;

use crate::pool::MAX_POOL_PAGES;
use crate::remap::Advice;
use crate::{Error, Region, PAGE_SIZE};

/// What the scanner knows of one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Plain anonymous memory.
    Anon,
    /// Dropped by the scanner as a zero page (anonymous, reads zeros until written).
    Zero,
    /// Mapped from pool page `idx`; `broken`: the guest wrote it since.
    Pool { idx: u32, broken: bool },
}

const ANON: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
const BROKEN: u32 = 1 << 31;
const _: () = assert!((MAX_POOL_PAGES - 1) | BROKEN < ZERO);

impl Slot {
    fn pack(self) -> u32 {
        match self {
            Slot::Anon => ANON,
            Slot::Zero => ZERO,
            Slot::Pool { idx, broken } => idx | if broken { BROKEN } else { 0 },
        }
    }

    fn unpack(v: u32) -> Self {
        match v {
            ANON => Slot::Anon,
            ZERO => Slot::Zero,
            v => Slot::Pool { idx: v & !BROKEN, broken: v & BROKEN != 0 },
        }
    }

    /// Whether the page lies in a mapping of the pool (rather than anonymous memory).
    pub(crate) fn in_pool_vma(self) -> bool {
        matches!(self, Slot::Pool { .. })
    }

    /// Pool page whose offset the page's VMA maps at this page, if any.
    pub(crate) fn pool_offset(self) -> Option<u32> {
        match self {
            Slot::Pool { idx, .. } => Some(idx),
            _ => None,
        }
    }
}

/// Key of the VMA a page belongs to: equal keys on neighbours means one VMA.
fn vma_key(page: usize, slot: Slot) -> i64 {
    match slot {
        Slot::Pool { idx, .. } => idx as i64 - page as i64,
        Slot::Anon | Slot::Zero => i64::MIN,
    }
}

pub(crate) struct RegionState {
    /// Never reused: tells a region from a later one at the same address.
    pub(crate) id: u64,
    pub(crate) vm: u32,
    pub(crate) gpa: u64,
    pub(crate) host_addr: usize,
    pub(crate) pages: usize,
    pub(crate) advice: Advice,
    slots: Vec<u32>,
    /// VMAs the region is made of (1 when untouched).
    vmas: usize,
}

impl RegionState {
    pub(crate) fn slot(&self, page: usize) -> Slot {
        Slot::unpack(self.slots[page])
    }

    pub(crate) fn addr(&self, page: usize) -> usize {
        self.host_addr + page * PAGE_SIZE
    }

    pub(crate) fn gpa_of(&self, page: usize) -> u64 {
        self.gpa + (page * PAGE_SIZE) as u64
    }

    /// The page index of `addr`, if the region holds it.
    pub(crate) fn page_of(&self, addr: usize) -> Option<usize> {
        let page = addr.checked_sub(self.host_addr)? / PAGE_SIZE;
        (page < self.pages).then_some(page)
    }

    fn key(&self, page: usize) -> i64 {
        vma_key(page, self.slot(page))
    }

    /// Change in the region's VMA count if pages `first..first+n` all became `slot`
    /// (for a pool slot: the first page on `idx`, the next ones on `idx+1`, ...).
    pub(crate) fn run_delta(&self, first: usize, n: usize, slot: Slot) -> isize {
        let new = vma_key(first, slot);
        let last = first + n - 1;
        let lo = first.saturating_sub(1);
        let hi = (last + 1).min(self.pages - 1);
        let before = (lo..hi).filter(|&j| self.key(j) != self.key(j + 1)).count() as isize;
        let mut after = 0;
        if first > 0 && self.key(first - 1) != new {
            after += 1;
        }
        if last + 1 < self.pages && self.key(last + 1) != new {
            after += 1;
        }
        after - before
    }

    /// Sets one slot; returns the change in the region's VMA count.
    fn set(&mut self, page: usize, slot: Slot) -> isize {
        let (old, new) = (self.key(page), vma_key(page, slot));
        let mut delta = 0isize;
        if old != new {
            let neighbours = [page.checked_sub(1), Some(page + 1).filter(|&j| j < self.pages)];
            for j in neighbours.into_iter().flatten() {
                let k = self.key(j);
                delta += (k != new) as isize - (k != old) as isize;
            }
        }
        self.slots[page] = slot.pack();
        self.vmas = self.vmas.wrapping_add_signed(delta);
        delta
    }

    /// Pages with their slots.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (usize, Slot)> + '_ {
        self.slots.iter().enumerate().map(|(i, &v)| (i, Slot::unpack(v)))
    }

    #[cfg(test)]
    pub(crate) fn vmas(&self) -> usize {
        self.vmas
    }
}

/// All registered regions, by host address.
#[derive(Default)]
pub(crate) struct Regions {
    map: BTreeMap<usize, RegionState>,
    next_id: u64,
    /// VMAs beyond one per region: what sharing costs in VMAs.
    vmas_added: usize,
}

impl Regions {
    pub(crate) fn add(&mut self, r: &Region, advice: Advice) -> Result<u64, Error> {
        let bad = |why| Err(Error::BadRange { host_addr: r.host_addr, len: r.len, why });
        if r.len == 0 || r.host_addr % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
            return bad("empty or not page aligned");
        }
        if r.gpa % PAGE_SIZE as u64 != 0 {
            return bad("guest address not page aligned");
        }
        let Some(end) = r.host_addr.checked_add(r.len) else {
            return bad("wraps around");
        };
        let before = self.map.range(..end).next_back();
        if before.is_some_and(|(_, b)| b.host_addr + b.pages * PAGE_SIZE > r.host_addr) {
            return bad("overlaps a registered region");
        }
        let pages = r.len / PAGE_SIZE;
        if pages as u64 > 1 << 31 {
            return bad("larger than 8 TiB");
        }
        let id = self.next_id;
        self.next_id += 1;
        let state = RegionState {
            id,
            vm: r.vm,
            gpa: r.gpa,
            host_addr: r.host_addr,
            pages,
            advice,
            slots: vec![ANON; pages],
            vmas: 1,
        };
        self.map.insert(r.host_addr, state);
        Ok(id)
    }

    /// The region holding `addr`.
    pub(crate) fn find(&self, addr: usize) -> Option<&RegionState> {
        let (_, r) = self.map.range(..=addr).next_back()?;
        r.page_of(addr).map(|_| r)
    }

    /// The region registered at `host_addr` with `id`, if it still is.
    pub(crate) fn get(&self, host_addr: usize, id: u64) -> Option<&RegionState> {
        self.map.get(&host_addr).filter(|r| r.id == id)
    }

    /// Sets the slot of a page of the region at `host_addr`.
    pub(crate) fn set_slot(&mut self, host_addr: usize, page: usize, slot: Slot) {
        let r = self.map.get_mut(&host_addr).expect("registered region");
        let d = r.set(page, slot);
        self.vmas_added = self.vmas_added.wrapping_add_signed(d);
    }

    /// Unregisters every region of `vm` and returns them.
    pub(crate) fn remove_vm(&mut self, vm: u32) -> Vec<RegionState> {
        let keys: Vec<usize> = self.map.values().filter(|r| r.vm == vm).map(|r| r.host_addr).collect();
        let removed: Vec<RegionState> = keys.iter().filter_map(|k| self.map.remove(k)).collect();
        for r in &removed {
            self.vmas_added -= r.vmas - 1;
        }
        removed
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &RegionState> {
        self.map.values()
    }

    /// `start..end` of every region, in address order.
    pub(crate) fn ranges(&self) -> Vec<(usize, usize)> {
        self.map.values().map(|r| (r.host_addr, r.host_addr + r.pages * PAGE_SIZE)).collect()
    }

    /// VMAs beyond one per region, as the model has them.
    pub(crate) fn vmas_added(&self) -> usize {
        self.vmas_added
    }

    pub(crate) fn metadata_bytes(&self) -> usize {
        self.map.values().map(|r| r.slots.capacity() * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(vm: u32, host_addr: usize, pages: usize) -> Region {
        Region { vm, gpa: 0, host_addr, len: pages * PAGE_SIZE }
    }

    /// VMAs counted from scratch.
    fn count(r: &RegionState) -> usize {
        1 + (1..r.pages).filter(|&j| r.key(j - 1) != r.key(j)).count()
    }

    #[test]
    fn registration_checks() {
        let mut rs = Regions::default();
        let a = Advice::default();
        assert!(rs.add(&region(0, 0x10_0000, 16), a).is_ok());
        assert!(rs.add(&region(0, 0x10_8000, 16), a).is_err(), "overlap");
        assert!(rs.add(&region(0, 0x0f_8000, 9), a).is_err(), "overlap from below");
        assert!(rs.add(&region(0, 0x0f_8000, 8), a).is_ok(), "adjacent");
        assert!(rs.add(&region(1, 0x20_0010, 1), a).is_err(), "unaligned");
        assert!(rs.add(&region(1, 0x20_0000, 0), a).is_err(), "empty");
        let r = rs.find(0x10_0000 + 5 * PAGE_SIZE + 7).unwrap();
        assert_eq!((r.page_of(0x10_5007), r.vm), (Some(5), 0));
        assert!(rs.find(0x11_0000).is_none());
        assert!(rs.get(0x10_0000, r.id).is_some() && rs.get(0x10_0000, r.id + 1).is_none());
        assert_eq!(rs.remove_vm(0).len(), 2);
        assert!(rs.find(0x10_0000).is_none());
    }

    #[test]
    fn slots_pack() {
        for s in [
            Slot::Anon,
            Slot::Zero,
            Slot::Pool { idx: 0, broken: false },
            Slot::Pool { idx: MAX_POOL_PAGES - 1, broken: true },
        ] {
            assert_eq!(Slot::unpack(s.pack()), s);
        }
    }

    #[test]
    fn incremental_vma_model_matches_a_recount() {
        let mut rs = Regions::default();
        let id = rs.add(&region(0, 0x100_0000, 64), Advice::default()).unwrap();
        let host = 0x100_0000;
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = (x % 64) as usize;
            let n = ((x >> 8) % 4) as usize + 1;
            let n = n.min(64 - page);
            let slot = match (x >> 16) % 4 {
                0 => Slot::Anon,
                1 => Slot::Zero,
                _ => Slot::Pool { idx: ((x >> 20) % 70) as u32, broken: (x >> 30) % 2 == 0 },
            };
            let r = rs.get(host, id).unwrap();
            let predicted = r.vmas() as isize + r.run_delta(page, n, slot);
            for i in 0..n {
                let s = match slot {
                    Slot::Pool { idx, broken } => Slot::Pool { idx: idx + i as u32, broken },
                    s => s,
                };
                rs.set_slot(host, page + i, s);
            }
            let r = rs.get(host, id).unwrap();
            assert_eq!(r.vmas(), count(r));
            assert_eq!(r.vmas() as isize, predicted);
            assert_eq!(rs.vmas_added(), r.vmas() - 1);
        }
    }
}
