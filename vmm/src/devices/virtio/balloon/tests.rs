//! The balloon driven through its virtio-mmio transport by a test driver that
//! writes registers and split rings into guest memory by hand
//! ([`crate::devices::virtio::testing`]), so every kind of bad input a guest could
//! produce can be crafted: one test per rule of docs/balloon.md, "Bad input from the
//! guest".

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::device::SLICE_CHAINS;
use super::{features, BalloonConfig, TargetMode};
use crate::devices::bus::BusDevice;
use crate::devices::guest_errors::tests::{guest_lines, install_capture};
use crate::devices::guest_errors::GuestErrorKind;
use crate::devices::virtio::mmio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::devices::virtio::testing::{
    layout, Rig, BUFFERS, F_INDIRECT, F_NEXT, MIB, REG_QUEUE_DESC, REG_QUEUE_SEL, REG_STATUS,
};
use crate::devices::virtio::virtqueue::RingLayout;
use crate::devices::virtio::{VirtioDevice, Work, VIRTIO_F_VERSION_1};

const RUNNING: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

fn data_pages(h: &Rig) {
    for pfn in 0x1000..0x1100 {
        h.fill(pfn, 0xaa);
    }
}

fn standard(source: &str) -> Rig {
    Rig::standard(BalloonConfig::default(), source)
}

#[test]
fn inflate_frees_ranges_and_deflate_returns_pages() {
    let mut h = standard("t/inflate");
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
    assert_eq!(snap.guest_errors, 0);
}

#[test]
fn ballooned_pages_the_guest_touched_anyway_are_counted_at_deflate() {
    let mut h = standard("t/touched");
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
fn a_buffer_with_pfns_outside_ram_is_refused_whole() {
    let mut h = standard("t/outside");
    data_pages(&h);
    let hole = (guest_abi::BALLOON_MMIO_BASE >> 12) as u32;
    let beyond = ((32 * MIB) >> 12) as u32;
    let (a, l) = h.pfns(0, &[0x1001, hole, beyond, u32::MAX]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.used_idx(0), 1, "completed");
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.invalid_pfns, 3);
    assert_eq!(snap.ballooned_pages, 0, "not even the PFN in RAM");
    assert_eq!(h.byte(0x1001), 0xaa);
    assert_eq!(snap.guest_error_kinds["buffer"], 1, "one error per buffer, not per PFN");
    // Deflating PFNs outside RAM is refused the same way.
    let (a, l) = h.pfns(0x100, &[hole]);
    h.post(1, &[(a, l, false)], None);
    assert_eq!(h.dev.lock().unwrap().snapshot().invalid_pfns, 4);
}

#[test]
fn duplicated_pfns_count_once() {
    let mut h = standard("t/dup");
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
fn looping_and_badly_linked_chains_are_refused_whole() {
    let mut h = standard("t/loop");
    data_pages(&h);
    let (a, l) = h.pfns(0, &[0x1010]);
    // Two descriptors pointing at each other forever: each holds a real PFN.
    h.post(0, &[(a, l, false), (a, l, false)], Some(&[1, 0]));
    // A chain whose second link points outside the table.
    h.post(0, &[(a, l, false), (a, l, false)], Some(&[1, 200]));
    assert_eq!(h.used_idx(0), 2, "both chains were completed");
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.ballooned_pages, 0, "no PFN of a malformed chain is acted on");
    assert_eq!(h.byte(0x1010), 0xaa);
    assert_eq!(snap.guest_error_kinds["chain"], 2);
    assert!(!snap.needs_reset, "a malformed chain does not break the device");
}

