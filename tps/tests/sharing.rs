//! The scanner on guest-RAM-like memory: what gets shared, what is left alone, and
//! that the counters, the VMAs and the contents stay true.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pagestate::{GuestVm, PAGE_SIZE};
use tps::Scanner;

const P: u64 = PAGE_SIZE as u64;

fn shared_key(i: usize) -> u64 {
    0x5000_0000 + i as u64
}

fn unique_key(vm: u32, i: usize) -> u64 {
    ((vm as u64 + 1) << 40) | i as u64
}

/// Per VM: 512 pages common to all VMs, 256 zero pages, 256 pages of its own.
fn mixed_key(vm: u32, i: usize) -> u64 {
    match i {
        0..512 => shared_key(i),
        512..768 => 0,
        _ => unique_key(vm, i),
    }
}

fn mixed(vm: u32) -> GuestMem {
    let m = GuestMem::new(1024);
    for i in 0..1024 {
        m.write(i, mixed_key(vm, i));
    }
    m
}

fn verify_mixed(m: &GuestMem, vm: u32) {
    for i in 0..1024 {
        assert!(m.holds(i, mixed_key(vm, i)), "vm {vm} page {i} changed");
    }
}

/// Two mixed VMs under a fast scanner, after two passes.
fn two_mixed_vms() -> (GuestMem, GuestMem, Scanner, Arc<Recorder>) {
    let (a, b) = (mixed(0), mixed(1));
    let (s, rec) = fast_scanner(|_| {});
    rec.add(&s, &a);
    rec.add(&s, &b);
    passes(&s, 2);
    (a, b, s, rec)
}

#[test]
fn shares_across_vms_and_frees_zero_pages() {
    let (a, b) = (mixed(0), mixed(1));
    let (s, rec) = fast_scanner(|_| {});
    assert_eq!(private_pages(&a) + private_pages(&b), 2048);
    rec.add(&s, &a);
    rec.add(&s, &b);
    let st = passes(&s, 2);

    assert_eq!(st.pool_pages, 512, "{st:?}");
    assert_eq!(st.pool_mapped_pages, 1024);
    assert_eq!(st.zero_pages, 512);
    assert_eq!(st.zero_pages_freed, 512);
    assert_eq!(st.bytes_saved, 1024 * P, "one copy of the shared half, no zero page");
    // Per VM: its 256 zero pages and half of each of the 512 pool pages it maps
    // with the other; the two add up to the totals.
    for vm in [0, 1] {
        let v = s.vm_sharing(vm);
        assert_eq!((v.zero_pages, v.pool_mapped_pages), (256, 512), "vm {vm}: {v:?}");
        assert_eq!(v.bytes_saved, (256.0 + 512.0 / 2.0) * P as f64, "vm {vm}: {v:?}");
    }
    assert_eq!(s.vm_sharing(7), tps::VmSharing::default(), "not a VM of the scanner");
    assert_eq!(private_pages(&a) + private_pages(&b), 512, "only unique pages stay private");
    assert_eq!(st.guest_pages, 2048);
    assert!(st.full_passes >= 2 && st.pages_scanned >= 2048);
    assert_eq!((st.errors, st.hash_collisions, st.broken_shares), (0, 0, 0));
    assert!(st.cpu_ns > 0 && st.batches > 0 && st.metadata_bytes > 0);

    // The shared half maps consecutive pool pages: one VMA per VM, and the model
    // agrees with the kernel.
    assert_eq!(vmas(&a) + vmas(&b), 2 + st.vmas_added as usize);
    assert!(st.vmas_added <= 4, "{st:?}");
    // Every new mapping was reported while its VM was paused.
    let remapped: u64 = rec.remapped.lock().unwrap().iter().map(|r| r.2 as u64).sum();
    assert_eq!(remapped, 1024 * P);
    assert!(rec.pauses() >= st.batches, "every batch paused its VMs");

    verify_mixed(&a, 0);
    verify_mixed(&b, 1);
    // Reading the shared pages maps the pool's pages: nothing private comes back.
    assert_eq!(private_pages(&a) + private_pages(&b), 512);
    s.stop();
    // Stopped, the counters and the mappings stay.
    assert_eq!(s.stats().pool_pages, 512);
    verify_mixed(&a, 0);
}

