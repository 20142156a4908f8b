//! Which pages to evict.
//!
//! - [`VictimPolicy::Random`]: uniformly random pages, as ESX does (the host cannot
//!   know which pages the guest values). A keyed pseudo-random permutation of all
//!   page indices is walked, so every page is visited once per cycle without any
//!   per-page state, and a new key starts the next cycle.
//! - [`VictimPolicy::Idle`]: pages not written for the longest time first. The VMM
//!   feeds write information from KVM dirty logging ([`Victims::note_dirty`], one
//!   call per memory slot per period); each page keeps an age (periods since it was
//!   last seen written, saturating at 255). A fault-in resets the page's age: a page
//!   the guest just read back is not idle, even though reads never reach the dirty
//!   log. Ties (and a VM with no dirty information yet) are broken by a clock hand
//!   that moves on from where the previous eviction stopped.
//!
//! Both only *propose* candidates; the evictor drops those that are not resident,
//! ballooned, shared, or zero.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How victims are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VictimPolicy {
    #[default]
    Random,
    Idle,
}

impl std::str::FromStr for VictimPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(VictimPolicy::Random),
            "idle" => Ok(VictimPolicy::Idle),
            _ => Err(format!("unknown victim policy {s:?} (random, idle)")),
        }
    }
}

/// A bijection of `[0, n)`: a keyed mix on the smallest power of two >= n, with
/// cycle walking for values >= n.
#[derive(Debug, Clone)]
struct Permutation {
    n: u32,
    bits: u32,
    keys: [u64; 3],
}

impl Permutation {
    fn new(n: u32, seed: u64) -> Permutation {
        let bits = if n <= 1 { 1 } else { 32 - (n - 1).leading_zeros() };
        let mut s = seed;
        let keys = [splitmix(&mut s), splitmix(&mut s), splitmix(&mut s)];
        Permutation { n, bits, keys }
    }

    fn mix(&self, mut x: u64) -> u64 {
        let mask = (1u64 << self.bits) - 1;
        let shift = self.bits / 2 + 1;
        for k in self.keys {
            // Odd multiplier and xor-shift are both bijective modulo 2^bits.
            x = (x.wrapping_mul(k | 1).wrapping_add(k >> 17)) & mask;
            x ^= x >> shift;
        }
        x
    }

    fn get(&self, i: u32) -> u32 {
        let mut x = self.mix(i as u64);
        while x >= self.n as u64 {
            x = self.mix(x);
        }
        x as u32
    }
}

/// splitmix64 step.
fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Inner {
    policy: VictimPolicy,
    seed: u64,
    perm: Permutation,
    /// Next index of the permutation to hand out.
    seq: u32,
    /// Candidates proposed during the current eviction (bounded by the page count).
    scanned: u32,
    /// Idle: the order of this eviction, and where it stands.
    order: Vec<u32>,
    pos: usize,
    hand: u32,
    periods: u64,
}

/// Victim selection state of one VM (page indices `0..pages`).
pub struct Victims {
    pages: u32,
    ages: Vec<AtomicU8>,
    inner: Mutex<Inner>,
}

impl Victims {
    pub fn new(pages: u32, policy: VictimPolicy, seed: u64) -> Victims {
        Victims {
            pages,
            ages: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            inner: Mutex::new(Inner {
                policy,
                seed,
                perm: Permutation::new(pages, seed),
                seq: 0,
                scanned: 0,
                order: Vec::new(),
                pos: 0,
                hand: 0,
                periods: 0,
            }),
        }
    }

    pub fn policy(&self) -> VictimPolicy {
        self.inner.lock().unwrap().policy
    }

    pub fn set_policy(&self, p: VictimPolicy) {
        self.inner.lock().unwrap().policy = p;
    }

    /// Dirty-log periods noted so far.
    pub fn periods(&self) -> u64 {
        self.inner.lock().unwrap().periods
    }

    /// Age of a page (periods since last seen written).
    pub fn age(&self, page: u32) -> u8 {
        self.ages[page as usize].load(Relaxed)
    }

    /// The page was just used (faulted back in): not idle.
    pub fn touched(&self, page: u32) {
        if let Some(a) = self.ages.get(page as usize) {
            a.store(0, Relaxed);
        }
    }

    /// One dirty-log period for `nbits` pages from `first_page`: pages whose bit is
    /// set were written (age 0), the others get one period older. Calls `written`
    /// for each written page.
    pub fn note_dirty(&self, first_page: u32, bitmap: &[u64], nbits: usize, mut written: impl FnMut(u32)) {
        let end = (first_page as usize + nbits).min(self.pages as usize);
        for p in first_page as usize..end {
            let i = p - first_page as usize;
            let dirty = bitmap.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
            if dirty {
                self.ages[p].store(0, Relaxed);
                written(p as u32);
            } else {
                let a = self.ages[p].load(Relaxed);
                self.ages[p].store(a.saturating_add(1), Relaxed);
            }
        }
        self.inner.lock().unwrap().periods += 1;
    }