#[test]
fn indirect_descriptors_are_refused_without_the_feature() {
    let mut h = standard("t/indirect");
    data_pages(&h);
    assert_eq!(h.dev.lock().unwrap().features() & 1 << 28, 0, "VIRTIO_F_INDIRECT_DESC is not offered");
    // An indirect table at BUFFERS + 0x1000 with one descriptor naming a PFN buffer.
    let (a, l) = h.pfns(0, &[0x1020]);
    let table = BUFFERS + 0x1000;
    let mem = h.ram.mem();
    mem.write_obj(a, GuestAddress(table)).unwrap();
    mem.write_obj(l, GuestAddress(table + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(table + 12)).unwrap();
    h.desc(0, 0, table, 16, F_INDIRECT, 0);
    h.make_available(0, 0);
    h.serve(0);
    assert_eq!(h.used_idx(0), 1);
    assert_eq!(h.byte(0x1020), 0xaa, "the indirect table was not followed");
    assert_eq!(h.dev.lock().unwrap().snapshot().guest_error_kinds["chain"], 1);
}

#[test]
fn buffers_outside_ram_of_the_wrong_direction_or_too_large_are_refused() {
    let mut h = standard("t/buffers");
    data_pages(&h);
    let (a, l) = h.pfns(0, &[0x1011]);
    h.post(0, &[(64 * MIB, 16, false)], None); // beyond guest RAM
    h.post(0, &[(a, l, true)], None); // device-writable inflate buffer
    h.post(0, &[(a, 3, false)], None); // not whole PFNs
    h.post(0, &[(BUFFERS, 257 * 4, false)], None); // more than 256 PFNs
                                                   // 15 one-PFN descriptors in one chain are one buffer of 15 PFNs.
    let pfns: Vec<u32> = (0x1040..0x104f).collect();
    let (b, _) = h.pfns(0x2000, &pfns);
    let many: Vec<(u64, u32, bool)> = (0..15).map(|i| (b + i * 4, 4, false)).collect();
    h.post(0, &many, None);
    assert_eq!(h.used_idx(0), 5);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.guest_error_kinds["buffer"], 4);
    assert_eq!(snap.ballooned_pages, 15);
    assert_eq!(h.byte(0x1011), 0xaa);
}

#[test]
fn stats_buffers_must_be_whole_entries() {
    let mut h = standard("t/stats");
    let stats_q = 2;
    let mut entry = Vec::new();
    for (tag, val) in [(4u16, 100u64 << 20), (5, 256 << 20), (999, 1)] {
        entry.extend_from_slice(&tag.to_le_bytes());
        entry.extend_from_slice(&val.to_le_bytes());
    }
    h.ram.mem().write_slice(&entry, GuestAddress(BUFFERS)).unwrap();
    h.post(stats_q, &[(BUFFERS, 30, false)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.guest_stats["free_memory"], 100 << 20);
    assert_eq!(snap.guest_stats["total_memory"], 256 << 20);
    assert_eq!(snap.guest_stats.len(), 2, "unknown tags are not kept");
    assert_eq!(h.used_idx(stats_q), 0, "the device holds the stats buffer");
    assert!(h.dev.lock().unwrap().request_stats());
    assert_eq!(h.used_idx(stats_q), 1, "asking for fresh stats returns it");
    assert!(!h.dev.lock().unwrap().request_stats(), "nothing to return until the guest answers");
    h.post(stats_q, &[(BUFFERS, 12, false)], None); // 12: the spec's "multiple of 6"
    h.post(stats_q, &[(BUFFERS, 65 * 10, false)], None); // more than 64 entries
    assert_eq!(h.used_idx(stats_q), 3, "refused buffers are returned at once");
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.stats_updates, 1);
    assert_eq!(snap.guest_error_kinds["buffer"], 2);
}

#[test]
fn reported_free_ranges_are_freed_when_in_ram() {
    let mut h = standard("t/report");
    data_pages(&h);
    let report_q = 3;
    h.post(report_q, &[(0x1000 * 4096, 32 * 4096, true), (0x1020 * 4096, 32 * 4096, true)], None);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.reported_pages, 64);
    assert_eq!(h.byte(0x1000), 0);
    assert_eq!(h.byte(0x1040), 0xaa);
    assert_eq!(snap.ballooned_pages, 0, "reported pages are not ballooned");
    // A chain with one range outside RAM, unaligned, device-readable or overlapping
    // another is refused whole: its good range is not freed either.
    let good = (0x1080 * 4096, 4096, true);
    h.post(report_q, &[good, (0x1800_0000, 4096, true)], None);
    h.post(report_q, &[good, (0x1040 * 4096 + 1, 4096, true)], None);
    h.post(report_q, &[good, (0x1040 * 4096, 4096, false)], None);
    h.post(report_q, &[good, (0x1040 * 4096, 0x41 * 4096, true)], None);
    assert_eq!(h.byte(0x1080), 0xaa);
    assert_eq!(h.byte(0x1040), 0xaa);
    assert_eq!(h.used_idx(report_q), 5);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!((snap.reported_pages, snap.reported_buffers), (64, 1));
    assert_eq!(snap.guest_error_kinds["buffer"], 4);
}

