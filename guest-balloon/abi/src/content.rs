//! What every page of the test guest's workload holds, as a pure function.
//!
//! Reclamation must never change what a guest reads, so the guest fills each page it
//! allocates with content it can recompute and later verifies. The function lives
//! here so the host side (tests, the page-sharing scanner's checks) can compute the
//! same bytes.
//!
//! A page's content is determined by one 64-bit **key**: key 0 is the zero page;
//! any other key gives 512 words `word(key, i) = splitmix64(key + (i + 1) * GAMMA)`,
//! which is fast (two multiplications per 8 bytes) and incompressible. The key comes
//! from how the page was last written:
//!
//! | written by | key |
//! |---|---|
//! | `alloc zero` | 0 |
//! | `alloc dup` | [`DUP_KEY`], the same in every VM |
//! | `alloc shared:SEED` | from `SEED` and the page's index in its allocation: the same in every VM using that seed |
//! | `alloc unique` | from the VM's seed and a per-VM count of unique pages: different in every VM |
//! | `alloc compressible:PCT` | like `unique`, in its own domain, with PCT in the key (below) |
//!
//! Every key but the zero page's and `compressible` ones is odd. An even non-zero key
//! is a **compressible** page: bits 1..=7 hold PCT (1..=100), the first
//! `ceil(512 * PCT / 100)` words are `word` as above and the others all
//! [`FILLER`], so lz4 or zstd compress the page to about PCT% of its size.
//! | `touch` | from the VM's seed, the page's frame number and its version (1, 2, ... per touch) |

use crate::workload::Kind;

/// 64-bit words in a page.
pub const WORDS_PER_PAGE: usize = 512;
/// A page as the content functions see it.
pub type Page = [u64; WORDS_PER_PAGE];

/// Key of the zero page.
pub const ZERO_KEY: u64 = 0;
/// Key of every `dup` page.
pub const DUP_KEY: u64 = 0x6475_705f_7061_6765; // "dup_page"

/// Every word of a compressible page past its random part.
pub const FILLER: u64 = 0x636f_6d70_7265_7373; // "compress"

/// The splitmix64 increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
// Domain separators: a shared seed equal to some VM's seed must not give that VM's
// unique pages, nor its touched ones.
const SHARED: u64 = 0x5348_4152_4544_0001;
const UNIQUE: u64 = 0x554e_4951_5545_0002;
const TOUCHED: u64 = 0x544f_5543_4845_0003;
const COMPRESSIBLE: u64 = 0x434f_4d50_5245_0004;

/// The splitmix64 output function: a bijective 64-bit mixer.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A non-zero key from three inputs (zero is reserved for the zero page).
fn derive(domain: u64, a: u64, b: u64) -> u64 {
    mix(mix(mix(domain ^ a) ^ b)) | 1
}

/// Key of a page written by `alloc` with `kind`. `index` is the page's index within
/// its allocation for [`Kind::Shared`], and the number of `unique` pages the VM
/// allocated before this one for [`Kind::Unique`]; other kinds ignore it.
pub fn alloc_key(kind: Kind, index: u64, vm_seed: u64) -> u64 {
    match kind {
        Kind::Zero => ZERO_KEY,
        Kind::Dup => DUP_KEY,
        Kind::Shared(seed) => derive(SHARED, seed, index),
        Kind::Unique => derive(UNIQUE, vm_seed, index),
        Kind::Compressible(pct) => {
            let pct = pct.clamp(1, 100) as u64;
            (derive(COMPRESSIBLE ^ pct, vm_seed, index) & !0xff) | (pct << 1)
        }
    }
}

/// Words of a page with `key` that are pseudo-random (the rest are [`FILLER`]).
#[inline(always)]
fn random_words(key: u64) -> usize {
    if key & 1 == 0 && key != ZERO_KEY {
        (WORDS_PER_PAGE * ((key >> 1) & 0x7f) as usize).div_ceil(100)
    } else {
        WORDS_PER_PAGE
    }
}

/// Key of frame `pfn` after its `version`-th `touch` (version >= 1).
pub fn touch_key(vm_seed: u64, pfn: u64, version: u32) -> u64 {
    derive(TOUCHED ^ vm_seed, pfn, version as u64)
}

/// Word `i` of the page with `key`.
#[inline(always)]
pub fn word(key: u64, i: usize) -> u64 {
    if key == ZERO_KEY {
        0
    } else if i >= random_words(key) {
        FILLER
    } else {
        mix(key.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)))
    }
}

