//! The balloon driven through its virtio-mmio transport by a test driver that
//! writes registers and split rings into guest memory by hand, so every kind of bad
//! input a guest could produce can be crafted.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{features, Balloon, BalloonConfig, TargetMode};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::devices::virtio::{GuestErrors, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::{GuestRam, HostPages};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 16;
/// Where the test driver puts its rings (one 4 KiB page per queue) and buffers.
const RINGS: u64 = 0x10_0000;
const BUFFERS: u64 = 0x20_0000;

struct Harness {
    ram: Arc<GuestRam>,
    dev: Arc<Mutex<Balloon>>,
    mmio: MmioTransport<Balloon>,
    errors: Arc<GuestErrors>,
    /// Next free descriptor and avail index per queue.
    next: Vec<(u16, u16)>,
}

impl Harness {
    fn new(cfg: BalloonConfig) -> Harness {
        let ram = Arc::new(GuestRam::new(32 * MIB, HostPages::Small).unwrap());
        let interrupt = Arc::new(Interrupt::default());
        let errors = Arc::new(GuestErrors::default());
        let generation = Arc::new(AtomicU32::new(0));
        let dev = Arc::new(Mutex::new(Balloon::new(
            "test/balloon",
            cfg,
            ram.clone(),
            interrupt.clone(),
            errors.clone(),
            generation.clone(),
        )));
        let notify = (0..4).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let mmio = MmioTransport::new(
            "test/balloon",
            dev.clone(),
            ram.mem().clone(),
            interrupt,
            errors.clone(),
            notify,
            generation,
        );
        Harness { ram, dev, mmio, errors, next: vec![(0, 0); 4] }
    }

    fn reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set(&mut self, offset: u64, v: u32) {
        self.mmio.write(offset, &v.to_le_bytes());
    }

    /// Negotiates `feats` and sets up `queues` queues of `size`; returns the status.
    fn negotiate(&mut self, feats: u64, queues: u32, size: u32) -> u32 {
        assert_eq!(self.reg(0), 0x7472_6976);
        assert_eq!(self.reg(8), 5);
        self.set(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.set(0x24, 0);
        self.set(0x20, feats as u32);
        self.set(0x24, 1);
        self.set(0x20, (feats >> 32) as u32);
        self.set(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.reg(0x70) & STATUS_FEATURES_OK == 0 {
            return self.reg(0x70);
        }
        for q in 0..queues {
            let base = RINGS + q as u64 * 0x1000;
            self.set(0x30, q);
            assert!(self.reg(0x34) >= QSIZE as u32);
            self.set(0x38, size);
            self.set(0x80, base as u32);
            self.set(0x90, (base + 0x100) as u32);
            self.set(0xa0, (base + 0x200) as u32);
            self.set(0x44, 1);
        }
        self.set(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        self.reg(0x70)
    }

    fn standard(cfg: BalloonConfig) -> Harness {
        let mut h = Harness::new(cfg);
        let feats = h.dev.lock().unwrap().features();
        let queues = h.dev.lock().unwrap().queue_count(feats) as u32;
        let status = h.negotiate(feats, queues, QSIZE as u32);
        assert_eq!(status & STATUS_NEEDS_RESET, 0);
        h
    }

    /// Adds a chain of `(addr, len, write_only)` buffers to queue `q`, linked
    /// through `next` unless `links` overrides them, and notifies.
    fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)], links: Option<&[u16]>) {
        let base = RINGS + q as u64 * 0x1000;
        let mem = self.ram.mem();
        let (first, avail_idx) = self.next[q];
        for (i, &(addr, len, wo)) in bufs.iter().enumerate() {
            let idx = (first + i as u16) % QSIZE;
            let has_next = i + 1 < bufs.len() || links.is_some();
            let next = links.map_or((idx + 1) % QSIZE, |l| l[i]);
            let flags = (has_next as u16) | ((wo as u16) << 1);
            let d = base + idx as u64 * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(first, GuestAddress(base + 0x100 + 4 + (avail_idx % QSIZE) as u64 * 2)).unwrap();
        mem.write_obj(avail_idx.wrapping_add(1), GuestAddress(base + 0x100 + 2)).unwrap();
        self.next[q] = ((first + bufs.len() as u16) % QSIZE, avail_idx.wrapping_add(1));
        self.dev.lock().unwrap().process_queue(q);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.ram.mem().read_obj(GuestAddress(RINGS + q as u64 * 0x1000 + 0x200 + 2)).unwrap()
    }

    /// Writes PFNs as le32 at `BUFFERS + off` and returns (addr, len).
    fn pfns(&self, off: u64, pfns: &[u32]) -> (u64, u32) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.ram.mem().write_slice(&bytes, GuestAddress(BUFFERS + off)).unwrap();
        (BUFFERS + off, bytes.len() as u32)
    }