#[test]
fn reported_ranges_at_the_top_of_the_address_space_are_refused() {
    let mut h = standard("t/report-top");
    data_pages(&h);
    let report_q = 3;
    // gpa + len overflows u64: refused (it used to be computed before the check).
    h.post(report_q, &[(!0xfff, 2 * 4096, true)], None);
    // A range that starts in RAM and runs past its end.
    h.post(report_q, &[((32 * MIB) - 4096, 2 * 4096, true)], None);
    assert_eq!(h.used_idx(report_q), 2, "both buffers completed");
    assert_eq!(h.dev.lock().unwrap().snapshot().reported_pages, 0);
    assert_eq!(h.errors.count(GuestErrorKind::Buffer), 2);
}

#[test]
fn misaligned_rings_are_refused_not_replaced_by_gpa_0() {
    let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/misaligned");
    data_pages(&h);
    // A descriptor planted at GPA 0 naming a PFN buffer: what virtio-queue would
    // use if the misaligned address were replaced by its default.
    let (a, l) = h.pfns(0, &[0x1030]);
    h.ram.mem().write_obj(a, GuestAddress(0)).unwrap();
    h.ram.mem().write_obj(l, GuestAddress(8)).unwrap();
    let feats = h.dev.lock().unwrap().features();
    let mut layouts: Vec<_> = (0..4).map(|q| layout(q, 16)).collect();
    layouts[0].desc += 8;
    let status = h.negotiate(feats, &layouts);
    assert_ne!(status & STATUS_NEEDS_RESET, 0);
    assert_eq!(h.errors.count(GuestErrorKind::QueueConfig), 1);
    h.make_available(0, 0);
    h.serve(0);
    assert_eq!(h.byte(0x1030), 0xaa, "nothing was executed");
    assert_eq!(h.used_idx(0), 0);
}

#[test]
fn rings_at_gpa_0_outside_ram_or_overlapping_are_refused() {
    let feats = 1u64 << VIRTIO_F_VERSION_1;
    type Spoil = fn(&mut [RingLayout]);
    let cases: [(&str, Spoil); 4] = [
        ("gpa 0", |l| l[0].desc = 0),
        ("hole", |l| l[1].avail = 0xd000_0000),
        ("beyond ram", |l| l[1].used = 32 * MIB - 64),
        ("overlap", |l| l[1].used = l[0].desc),
    ];
    for (what, spoil) in cases {
        let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/rings");
        let mut layouts = [layout(0, 16), layout(1, 16)];
        spoil(&mut layouts);
        let status = h.negotiate(feats, &layouts);
        assert_ne!(status & STATUS_NEEDS_RESET, 0, "{what}");
        assert_eq!(h.errors.count(GuestErrorKind::QueueConfig), 1, "{what}");
    }
}

#[test]
fn a_broken_ring_stops_the_device_until_reset() {
    let mut h = standard("t/broken");
    data_pages(&h);
    // A head index beyond the queue: the device cannot even complete it.
    h.make_available(0, 200);
    h.serve(0);
    assert_eq!(h.reg(REG_STATUS), RUNNING | STATUS_NEEDS_RESET);
    assert!(h.dev.lock().unwrap().snapshot().needs_reset);
    let (a, l) = h.pfns(0, &[0x1000]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.byte(0x1000), 0xaa, "a broken device serves nothing");
    // A reset and a new setup bring it back.
    let feats = h.dev.lock().unwrap().features();
    let layouts: Vec<_> = (0..4).map(|q| layout(q, 16)).collect();
    assert_eq!(h.negotiate(feats, &layouts), RUNNING);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.byte(0x1000), 0);
    // An available index moved more than a queue's worth ahead breaks it too.
    let avail = layout(0, 16).avail;
    h.ram.mem().write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    h.serve(0);
    assert_ne!(h.reg(REG_STATUS) & STATUS_NEEDS_RESET, 0);
    assert_eq!(h.errors.count(GuestErrorKind::Ring), 2);
}

#[test]
fn status_changes_out_of_order_are_refused() {
    let mut h = standard("t/status");
    // Clearing DRIVER_OK without a reset, then moving a ring: both refused, and the
    // device keeps running on the rings it checked.
    h.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(h.reg(REG_STATUS), RUNNING);
    h.set(REG_QUEUE_SEL, 0);
    h.set(REG_QUEUE_DESC, 0x40_0000);
    data_pages(&h);
    let (a, l) = h.pfns(0, &[0x1000]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.byte(0x1000), 0, "served from the checked rings");
    assert_eq!(h.errors.count(GuestErrorKind::StatusOrder), 1);
    assert_eq!(h.errors.count(GuestErrorKind::QueueConfig), 1);

    // From reset: FEATURES_OK before DRIVER, DRIVER_OK before FEATURES_OK, unknown bits.
    let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/status2");
    h.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
    h.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
    h.set(REG_STATUS, STATUS_ACKNOWLEDGE | 0x100);
    assert_eq!(h.reg(REG_STATUS), 0);
    assert_eq!(h.errors.count(GuestErrorKind::StatusOrder), 3);
    // Features written before DRIVER are refused too.
    h.set(0x20, 1);
    assert_eq!(h.errors.count(GuestErrorKind::Features), 1);

    // FAILED stops a running device.
    let mut h = standard("t/status3");
    data_pages(&h);
    h.set(REG_STATUS, RUNNING | STATUS_FAILED);
    assert_eq!(h.reg(REG_STATUS), RUNNING | STATUS_FAILED);
    let (a, l) = h.pfns(0, &[0x1000]);
    h.post(0, &[(a, l, false)], None);
    assert_eq!(h.byte(0x1000), 0xaa, "its queues are gone");
}