#[test]
fn salting_shares_only_within_a_vm() {
    // Per VM: pages 0..256 and 256..512 hold the same 256 contents, the same in
    // both VMs.
    let build = || {
        let m = GuestMem::new(512);
        for i in 0..512 {
            m.write(i, shared_key(i % 256));
        }
        m
    };
    for (cross_vm, pool) in [(true, 256), (false, 512)] {
        let (a, b) = (build(), build());
        let (s, rec) = fast_scanner(|c| c.cross_vm = cross_vm);
        rec.add(&s, &a);
        rec.add(&s, &b);
        let st = passes(&s, 2);
        assert_eq!((st.pool_pages, st.pool_mapped_pages), (pool, 1024), "cross_vm {cross_vm}");
        if !cross_vm {
            // No physical page is mapped in both VMs.
            let frames = |m: &GuestMem| -> std::collections::HashSet<u64> {
                (0..512).for_each(|i| assert!(m.holds(i, shared_key(i % 256))));
                pagemap(m.addr, 512).iter().map(|e| e & ((1 << 55) - 1)).collect()
            };
            let (fa, fb) = (frames(&a), frames(&b));
            if !fa.contains(&0) {
                assert!(fa.is_disjoint(&fb), "root: PFNs visible, and disjoint");
            }
        }
    }
}

#[test]
fn broken_shares_are_counted_and_pool_pages_freed() {
    let (a, b, s, rec) = two_mixed_vms();
    let before = s.stats();
    assert_eq!(before.pool_pages, 512);

    // The guest of VM 1 rewrites half of its shared pages.
    // (Guest writes go through the gate that the scanner's pause closes.)
    for i in 0..256 {
        rec.write(1, || b.write(i, unique_key(1, 5000 + i)));
    }
    let st = passes(&s, 2);
    assert_eq!(st.broken_shares, 256, "{st:?}");
    assert_eq!(st.pool_mapped_pages, 1024 - 256);
    assert_eq!(st.pool_pages, 512, "VM 0 still maps them");
    assert_eq!(private_pages(&b), 256 + 256, "the copies are private again");

    // VM 0 rewrites the same pages: nothing maps those pool pages any more.
    for i in 0..256 {
        rec.write(0, || a.write(i, unique_key(0, 5000 + i)));
    }
    let st = passes(&s, 2);
    assert_eq!(st.broken_shares, 512);
    assert_eq!((st.pool_pages, st.pool_mapped_pages), (256, 512));
    assert_eq!(st.bytes_saved, (512 + 256) * P);
    for (vm, m) in [(0u32, &a), (1, &b)] {
        for i in 0..256 {
            assert!(m.holds(i, unique_key(vm, 5000 + i)));
        }
        for i in 256..512 {
            assert!(m.holds(i, shared_key(i)));
        }
    }

    // Zero pages written again are counted back.
    rec.write(0, || a.write(600, 7));
    let st = passes(&s, 2);
    assert_eq!(st.zero_pages, 511);
    assert!(a.holds(600, 7));
}

#[test]
fn never_touched_and_skipped_pages_stay_as_they_are() {
    let m = GuestMem::new(2048);
    let (s, rec) = fast_scanner(|_| {});
    // Touch 200 pages: 100 duplicates of one content, 100 of another; pages 1000..
    // are never touched.
    for i in 0..200 {
        m.write(i, 1 + (i % 2) as u64);
    }
    // The VMM says pages 0..20 are ballooned.
    let vm = rec.vm(&m);
    for i in 0..20 {
        vm.set_off_limits(m.gpa(i), true);
    }
    s.add_vm(vm).unwrap();
    let st = passes(&s, 3);
    // Shared pages are not resident until the guest reads them again.
    assert_eq!(resident_pages(&m), 20, "nothing faulted in");
    assert_eq!(private_pages(&m), 20, "the skipped pages");
    assert_eq!(st.pool_mapped_pages, 180);
    assert!(st.pages_hashed <= 200 * (st.full_passes + 1), "only resident private pages are read");
    let entries = pagemap(m.addr, 2048);
    assert!(entries[200..].iter().all(|&e| e >> 63 == 0), "never-touched pages stay absent");
    for i in 0..200 {
        assert!(m.holds(i, 1 + (i % 2) as u64));
    }
    assert_eq!((resident_pages(&m), private_pages(&m)), (200, 20));
}

