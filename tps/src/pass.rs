//! The order of a pass: every chunk of registered RAM once, in a random order.
//!
//! ESX scans pages at random so that no part of memory is systematically late. Here
//! the unit is a chunk of 512 pages (2 MiB): chunks are visited in a random
//! permutation (`i -> (a*i + b) mod n`, `a` coprime with `n`, new `a` and `b` each
//! pass), and the pages inside a chunk in order. In-order pages cost one pagemap read
//! per chunk and, more important, let runs of consecutive identical pages in two
//! VMs land on consecutive pool pages, which one VMA maps.

/// Pages per chunk.
pub(crate) const CHUNK_PAGES: usize = 512;

/// A region as a pass sees it (the registration at the pass's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PassRegion {
    pub(crate) id: u64,
    pub(crate) host_addr: usize,
    pub(crate) vm: u32,
    pub(crate) gpa: u64,
    pub(crate) pages: usize,
}

/// Pages `first..first+pages` of `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) region: PassRegion,
    pub(crate) first: usize,
    pub(crate) pages: usize,
}

impl Chunk {
    pub(crate) fn addr(&self, i: usize) -> usize {
        self.region.host_addr + (self.first + i) * crate::PAGE_SIZE
    }

    pub(crate) fn gpa(&self, i: usize) -> u64 {
        self.region.gpa + ((self.first + i) * crate::PAGE_SIZE) as u64
    }
}

pub(crate) struct Pass {
    regions: Vec<PassRegion>,
    /// Chunks of regions `0..=i`.
    ends: Vec<u64>,
    chunks: u64,
    stride: u64,
    offset: u64,
    next: u64,
    total_pages: usize,
}

impl Pass {
    pub(crate) fn new(regions: Vec<PassRegion>, rng: &mut Rng) -> Self {
        let mut ends = Vec::with_capacity(regions.len());
        let mut chunks = 0u64;
        for r in &regions {
            chunks += r.pages.div_ceil(CHUNK_PAGES) as u64;
            ends.push(chunks);
        }
        let (mut stride, mut offset) = (1, 0);
        if chunks > 1 {
            stride = rng.next() % (chunks - 1) + 1;
            while gcd(stride, chunks) != 1 {
                stride = stride % (chunks - 1) + 1;
            }
            offset = rng.next() % chunks;
        }
        let total_pages = regions.iter().map(|r| r.pages).sum();
        Self { regions, ends, chunks, stride, offset, next: 0, total_pages }
    }

    /// Pages the pass covers.
    pub(crate) fn total_pages(&self) -> usize {
        self.total_pages
    }

    pub(crate) fn done(&self) -> bool {
        self.next >= self.chunks
    }

    pub(crate) fn next_chunk(&mut self) -> Option<Chunk> {
        if self.done() {
            return None;
        }
        let c = ((self.stride as u128 * self.next as u128 + self.offset as u128) % self.chunks as u128) as u64;
        self.next += 1;
        let ri = self.ends.partition_point(|&e| e <= c);
        let region = self.regions[ri];
        let before = if ri == 0 { 0 } else { self.ends[ri - 1] };
        let first = (c - before) as usize * CHUNK_PAGES;
        Some(Chunk { region, first, pages: (region.pages - first).min(CHUNK_PAGES) })
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// splitmix64: enough randomness for a scan order.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_page_once_in_random_order() {
        let regions = vec![
            PassRegion { id: 0, host_addr: 0x1000_0000, vm: 0, gpa: 0, pages: 3 * CHUNK_PAGES },
            PassRegion { id: 1, host_addr: 0x9000_0000, vm: 1, gpa: 0x1000, pages: 1000 },
            PassRegion { id: 2, host_addr: 0x7000_0000, vm: 1, gpa: 0, pages: 1 },
        ];
        let total: usize = regions.iter().map(|r| r.pages).sum();
        let mut rng = Rng::new(42);
        let mut orders = HashSet::new();
        for _ in 0..20 {
            let mut pass = Pass::new(regions.clone(), &mut rng);
            assert_eq!(pass.total_pages(), total);
            let mut seen = HashSet::new();
            let mut order = Vec::new();
            while let Some(c) = pass.next_chunk() {
                order.push((c.region.id, c.first));
                for i in 0..c.pages {
                    assert!(seen.insert(c.addr(i)), "page visited twice");
                }
                assert_eq!(c.gpa(1), c.region.gpa + (c.first as u64 + 1) * 4096);
            }
            assert!(pass.done() && pass.next_chunk().is_none());
            assert_eq!(seen.len(), total);
            orders.insert(order);
        }
        assert!(orders.len() > 1, "orders differ between passes");
    }

    #[test]
    fn empty_and_single() {
        let mut rng = Rng::new(1);
        assert!(Pass::new(vec![], &mut rng).done());
        let r = PassRegion { id: 0, host_addr: 0, vm: 0, gpa: 0, pages: 5 };
        let mut p = Pass::new(vec![r], &mut rng);
        assert_eq!(p.next_chunk().map(|c| (c.first, c.pages)), Some((0, 5)));
        assert!(p.done());
    }
}