#[test]
fn buffers_made_available_before_driver_ok_are_served_once_it_is_set() {
    // What Linux's balloon driver does with its statistics queue: it posts the
    // first buffer and notifies during probe, before DRIVER_OK.
    let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/early");
    let feats = h.dev.lock().unwrap().features();
    assert!(h.negotiate_features(feats));
    for q in 0..4 {
        h.set_queue(q, layout(q, 16));
    }
    h.size = 16;
    let mut entry = 4u16.to_le_bytes().to_vec();
    entry.extend_from_slice(&(7u64 << 20).to_le_bytes());
    h.ram.mem().write_slice(&entry, GuestAddress(BUFFERS)).unwrap();
    h.desc(2, 0, BUFFERS, 10, 0, 0);
    h.make_available(2, 0);
    h.set(0x050, 2); // notify, before DRIVER_OK
    assert_eq!(h.dev.lock().unwrap().process_queue(2), Work::Done, "not served before DRIVER_OK");
    assert_eq!(h.dev.lock().unwrap().snapshot().stats_updates, 0);
    while h.kicks[2].read().is_ok() {}
    h.set(REG_STATUS, RUNNING);
    assert_eq!(h.kicks[2].read().unwrap(), 1, "activation notifies the queue");
    h.serve(2);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.guest_stats["free_memory"], 7 << 20);
    // Linux takes its queues down after a reset: not an error either.
    h.set(REG_STATUS, 0);
    h.set(REG_QUEUE_SEL, 0);
    h.set(0x044, 0);
    assert_eq!(h.errors.total(), 0, "{:?}", h.errors.by_kind());
}

#[test]
fn register_accesses_of_the_wrong_width_or_place_are_counted() {
    let mut h = standard("t/regs");
    let mut two = [0u8; 2];
    h.mmio.read(0x070, &mut two);
    h.mmio.write(0x070, &[0u8; 8]);
    h.set(0x0c0, 1); // no register there
    h.reg(0x080); // write-only
    assert_eq!(h.errors.count(GuestErrorKind::Register), 4);
    assert_eq!(h.reg(REG_STATUS), RUNNING, "nothing changed");
}

#[test]
fn actual_beyond_memory_is_refused() {
    let h = standard("t/actual");
    let mut dev = h.dev.lock().unwrap();
    dev.write_config(4, &8192u32.to_le_bytes());
    dev.write_config(4, &u32::MAX.to_le_bytes());
    dev.write_config(4, &[1, 0]);
    let snap = dev.snapshot();
    assert_eq!(snap.actual_pages, 8192, "32 MiB is the whole VM: the largest allowed");
    assert_eq!(snap.guest_error_kinds["config"], 2);
}

#[test]
fn a_notification_of_many_chains_is_served_in_bounded_slices() {
    let mut h = Rig::with_queues(BalloonConfig::default(), "t/slices", 256);
    data_pages(&h);
    // 256 chains of 256 scattered PFNs (every other page of 0x800..0x2000).
    for c in 0..256u32 {
        let pfns: Vec<u32> = (0..256).map(|i| 0x800 + ((c * 256 + i) * 2) % 0x1800).collect();
        let (a, l) = h.pfns(c as u64 * 1024, &pfns);
        h.desc(0, c as u16, a, l, 0, 0);
        h.make_available(0, c as u16);
    }
    let mut completed = Vec::new();
    loop {
        let work = h.dev.lock().unwrap().process_queue(0);
        completed.push(h.used_idx(0));
        if work == Work::Done {
            break;
        }
    }
    assert!(completed.len() >= 256 / SLICE_CHAINS, "slices: {completed:?}");
    assert!(completed.windows(2).all(|w| w[1] > w[0]), "every slice completes chains: {completed:?}");
    assert!(completed[0] as usize <= SLICE_CHAINS);
    assert_eq!(h.used_idx(0), 256);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!((snap.inflated_pages, snap.duplicate_pfns), (3072, 65536 - 3072));
    assert_eq!(snap.discard_calls, 3072, "scattered pages: one madvise each");
    assert_eq!(h.byte(0x800), 0);
    assert_eq!(h.byte(0x1001), 0xaa, "odd pages were not offered");
}