#[test]
fn runs_of_identical_pages_use_replicas() {
    let m = GuestMem::new(4096);
    let (s, rec) = fast_scanner(|c| c.run_replicas = 64);
    for i in 0..4096 {
        m.write(i, 0xd0d0);
    }
    rec.add(&s, &m);
    let st = passes(&s, 2);
    assert_eq!(st.pool_mapped_pages, 4096, "{st:?}");
    assert!(st.pool_pages <= 64, "{st:?}");
    assert!(st.vmas_added <= 2 * 4096 / 64 + 8, "one VMA per 64 pages: {st:?}");
    assert_eq!(vmas(&m), 1 + st.vmas_added as usize, "the model matches the kernel");
    assert!((0..4096).all(|i| m.holds(i, 0xd0d0)));
}

#[test]
fn reset_range_gives_zeroed_anonymous_memory() {
    let (a, b, s, rec) = two_mixed_vms();

    // The trap: DONTNEED on a shared page brings back the pool's content, not zeros.
    // SAFETY: drops a page of the test's guest memory, which is the point.
    unsafe { libc::madvise(b.page(5) as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) };
    assert!(b.holds(5, shared_key(5)));

    // Pages 256..800 of VM 0: shared, zero and unique pages.
    rec.remapped.lock().unwrap().clear();
    rec.at(0).discard(a.page(256), 544 * PAGE_SIZE).unwrap();
    assert!(pagemap(a.page(256), 544).iter().all(|&e| e >> 63 == 0), "not resident");
    assert!((256..800).all(|i| a.holds(i, 0)));
    assert_eq!(*rec.remapped.lock().unwrap(), vec![(0, a.page(256), 544 * PAGE_SIZE)]);
    let st = s.stats();
    assert_eq!(st.pool_mapped_pages, 1024 - 256);
    assert_eq!(st.zero_pages, 512 - 256);
    assert_eq!(st.pool_pages, 512, "VM 1 still maps them all");
    assert_eq!(vmas(&a), 2, "pages 256.. rejoined the anonymous VMA");
    assert_eq!(vmas(&a) + vmas(&b), 2 + st.vmas_added as usize);

    // Written again, the pages are private memory like any other.
    rec.write(0, || a.write(300, 9));
    assert!(a.holds(300, 9));
    for i in 0..256 {
        assert!(a.holds(i, shared_key(i)));
    }
    verify_mixed(&b, 1);

    // Memory outside any region is just dropped.
    let other = GuestMem::new(4);
    other.write(1, 3);
    rec.at(0).discard(other.addr, 4 * PAGE_SIZE).unwrap();
    assert!(other.holds(1, 0));
    assert!(rec.at(0).discard(a.addr + 1, PAGE_SIZE).is_err(), "unaligned");
}

#[test]
fn remove_vm_drops_its_references() {
    let (a, b, s, _rec) = two_mixed_vms();
    s.remove_vm(1);
    let st = s.stats();
    assert_eq!((st.regions, st.pool_pages, st.pool_mapped_pages, st.zero_pages), (1, 512, 512, 256));
    drop(b);
    verify_mixed(&a, 0);
    s.remove_vm(0);
    let st = s.stats();
    assert_eq!((st.regions, st.pool_pages, st.pool_mapped_pages, st.zero_pages), (0, 0, 0, 0));
    assert_eq!((st.hints, st.vmas_added, st.bytes_saved), (0, 0, 0));
}

#[test]
fn gone_vms_are_skipped() {
    let (a, b) = (mixed(0), mixed(1));
    let (s, rec) = fast_scanner(|_| {});
    rec.add(&s, &a);
    let gone = rec.vm(&b);
    gone.run().stop();
    s.add_vm(gone).unwrap();
    let st = passes(&s, 2);
    assert_eq!(private_pages(&b), 1024, "VM 1 untouched");
    assert_eq!(st.zero_pages, 256, "VM 0's zero pages only");
    // Every pass plans VM 0's shared pages onto pool pages with VM 1's: the commit
    // drops VM 1's half and then VM 0's too (a pool page with one user saves
    // nothing), and frees the pool pages.
    assert_eq!((st.pool_pages, st.pool_mapped_pages), (0, 0), "no share needs VM 1 to be paused: {st:?}");
    assert_eq!(private_pages(&a), 512 + 256, "VM 0's shared and unique pages stay private");
    verify_mixed(&a, 0);
    verify_mixed(&b, 1);
}