/// Writes the page with `key`.
pub fn fill(page: &mut Page, key: u64) {
    if key == ZERO_KEY {
        page.fill(0);
        return;
    }
    for (i, w) in page.iter_mut().enumerate() {
        *w = word(key, i);
    }
}

/// Whether `page` holds exactly the page with `key`.
pub fn matches(page: &Page, key: u64) -> bool {
    page.iter().enumerate().all(|(i, &w)| w == word(key, i))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, collections::HashSet};

    use super::*;

    fn page(key: u64) -> Box<Page> {
        let mut p = Box::new([0xdead_beef; WORDS_PER_PAGE]);
        fill(&mut p, key);
        p
    }

    #[test]
    fn fill_then_match() {
        for key in [ZERO_KEY, DUP_KEY, alloc_key(Kind::Unique, 3, 9), touch_key(9, 100, 2)] {
            let mut p = page(key);
            assert!(matches(&p, key));
            p[511] ^= 1 << 63;
            assert!(!matches(&p, key), "one flipped bit is seen");
        }
        assert!(page(ZERO_KEY).iter().all(|&w| w == 0));
        assert!(!matches(&page(ZERO_KEY), DUP_KEY));
        assert_eq!(word(DUP_KEY, 7), page(DUP_KEY)[7], "word() agrees with fill()");
    }

    #[test]
    fn keys_follow_the_rules() {
        // Zero and dup ignore the seeds; shared ignores the VM seed; unique needs it.
        assert_eq!(alloc_key(Kind::Zero, 5, 1), ZERO_KEY);
        assert_eq!(alloc_key(Kind::Dup, 5, 1), alloc_key(Kind::Dup, 6, 2));
        assert_eq!(alloc_key(Kind::Shared(7), 5, 1), alloc_key(Kind::Shared(7), 5, 2));
        assert_ne!(alloc_key(Kind::Shared(7), 5, 1), alloc_key(Kind::Shared(8), 5, 1));
        assert_ne!(alloc_key(Kind::Shared(7), 5, 1), alloc_key(Kind::Shared(7), 6, 1));
        assert_ne!(alloc_key(Kind::Unique, 5, 1), alloc_key(Kind::Unique, 5, 2));
        assert_ne!(alloc_key(Kind::Unique, 5, 1), alloc_key(Kind::Shared(1), 5, 1), "domains differ");
        assert_ne!(touch_key(1, 5, 1), touch_key(1, 5, 2));
        assert_ne!(touch_key(1, 5, 1), touch_key(2, 5, 1));
    }

    #[test]
    fn pages_of_one_vm_are_all_different() {
        let mut seen = HashSet::new();
        for i in 0..2000 {
            for key in [alloc_key(Kind::Unique, i, 42), alloc_key(Kind::Shared(3), i, 42), touch_key(42, i, 1)] {
                assert_ne!(key, ZERO_KEY);
                assert!(seen.insert(page(key)[0..4].to_vec()), "pages repeat at index {i}");
            }
        }
    }

    #[test]
    fn content_is_incompressible() {
        // Roughly half the bits set and no repeated word.
        let p = page(alloc_key(Kind::Unique, 0, 1));
        let ones: u32 = p.iter().map(|w| w.count_ones()).sum();
        assert!((15_500..17_300).contains(&ones), "{ones} of 32768 bits set");
        assert_eq!(p.iter().collect::<HashSet<_>>().len(), WORDS_PER_PAGE);
    }

    #[test]
    fn compressible_pages_have_their_share_of_random_words() {
        for pct in [1u8, 25, 50, 100] {
            let key = alloc_key(Kind::Compressible(pct), 3, 1);
            assert!(key != ZERO_KEY && key & 1 == 0, "{key:#x}");
            let p = page(key);
            assert!(matches(&p, key));
            let random = (512 * pct as usize).div_ceil(100);
            assert!(p[..random].iter().all(|&w| w != FILLER), "{pct}%");
            assert!(p[random..].iter().all(|&w| w == FILLER), "{pct}%");
            assert_ne!(key, alloc_key(Kind::Compressible(pct), 4, 1));
            assert_ne!(key, alloc_key(Kind::Compressible(pct), 3, 2));
        }
        assert_ne!(alloc_key(Kind::Compressible(50), 3, 1) >> 8, alloc_key(Kind::Compressible(51), 3, 1) >> 8);
    }

    #[test]
    fn the_function_is_stable() {
        // The host side depends on these exact bytes (values computed independently).
        assert_eq!(word(DUP_KEY, 0), 0x4310_38e4_4ec9_1966);
        assert_eq!(alloc_key(Kind::Shared(5), 0, 0), 0xd838_df12_48ab_25a3);
    }
}