#[test]
fn guest_errors_are_counted_in_64_bits_and_logged_once_per_kind() {
    install_capture();
    let mut h = standard("t/flood");
    for _ in 0..5000 {
        h.post(0, &[(64 * MIB, 4, false)], None);
        h.set(0x0c0, 1);
    }
    assert_eq!(h.errors.count(GuestErrorKind::Buffer), 5000);
    assert_eq!(h.errors.count(GuestErrorKind::Register), 5000);
    let snap = h.dev.lock().unwrap().snapshot();
    assert_eq!(snap.guest_errors, 10_000);
    assert_eq!(guest_lines("t/flood"), 2, "one line per kind in the interval");
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
    let cfg = BalloonConfig { stats_interval: Duration::ZERO, ..BalloonConfig::default() }; // no stats queue
    let mut h = Rig::standard(cfg, "t/dense");
    data_pages(&h);
    // Reporting is queue 2 when there is no stats queue.
    h.post(2, &[(0x1000 * 4096, 4096, true)], None);
    assert_eq!(h.dev.lock().unwrap().snapshot().reported_pages, 1);
}

#[test]
fn a_driver_that_negotiates_badly_gets_no_device() {
    let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/nego");
    let layouts = [layout(0, 16), layout(1, 16)];
    let status = h.negotiate(0, &layouts);
    assert_eq!(status & STATUS_FEATURES_OK, 0, "VERSION_1 is required");
    let status = h.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << features::FREE_PAGE_HINT, &layouts);
    assert_eq!(status & STATUS_FEATURES_OK, 0, "features not offered");
    assert_eq!(h.errors.count(GuestErrorKind::Features), 2);
}

#[test]
fn queue_sizes_must_be_powers_of_two() {
    let mut h = Rig::new(32 * MIB, BalloonConfig::default(), "t/qsize");
    let status = h.negotiate(1 << VIRTIO_F_VERSION_1, &[layout(0, 12), layout(1, 12)]);
    assert_ne!(status & STATUS_NEEDS_RESET, 0);
    assert_eq!(h.dev.lock().unwrap().process_queue(0), Work::Done);
    assert_eq!(h.dev.lock().unwrap().snapshot().ballooned_pages, 0);
}

#[test]
fn features_offered_follow_the_config() {
    let cfg = BalloonConfig { deflate_on_oom: false, free_page_reporting: false, ..BalloonConfig::default() };
    let h = Rig::new(32 * MIB, cfg, "t/feats");
    let f = h.dev.lock().unwrap().features();
    assert_eq!(f & (1 << features::DEFLATE_ON_OOM | 1 << features::PAGE_REPORTING), 0);
    assert_ne!(f & 1 << features::STATS_VQ, 0);
    assert_eq!(f & 1 << features::FREE_PAGE_HINT, 0);
}

#[test]
fn targets_beyond_memory_are_refused() {
    let h = Rig::new(32 * MIB, BalloonConfig::default(), "t/target");
    assert!(h.dev.lock().unwrap().set_target(64 * MIB).is_err());
    assert!(h.dev.lock().unwrap().set_target(4097).is_err());
    h.dev.lock().unwrap().set_target(16 * MIB).unwrap();
    let mut b = [0u8; 4];
    h.dev.lock().unwrap().read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 4096);
}

#[test]
fn linked_descriptors_cover_one_buffer() {
    // F_NEXT chains of plain buffers (what `post` builds) still work.
    let mut h = standard("t/linked");
    data_pages(&h);
    let (a, _) = h.pfns(0, &[0x1050, 0x1051]);
    h.desc(0, 5, a, 4, F_NEXT, 6);
    h.desc(0, 6, a + 4, 4, 0, 0);
    h.make_available(0, 5);
    h.serve(0);
    assert_eq!((h.byte(0x1050), h.byte(0x1051)), (0, 0));
}

#[test]
fn a_user_target_pins_the_balloon_until_released() {
    let h = Rig::new(32 * MIB, BalloonConfig::default(), "t/pin");
    let target = |h: &Rig| {
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