    fn fill(&self, pfn: u64, byte: u8) {
        self.ram.mem().write_slice(&[byte; 4096], GuestAddress(pfn * 4096)).unwrap();
    }

    fn byte(&self, pfn: u64) -> u8 {
        self.ram.mem().read_obj(GuestAddress(pfn * 4096 + 100)).unwrap()
    }
}

fn data_pages(h: &Harness) {
    for pfn in 0x1000..0x1100 {
        h.fill(pfn, 0xaa);
    }
}

#[test]
fn inflate_frees_ranges_and_deflate_returns_pages() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let rss_before = h.ram.resident_bytes();
    let pfns: Vec<u32> = (0x1000..0x1080).rev().collect(); // unsorted on purpose
    let (a, l) = h.pfns(0, &pfns);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.used_idx(0), 1);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!((snap.inflated_pages, snap.ballooned_pages), (128, 128));
    assert_eq!(snap.discard_calls, 1, "one madvise for one contiguous run");
    assert_eq!(h.byte(0x1000), 0, "ballooned page reads zero");
    assert_eq!(h.byte(0x1080), 0xaa, "its neighbour is untouched");
    assert!(h.ram.resident_bytes() <= rss_before - 120 * 4096);
    let (a, l) = h.pfns(0x1000, &[0x1000, 0x1001]);
    h.post(1, &[(a, l, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!((snap.deflated_pages, snap.ballooned_pages), (2, 126));
    assert!(!h.dev.lock().unwrap().ballooned().contains(0x1000));
}

#[test]
fn ballooned_pages_the_guest_touched_anyway_are_counted_at_deflate() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let (a, l) = h.pfns(0, &[0x1000, 0x1001, 0x1002, 0x1003]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.byte(0x1001), 0, "a ballooned page reads zero");
    h.fill(0x1002, 0x55);
    let (a, l) = h.pfns(0x100, &[0x1000, 0x1001, 0x1002, 0x1003]);
    h.post(1, &[(a, l, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.deflated_pages, 4);
    assert_eq!(snap.touched_pages, 2, "one page read (zero page), one written");
}

#[test]
fn pfns_outside_ram_or_in_the_hole_free_nothing() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let hole = (guest_abi::BALLOON_MMIO_BASE >> 12) as u32;
    let beyond = ((32 * MIB) >> 12) as u32;
    let (a, l) = h.pfns(0, &[hole, beyond, u32::MAX, 0x1001]);
    h.post(0, &[(a, l, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.invalid_pfns, 3);
    assert_eq!(snap.ballooned_pages, 1);
    assert_eq!(h.byte(0x1000), 0xaa);
    assert_eq!(h.byte(0x1001), 0);
    assert!(h.errors.count() >= 3);
}

#[test]
fn duplicated_pfns_count_once() {
    let mut h = Harness::standard(BalloonConfig::default());
    let (a, l) = h.pfns(0, &[0x1005, 0x1005, 0x1006, 0x1005]);
    h.post(0, &[(a, l, false)], None);
    let (a, l) = h.pfns(0x100, &[0x1006]);
    h.post(0, &[(a, l, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.ballooned_pages, 2);
    assert_eq!(snap.duplicate_pfns, 3, "repeats within a buffer and re-inflating a ballooned page");
    let (a, l) = h.pfns(0x200, &[0x1007]);
    h.post(1, &[(a, l, false)], None);
    assert_eq!(h.dev.lock().unwrap().snapshot().duplicate_pfns, 4, "deflating a page not in the balloon");
}

#[test]
fn looping_chains_and_buffers_outside_ram_are_completed_without_effect() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let (a, l) = h.pfns(0, &[0x1010]);
    // Two descriptors pointing at each other forever.
    h.post(0, &[(a, l, false), (a, l, false)], Some(&[1, 0]));
    assert_eq!(h.used_idx(0), 1, "the chain was completed");
    // A buffer beyond guest RAM.
    h.post(0, &[(64 * MIB, 16, false)], None);
    // A device-writable inflate buffer, and a length that is not a multiple of 4.
    h.post(0, &[(a, l, true)], None);
    h.post(0, &[(a, 3, false)], None);
    assert_eq!(h.used_idx(0), 4);
    assert!(h.errors.count() >= 3);
    let snap = h.dev.lock().unwrap().snapshot();
    assert!(snap.ballooned_pages <= 1, "only the looping chain's real PFN may count");
    assert_eq!(h.byte(0x1011), 0xaa);
}

#[test]
fn stats_buffers_must_be_whole_entries() {
    let mut h = Harness::standard(BalloonConfig::default());
    let stats_q = 2;
    let mut entry = Vec::new();
    for (tag, val) in [(4u16, 100u64 << 20), (5, 256 << 20)] {
        entry.extend_from_slice(&tag.to_le_bytes());
        entry.extend_from_slice(&val.to_le_bytes());
    }
    h.ram.mem().write_slice(&entry, GuestAddress(BUFFERS)).unwrap();
    h.post(stats_q, &[(BUFFERS, 20, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.guest_stats["free_memory"], 100 << 20);
    assert_eq!(snap.guest_stats["total_memory"], 256 << 20);
    assert_eq!(h.used_idx(stats_q), 0, "the device holds the stats buffer");
    assert!(h.dev.lock().unwrap().request_stats());
    assert_eq!(h.used_idx(stats_q), 1, "asking for fresh stats returns it");
    assert!(!h.dev.lock().unwrap().request_stats(), "nothing to return until the guest answers");
    h.post(stats_q, &[(BUFFERS, 12, false)], None); // 12: the spec's "multiple of 6"
    assert_eq!(h.dev.lock().unwrap().snapshot().stats_updates, 1);
    assert!(h.errors.count() >= 1);
}

#[test]
fn reported_free_ranges_are_freed_when_in_ram() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let report_q = 3;
    h.post(report_q, &[(0x1000 * 4096, 64 * 4096, true), (0x1800_0000, 4096, true)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.reported_pages, 64);
    assert_eq!(h.byte(0x1000), 0);
    assert_eq!(h.byte(0x1040), 0xaa);
    assert_eq!(snap.ballooned_pages, 0, "reported pages are not ballooned");
    // Unaligned or device-readable descriptors are refused.
    h.post(report_q, &[(0x1040 * 4096 + 1, 4096, true)], None);
    h.post(report_q, &[(0x1040 * 4096, 4096, false)], None);
    assert_eq!(h.byte(0x1040), 0xaa);
    assert_eq!(h.used_idx(report_q), 3);
}

#[test]
fn reported_ranges_at_the_top_of_the_address_space_are_refused() {
    let mut h = Harness::standard(BalloonConfig::default());
    data_pages(&h);
    let report_q = 3;
    // gpa + len overflows u64: refused (it used to be computed before the check).
    h.post(report_q, &[(!0xfff, 2 * 4096, true)], None);
    // A range that starts in RAM and runs past its end.
    h.post(report_q, &[((32 * MIB) - 4096, 2 * 4096, true)], None);
    assert_eq!(h.used_idx(report_q), 2, "both buffers completed");
    assert_eq!(h.dev.lock().unwrap().snapshot().reported_pages, 0);
    assert!(h.errors.count() >= 2);
}

#[test]
fn boot_sizes_are_checked_like_run_time_targets() {
    let cfg = |size| BalloonConfig { size, ..BalloonConfig::default() };
    assert!(cfg(16 * MIB).validate(32 * MIB).is_ok());
    assert!(cfg(32 * MIB).validate(32 * MIB).is_ok());
    assert!(cfg(64 * MIB).validate(32 * MIB).unwrap_err().contains("exceeds"));
    assert!(cfg(4097).validate(32 * MIB).unwrap_err().contains("4 KiB"));
}

#[test]
fn queues_are_numbered_densely() {
    let cfg = BalloonConfig { stats_interval: std::time::Duration::ZERO, ..BalloonConfig::default() }; // no stats queue
    let mut h = Harness::standard(cfg);
    data_pages(&h);
    // Reporting is queue 2 when there is no stats queue.
    h.post(2, &[(0x1000 * 4096, 4096, true)], None);
    assert_eq!(h.dev.lock().unwrap().snapshot().reported_pages, 1);
}

#[test]
fn a_driver_that_negotiates_nothing_gets_no_device() {
    let mut h = Harness::new(BalloonConfig::default());
    let status = h.negotiate(0, 2, QSIZE as u32);
    assert_eq!(status & STATUS_FEATURES_OK, 0, "VERSION_1 is required");
    assert!(h.errors.count() >= 1);
}

#[test]
fn queue_sizes_must_be_powers_of_two() {
    let mut h = Harness::new(BalloonConfig::default());
    let status = h.negotiate(1 << VIRTIO_F_VERSION_1, 2, 12);
    assert_ne!(status & STATUS_NEEDS_RESET, 0);
    let (a, l) = h.pfns(0, &[0x1000]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.dev.lock().unwrap().snapshot().ballooned_pages, 0);
}

#[test]
fn features_offered_follow_the_config() {
    let cfg = BalloonConfig { deflate_on_oom: false, free_page_reporting: false, ..BalloonConfig::default() };
    let h = Harness::new(cfg);
    let f = h.dev.lock().unwrap().features();
    assert_eq!(f & (1 << features::DEFLATE_ON_OOM | 1 << features::PAGE_REPORTING), 0);
    assert_ne!(f & 1 << features::STATS_VQ, 0);
    assert_eq!(f & 1 << features::FREE_PAGE_HINT, 0);
}

#[test]
fn targets_beyond_memory_are_refused() {
    let h = Harness::new(BalloonConfig::default());
    assert!(h.dev.lock().unwrap().set_target(64 * MIB).is_err());
    assert!(h.dev.lock().unwrap().set_target(4097).is_err());
    h.dev.lock().unwrap().set_target(16 * MIB).unwrap();
    let mut b = [0u8; 4];
    h.dev.lock().unwrap().read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 4096);
}

#[test]
fn a_user_target_pins_the_balloon_until_released() {
    let h = Harness::new(BalloonConfig::default());
    let target = |h: &Harness| {
        let s = h.dev.lock().unwrap().snapshot();
        (s.target_pages, s.target_mode)
    };
    // From boot the policy may move it; past the VM's memory is capped.
    assert!(h.dev.lock().unwrap().set_auto_target(100));
    assert_eq!(target(&h), (100, TargetMode::Auto));
    assert!(h.dev.lock().unwrap().set_auto_target(u64::MAX));
    assert_eq!(target(&h).0, 32 * MIB / guest_abi::PAGE_SIZE);
    // The user's target pins it: the policy's is refused.
    h.dev.lock().unwrap().set_target(MIB).unwrap();
    assert!(!h.dev.lock().unwrap().set_auto_target(100));
    assert_eq!(target(&h), (256, TargetMode::Pinned));
    // Handed back: the policy moves it from where it is.
    h.dev.lock().unwrap().release_target();
    assert_eq!(target(&h), (256, TargetMode::Auto));
    assert!(h.dev.lock().unwrap().set_auto_target(0));
    assert_eq!(target(&h), (0, TargetMode::Auto));
}