    /// Start proposing candidates for one eviction request.
    pub fn begin(&self) {
        let mut g = self.inner.lock().unwrap();
        g.scanned = 0;
        if g.policy == VictimPolicy::Idle {
            // Counting sort by age, oldest first; equal ages in clock order from the hand.
            // Snapshot first: the fault thread resets ages concurrently.
            let n = self.pages as usize;
            let ages: Vec<u8> = self.ages.iter().map(|a| a.load(Relaxed)).collect();
            let mut count = [0usize; 256];
            for &a in &ages {
                count[a as usize] += 1;
            }
            let mut start = [0usize; 256];
            let mut acc = 0;
            for age in (0..256).rev() {
                start[age] = acc;
                acc += count[age];
            }
            let mut order = vec![0u32; n];
            let hand = g.hand as usize;
            for k in 0..n {
                let p = (hand + k) % n;
                let a = ages[p] as usize;
                order[start[a]] = p as u32;
                start[a] += 1;
            }
            g.order = order;
            g.pos = 0;
        }
    }

    /// Up to `max` candidates that `accept` takes (it sees each proposal once).
    /// An empty result means the whole VM was proposed during this request.
    pub fn next(&self, max: usize, mut accept: impl FnMut(u32) -> bool) -> Vec<u32> {
        let mut g = self.inner.lock().unwrap();
        let mut out = Vec::with_capacity(max);
        if self.pages == 0 {
            return out;
        }
        while out.len() < max && g.scanned < self.pages {
            let p = match g.policy {
                VictimPolicy::Random => {
                    if g.seq >= self.pages {
                        // A full cycle: continue with a new permutation.
                        g.seed = g.seed.wrapping_add(0x6a09_e667_f3bc_c909);
                        g.perm = Permutation::new(self.pages, g.seed);
                        g.seq = 0;
                    }
                    let p = g.perm.get(g.seq);
                    g.seq += 1;
                    p
                }
                VictimPolicy::Idle => {
                    if g.pos >= g.order.len() {
                        break;
                    }
                    let p = g.order[g.pos];
                    g.pos += 1;
                    p
                }
            };
            g.scanned += 1;
            if accept(p) {
                out.push(p);
                g.hand = (p + 1) % self.pages;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u32, 2, 3, 7, 64, 1000, 4097] {
            for seed in [0u64, 1, 0xdead_beef] {
                let p = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let v = p.get(i);
                    assert!(v < n);
                    assert!(!seen[v as usize], "n {n} seed {seed}: {v} twice");
                    seen[v as usize] = true;
                }
            }
        }
    }

    #[test]
    fn random_visits_every_page_once_per_request_and_looks_random() {
        let v = Victims::new(1000, VictimPolicy::Random, 42);
        v.begin();
        let mut all = Vec::new();
        loop {
            let b = v.next(64, |_| true);
            if b.is_empty() {
                break;
            }
            all.extend(b);
        }
        assert_eq!(all.len(), 1000);
        let mut s = all.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 1000);
        // Not sequential: few consecutive proposals are neighbours.
        let adjacent = all.windows(2).filter(|w| w[0].abs_diff(w[1]) == 1).count();
        assert!(adjacent < 50, "{adjacent}");
        // A new request continues the walk (and re-keys after a full cycle).
        v.begin();
        assert_eq!(v.next(10, |_| true).len(), 10);
    }

    #[test]
    fn accept_filters_and_budget_ends() {
        let v = Victims::new(100, VictimPolicy::Random, 1);
        v.begin();
        let b = v.next(1000, |p| p % 2 == 0);
        assert_eq!(b.len(), 50);
        assert!(v.next(1, |_| true).is_empty());
    }

    #[test]
    fn idle_prefers_old_pages() {
        let v = Victims::new(256, VictimPolicy::Idle, 0);
        // Pages 0..64 written every period, 64..128 written in the first only.
        for period in 0..5 {
            let mut bm = vec![0u64; 4];
            bm[0] = !0;
            if period == 0 {
                bm[1] = !0;
            }
            let mut seen = 0;
            v.note_dirty(0, &bm, 256, |_| seen += 1);
            assert_eq!(seen, if period == 0 { 128 } else { 64 });
        }
        assert_eq!(v.periods(), 5);
        assert_eq!(v.age(0), 0);
        assert_eq!(v.age(64), 4);
        assert_eq!(v.age(200), 5);
        v.begin();
        let first = v.next(128, |_| true);
        // Never-written pages (age 5) come first, then age 4; the hot ones last.
        assert!(first[..128].iter().all(|&p| p >= 64));
        assert!(first[..128].iter().filter(|&&p| p >= 128).count() == 128);
        let rest = v.next(1000, |_| true);
        assert_eq!(rest.len(), 128);
        assert!(rest[..64].iter().all(|&p| (64..128).contains(&p)));
        assert!(rest[64..].iter().all(|&p| p < 64));
        // A fault-in makes a page young again.
        v.touched(200);
        assert_eq!(v.age(200), 0);
    }
}