#[test]
fn disabled_scanner_does_nothing() {
    let m = mixed(0);
    let (s, rec) = fast_scanner(|c| c.enabled = false);
    rec.add(&s, &m);
    std::thread::sleep(Duration::from_millis(300));
    let st = s.stats();
    assert!(!st.enabled);
    assert_eq!((st.pages_scanned, st.full_passes), (0, 0));
    s.set_config(tps::Config { enabled: true, pages_per_sec: 0, ..s.config() });
    let st = passes(&s, 2);
    assert_eq!(st.zero_pages, 256);
}

/// Once a scanner turned off has taken its config, nothing more is merged: what it
/// had batched landed before, so figures taken then stay true.
#[test]
fn turned_off_means_no_merge_after_the_config_is_applied() {
    let vms: Vec<GuestMem> = (0..4)
        .map(|_| {
            let m = GuestMem::new(4096);
            (0..4096).for_each(|i| m.write(i, shared_key(i % 1024)));
            m
        })
        .collect();
    // Paced, with batches only committed by age (every 100 ms): one is pending when
    // the scanner is turned off.
    let (s, rec) = fast_scanner(|c| {
        c.max_batch = usize::MAX;
        c.pages_per_sec = 20_000;
    });
    for m in &vms {
        rec.add(&s, m);
    }
    // Turn it off mid-pass, while a batch is being planned.
    while s.stats().pages_scanned < 2048 {
        std::thread::yield_now();
    }
    s.set_config(tps::Config { enabled: false, ..s.config() });
    assert!(s.wait_config_applied(Duration::from_secs(30)));
    let before = s.stats();
    let private: usize = vms.iter().map(private_pages).sum();
    std::thread::sleep(Duration::from_millis(300));
    let after = s.stats();
    assert_eq!(
        (after.pool_mapped_pages, after.pool_pages, after.pages_scanned, after.batches),
        (before.pool_mapped_pages, before.pool_pages, before.pages_scanned, before.batches)
    );
    assert_eq!(vms.iter().map(private_pages).sum::<usize>(), private);
    for m in &vms {
        (0..4096).for_each(|i| assert!(m.holds(i, shared_key(i % 1024))));
    }
}

/// What shapes merges holds as soon as `set_config` returns, even while the thread
/// is busy: a burst planned on with the old values after the caller went on to change
/// the memory (`vma_limit.rs` does) would merge it the old way.
#[test]
fn config_changes_apply_at_once() {
    let m = mixed(0);
    let (s, rec) = fast_scanner(|c| c.max_vmas = Some(1000));
    rec.add(&s, &m);
    for limit in 1001..1101 {
        s.set_config(tps::Config { max_vmas: Some(limit), ..s.config() });
        assert_eq!(s.stats().vma_limit, limit as u64);
    }
}

#[test]
fn bad_regions_are_refused() {
    let m = GuestMem::new(8);
    let (s, rec) = fast_scanner(|_| {});
    rec.add(&s, &m);
    let e = s.add_vm(rec.vm(&m)).unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
    let mut r = m.region();
    r.len = 100;
    assert!(s.add_vm(rec.vm_over(r)).is_err());
}

#[test]
fn paced_scanner_completes_passes() {
    let m = mixed(0);
    let (s, rec) = fast_scanner(|c| {
        c.pages_per_sec = 20_000;
        c.full_pass = Some(Duration::from_millis(200));
    });
    rec.add(&s, &m);
    let st = passes(&s, 2);
    assert_eq!(st.zero_pages, 256);
    assert_eq!(st.pages_scanned % 512, 0, "whole chunks");
    assert!(st.last_pass_us > 0 && st.last_pass_end_ms > 0);
    verify_mixed(&m, 0);
}
