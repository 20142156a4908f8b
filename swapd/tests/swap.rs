//! End-to-end tests of the swapper on real userfaultfds, real files, real threads.
//! They need root (userfaultfd for kernel faults, mounting a tmpfs).

#[path = "../../tests/tests/common/both_ways.rs"]
mod both_ways;
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::*;
use pagestate::anon::MemoryVm;
use pagestate::GuestVm;
use swapd::{CacheConfig, Config, SwapError, SwapStats, Swapper, VictimPolicy};

const GPA: u64 = 0x10_0000;

fn gpa(p: usize) -> u64 {
    GPA + (p * PAGE) as u64
}

/// Where evicted pages go: the file alone, or a small compression cache in front
/// of it (small enough that the tests spill it to the file).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    File,
    Cache,
}

impl Mode {
    fn configure(self, c: &mut Config) {
        if self == Mode::Cache {
            c.cache = Some(CacheConfig::new(256 << 10));
        }
    }

    fn tag(self, name: &str) -> String {
        format!("{name}-{self:?}")
    }
}

// The tests that hold with and without the compression cache, run both ways
// (`file::NAME`, `zcache::NAME`).
both_ways::both_ways!(
    file => super::Mode::File,
    zcache => super::Mode::Cache;
    evict_everything_and_fault_it_back,
    no_write_is_lost_while_evicting,
    zero_pages_are_not_written,
    skip_forget_and_swap_in_all,
    remapped_pages_are_safe,
    zero_fill_never_reaches_pool_pages,
    first_touch_goes_through_the_handler,
    idle_victims_fault_less_than_random,
);

/// Pages evicted to the file so far: those the cache refused or was not asked to
/// keep, and those it spilled.
fn file_pages(s: &SwapStats) -> u64 {
    let c = s.cache.clone().unwrap_or_default();
    s.pages_out - c.stored + c.spilled
}

/// Pages in the compression cache now.
fn cached_now(s: &SwapStats) -> u64 {
    s.cache.as_ref().map_or(0, |c| c.entries)
}

/// A swapper named `name` over `mem`, with its own test VM and a fresh swap
/// directory (removed by the test).
fn swapper(name: &str, mem: &Mem, f: impl FnOnce(&mut Config)) -> (Arc<MemoryVm>, std::path::PathBuf, Swapper) {
    let vm = test_vm(name, mem, GPA);
    let dir = tmpdir(name);
    let sw = swapper_in(&dir, &vm, f);
    (vm, dir, sw)
}

/// [`swapper`] in `mode`.
fn swapper_mode(
    name: &str,
    mode: Mode,
    mem: &Mem,
    f: impl FnOnce(&mut Config),
) -> (Arc<MemoryVm>, std::path::PathBuf, Swapper) {
    let vm = test_vm(name, mem, GPA);
    let dir = tmpdir(&mode.tag(name));
    let sw = swapper_in(&dir, &vm, |c| {
        mode.configure(c);
        f(c)
    });
    (vm, dir, sw)
}

fn swapper_in(dir: &std::path::Path, vm: &Arc<MemoryVm>, f: impl FnOnce(&mut Config)) -> Swapper {
    let mut cfg = Config::new(dir);
    f(&mut cfg);
    Swapper::new(vm.clone(), cfg).expect("swapper (needs root)")
}

/// Pauses the swapper obtained on `vm`.
fn pauses(vm: &MemoryVm) -> u64 {
    vm.run().pause_stats().0
}

/// Every page written with known data (some all-zero) is evicted, the file holds
/// only the non-zero ones, and threads reading the memory afterwards take real
/// faults and get every byte back.
fn evict_everything_and_fault_it_back(mode: Mode) {
    let mem = Arc::new(Mem::new(16 << 20));
    let n = mem.pages();
    let is_zero = |p: usize| p % 8 == 3;
    fill_unique(&mem, (0..n).filter(|&p| !is_zero(p)));
    for p in (0..n).filter(|&p| is_zero(p)) {
        mem.write(p, 7, 0); // resident, all zero
    }
    let zeros = (0..n).filter(|&p| is_zero(p)).count();
    let (vm, dir, sw) = swapper_mode("all", mode, &mem, |_| {});
    let path = sw.file_path().to_path_buf();
    assert!(path.exists());

    assert_eq!(sw.swap_out(n).unwrap(), n);
    let s = sw.stats();
    assert_eq!(s.pages_out as usize, n - zeros);
    assert_eq!(s.zero_pages_elided as usize, zeros);
    let written = file_pages(&s) as usize;
    assert_eq!(s.bytes_written as usize, written * PAGE);
    assert_eq!(s.slots_used as usize, written);
    assert_eq!((s.slots_used + cached_now(&s)) as usize, n - zeros);
    assert_eq!(sw.swapped_pages(), n - zeros);
    assert!(sw.file_allocated_bytes() as usize <= (written + 1) * PAGE + (64 << 10));
    if let Some(c) = &s.cache {
        // Even pages compress, odd ones do not; the cache spilled to stay in its cap.
        assert_eq!(c.stored + c.refused, (n - zeros) as u64, "{c:?}");
        assert!(c.refused > 0 && c.stored > 0 && c.spilled > 0, "{c:?}");
        assert!(c.bytes <= c.cap_bytes && c.ratio > 0.0 && c.ratio <= 0.5, "{c:?}");
        assert_eq!(sw.cache_bytes(), c.bytes);
    }
    assert!((0..n).all(|p| !mem.present(p)), "evicted pages must not be resident");
    assert_eq!(s.batches, pauses(&vm));

    let readers: Vec<_> = (0..2)
        .map(|t| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                for p in (t..n).step_by(2) {
                    if is_zero(p) {
                        assert!((0..512).all(|w| mem.read(p, w) == 0), "page {p} not zero");
                    } else {
                        check_unique(&mem, p).unwrap();
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let s = sw.stats();
    assert_eq!((s.pages_in + s.prefetched) as usize, n - zeros);
    assert_eq!(s.slots_used + cached_now(&s), 0);
    let hits = s.cache.as_ref().map_or(0, |c| c.hits);
    assert_eq!(s.bytes_read, (s.pages_in - hits + s.prefetched) * PAGE as u64);
    assert_eq!(s.bytes_read as usize, written * PAGE);
    if let Some(c) = &s.cache {
        assert!(c.hits > 0 && c.bytes == 0 && c.corrupt == 0, "{c:?}");
        eprintln!(
            "cache: {} stored (ratio {:.2}), {} refused, {} spilled, {} hits, fault p50 {:.1} us; compress {:.1} us/page",
            c.stored, c.stored_ratio, c.refused, c.spilled, c.hits, c.fault.p50_us, c.compress_us_per_page
        );
    }
    assert_eq!(s.checksum_errors + s.read_errors + s.fault_errors + s.write_errors, 0);
    assert!(s.zero_fills > 0);
    assert!(vm.fatal_errors().is_empty());
    eprintln!(
        "evict {:.0} MiB/s; fault-in p50 {:.1} us p99 {:.1} us ({} faults, {} prefetched); zero fill p50 {:.1} us",
        s.evict_mib_s, s.fault_in.p50_us, s.fault_in.p99_us, s.pages_in, s.prefetched, s.zero_fill.p50_us
    );
    drop(sw);
    assert!(!path.exists(), "the swap file is removed with the swapper");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Content of word `w` of writer page `p` after `c` increments (see `writer_op`).
fn expected(p: usize, w: usize, c: u64) -> u64 {
    if w == 0 {
        return c;
    }
    let m = (w % 511) as u64;
    let last = if m == 0 {
        c - c % 511
    } else if c >= m {
        c - (c - m) % 511
    } else {
        0
    };
    if last >= 1 {
        last ^ ((p as u64) << 32)
    } else {
        init_word(p, w)
    }
}

/// One write of a "vCPU": read the counter (it must be what this thread wrote
/// last), bump it, write a word chosen by the new value, then the counter.
fn writer_op(mem: &Mem, p: usize, shadow: &mut u64) -> Result<(), String> {
    let cur = mem.read(p, 0);
    if cur != *shadow {
        return Err(format!("page {p}: counter {cur} but this writer last wrote {shadow}: a write was lost"));
    }
    let c = cur + 1;
    mem.write(p, ((c - 1) % 511 + 1) as usize, c ^ ((p as u64) << 32));
    mem.write(p, 0, c);
    *shadow = c;
    Ok(())
}

/// The write race: "vCPU" threads keep writing sequence numbers (each checking the
/// previous one) into pages while batches are evicted under pause; the writers
/// fault evicted pages back in the meantime. Afterwards every word of every page
/// is what the writes made it: no write lost, no stale page handed back.
fn no_write_is_lost_while_evicting(mode: Mode) {
    stress(mode, false).unwrap();
}

/// Negative control (run with `--ignored`): with a pause that does not park the
/// writers, the same stress test does see lost writes.
#[test]
#[ignore = "negative control: proves the stress test detects a broken pause (run with --run-ignored)"]
fn stress_test_catches_a_broken_pause() {
    let e = stress(Mode::File, true).unwrap_err();
    eprintln!("detected as expected: {e}");
}

fn stress(mode: Mode, broken_pause: bool) -> Result<(), String> {
    const WRITERS: usize = 3;
    const ROUNDS: usize = 40;
    const WRITES_PER_ROUND: u64 = 3000;
    let mem = Arc::new(Mem::new(32 << 20));
    let n = mem.pages();
    let zero_page = |p: usize| p % 16 == 5;
    fill_unique(&mem, 0..n);
    for p in 0..n {
        if zero_page(p) {
            for w in 0..512 {
                mem.write(p, w, 0);
            }
        } else {
            mem.write(p, 0, 0); // the counter
        }
    }
    let vm = test_vm("race", &mem, GPA);
    let dir = tmpdir(&mode.tag(if broken_pause { "race-broken" } else { "race" }));
    let sw = swapper_in(&dir, &vm, |c| {
        mode.configure(c);
        c.batch_pages = 128;
    });
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (mem, vm, stop, failed, progress) =
                (mem.clone(), vm.clone(), stop.clone(), failed.clone(), progress.clone());
            std::thread::spawn(move || {
                let mine: Vec<usize> = (0..n).filter(|&p| !zero_page(p) && p % WRITERS == w).collect();
                let mut shadow = vec![0u64; n];
                let mut rng = w as u64 + 1;
                let mut ops = 0u64;
                let mut err = None;
                while !stop.load(SeqCst) {
                    rng = mix(rng);
                    let p = mine[(rng % mine.len() as u64) as usize];
                    let mut op = || writer_op(&mem, p, &mut shadow[p]);
                    // The negative control writes past the pause.
                    let done = if broken_pause { op() } else { vm.write(op) };
                    if let Err(e) = done {
                        err = Some(e);
                        failed.store(true, SeqCst);
                        break;
                    }
                    ops += 1;
                    progress.fetch_add(1, SeqCst);
                }
                (shadow, ops, err)
            })
        })
        .collect();

    let mut evicted = 0;
    for round in 0..ROUNDS {
        sw.set_victim_policy(if round % 2 == 0 { VictimPolicy::Random } else { VictimPolicy::Idle });
        if round % 4 == 3 {
            // Some dirty-log periods (the idle policy then has ages to work with).
            let bm = vec![0xaaaa_aaaa_aaaa_aaaau64; n / 64];
            sw.note_dirty(&bm, GPA);
        }
        evicted += sw.swap_out(1024).unwrap();
        // Let the writers do a fixed amount of work (faulting pages back) before
        // the next round, however the threads get scheduled.
        let target = progress.load(SeqCst) + WRITES_PER_ROUND;
        while progress.load(SeqCst) < target && !failed.load(SeqCst) {
            std::thread::yield_now();
        }
        if failed.load(SeqCst) {
            break;
        }
    }
    stop.store(true, SeqCst);
    let mut shadow = vec![0u64; n];
    let mut total_ops = 0;
    let mut errors = Vec::new();
    for (w, t) in writers.into_iter().enumerate() {
        let (s, ops, err) = t.join().unwrap();
        errors.extend(err.map(|e| format!("writer {w}: {e}")));
        total_ops += ops;
        for p in (0..n).filter(|&p| p % WRITERS == w && !zero_page(p)) {
            shadow[p] = s[p];
        }
    }
    let s = sw.stats();
    eprintln!(
        "race: {evicted} pages evicted in {} batches while {WRITERS} writers did {total_ops} writes; \
         {} faults in, {} prefetched, pause p50 {:.0} us p99 {:.0} us",
        s.batches, s.pages_in, s.prefetched, s.pause.p50_us, s.pause.p99_us
    );
    if let Some(e) = errors.first() {
        drop(sw);
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.clone());
    }
    assert!(s.pages_in > 0, "the writers must have faulted evicted pages back");
    // Every page: counter and every word as the writes left them.
    for (p, &count) in shadow.iter().enumerate() {
        for w in 0..512 {
            let want = if zero_page(p) { 0 } else { expected(p, w, count) };
            let got = mem.read(p, w);
            if got != want {
                drop(sw);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("page {p} word {w} (counter {count}): {got:#x} != {want:#x}"));
            }
        }
    }
    let s = sw.stats();
    assert_eq!(s.pages_out, s.pages_in + s.prefetched + s.slots_used + cached_now(&s), "{s:#?}");
    assert_eq!(s.checksum_errors + s.read_errors + s.write_errors, 0);
    assert_eq!(s.batches, pauses(&vm));
    assert!(vm.fatal_errors().is_empty());
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

/// All-zero pages are discarded without touching the file.
fn zero_pages_are_not_written(mode: Mode) {
    let mem = Mem::new(4 << 20);
    let n = mem.pages();
    for p in 0..n {
        mem.write(p, p % 512, 0);
    }
    assert!((0..n).all(|p| mem.present(p)));
    let (_vm, dir, sw) = swapper_mode("zero", mode, &mem, |_| {});
    let before = sw.file_allocated_bytes();
    assert_eq!(sw.swap_out(n).unwrap(), n);
    let s = sw.stats();
    assert_eq!(s.zero_pages_elided as usize, n);
    assert_eq!((s.pages_out, s.bytes_written, s.slots_used), (0, 0, 0));
    assert_eq!(sw.file_allocated_bytes(), before, "nothing written: only the header is allocated");
    assert!(before <= 8192);
    assert!((0..n).all(|p| !mem.present(p)));
    assert!((0..n).all(|p| mem.read(p, 0) == 0 && mem.read(p, 511) == 0));
    assert!(sw.stats().zero_fills > 0);
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A slot corrupted on disk: the neighbour prefetch stops before it, and a fault
/// on it calls `fatal` and is left unresolved (the faulting thread stays blocked:
/// it never sees the corrupt data). Dropping the swapper (the VM ending) closes the
/// userfaultfd and releases it.
#[test]
fn corrupt_slot_is_fatal_and_never_handed_out() {
    let mem = Arc::new(Mem::new(1 << 20));
    fill_unique(&mem, 0..mem.pages());
    let (vm, dir, sw) = swapper("corrupt", &mem, |_| {});
    // Pages 0..4 evicted in one batch: slots 0..4 of the fresh file.
    assert_eq!(sw.swap_out_gpas(&[gpa(0), gpa(1), gpa(2), gpa(3)]).unwrap(), 4);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(sw.file_path()).unwrap();
        let off = 4096 + 2 * 4096 + 100;
        let mut b = [0u8; 1];
        f.read_at(&mut b, off).unwrap();
        b[0] ^= 0xff;
        f.write_at(&b, off).unwrap();
        f.sync_all().unwrap();
    }
    // Page 0 comes back, with page 1 prefetched; page 2 (bad) and 3 (after it) not.
    check_unique(&mem, 0).unwrap();
    assert!(mem.present(1) && !mem.present(2) && !mem.present(3));
    assert_eq!(sw.stats().checksum_errors, 1);
    assert!(vm.fatal_errors().is_empty(), "a bad neighbour is not fatal by itself");
    // Page 3's fault looks back at page 2 too, and again leaves it out.
    check_unique(&mem, 3).unwrap();
    assert_eq!(sw.stats().checksum_errors, 2);

    let m = mem.clone();
    let victim = std::thread::spawn(move || (0..512).map(|w| m.read(2, w)).collect::<Vec<u64>>());
    let msg = wait_fatal(&vm);
    assert!(msg.contains("checksum") && msg.contains("slot 2"), "{msg}");
    let s = sw.stats();
    assert_eq!(s.checksum_errors, 3);
    assert_eq!(s.faults_unresolved, 1);
    assert!(!victim.is_finished(), "the faulting thread must still be blocked");
    assert!(sw.is_swapped(gpa(2)));
    // The VM ends: the swapper goes, the thread is released and reads zeros (the
    // page is gone with the VM), never the corrupted slot.
    drop(sw);
    let seen = victim.join().unwrap();
    assert!(seen.iter().all(|&v| v == 0));
    assert_eq!(vm.fatal_errors().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "none"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs (needs root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk: the batch that does not fit fails cleanly, its pages stay
/// resident, eviction stops (and refuses until resumed), everything reads back
/// intact; once space is back (pages faulted in), a resumed eviction works.
#[test]
fn enospc_stops_eviction_and_loses_nothing() {
    let mem = Mem::new(1 << 20);
    let n = mem.pages();
    fill_unique(&mem, 0..n);
    let vm = test_vm("enospc", &mem, GPA);
    let dir = tmpdir("enospc");
    let mnt = Tmpfs::mount(&dir, "64k");
    let sw = swapper_in(&dir, &vm, |c| c.batch_pages = 4);
    let err = sw.swap_out(n).unwrap_err();
    let reclaimed = match &err {
        SwapError::Write { reclaimed, source } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{err}");
            *reclaimed
        }
        e => panic!("unexpected {e}"),
    };
    // 64 KiB: the header and 15 slots; batches of 4: three fit, the fourth not.
    assert_eq!(reclaimed, 12);
    let s = sw.stats();
    assert_eq!(s.write_errors, 1);
    assert_eq!(s.pages_out, 12);
    assert_eq!(s.slots_used, 12);
    assert!(s.eviction_stopped.as_deref().unwrap_or("").contains("No space"), "{:?}", s.eviction_stopped);
    assert_eq!((0..n).filter(|&p| !mem.present(p)).count(), 12);
    assert!(matches!(sw.swap_out(4), Err(SwapError::Stopped { .. })));
    for p in 0..n {
        check_unique(&mem, p).unwrap();
    }
    assert_eq!(sw.stats().slots_used, 0);
    // The slots are free again (their blocks are still allocated): resume works.
    sw.resume_eviction();
    assert_eq!(sw.swap_out(8).unwrap(), 8);
    for p in 0..n {
        check_unique(&mem, p).unwrap();
    }
    assert!(vm.fatal_errors().is_empty());
    drop(sw);
    drop(mnt);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fault reads the neighbours evicted in the same batch with it.
#[test]
fn prefetch_brings_batch_neighbours() {
    let mem = Arc::new(Mem::new(1 << 20));
    fill_unique(&mem, 0..mem.pages());
    let (_vm, dir, sw) = swapper("prefetch", &mem, |_| {});
    let gpas: Vec<u64> = (0..64).map(gpa).collect();
    assert_eq!(sw.swap_out_gpas(&gpas).unwrap(), 64);
    let m = mem.clone();
    std::thread::spawn(move || check_unique(&m, 20)).join().unwrap().unwrap();
    let s = sw.stats();
    // Window of 16: 3 behind, 12 ahead.
    assert_eq!((s.pages_in, s.prefetched), (1, 15));
    assert_eq!(s.bytes_read, 16 * 4096);
    assert!((17..=32).all(|p| mem.present(p)));
    assert!(!mem.present(16) && !mem.present(33));
    // The dirty log then shows page 18 (prefetched) and 40 (not) written.
    let mut bm = vec![0u64; 4];
    bm[0] |= 1 << 18;
    bm[0] |= 1 << 40;
    sw.note_dirty(&bm, GPA);
    assert_eq!(sw.stats().prefetch_hits, 1);
    for p in 0..64 {
        check_unique(&mem, p).unwrap();
    }
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pages the VMM marks (ballooned, shared) are skipped; a forgotten (ballooned)
/// page reads zero; `swap_in_all` brings everything back.
fn skip_forget_and_swap_in_all(mode: Mode) {
    let mem = Mem::new(2 << 20);
    let n = mem.pages();
    fill_unique(&mem, 0..n);
    let (vm, dir, sw) = swapper_mode("skip", mode, &mem, |_| {});
    (0..10).for_each(|p| vm.set_off_limits(gpa(p), true));
    assert_eq!(sw.swap_out(n).unwrap(), n - 10);
    assert_eq!(sw.stats().skipped_vmm, 10);
    assert!((0..10).all(|p| mem.present(p)) && (10..n).all(|p| !mem.present(p)));
    // The balloon takes page 100: the VMM forgets it; it reads zero afterwards.
    assert!(sw.is_swapped(gpa(100)));
    vm.changes().discard(gpa(100), mem.base + 100 * PAGE, PAGE).unwrap();
    assert!(!sw.is_swapped(gpa(100)));
    assert_eq!(sw.swapped_pages(), n - 11);
    assert_eq!(sw.swap_in_all().unwrap(), n - 11);
    assert_eq!(sw.swapped_pages(), 0);
    assert!((0..n).filter(|&p| p != 100).all(|p| mem.present(p)));
    for p in (0..n).filter(|&p| p != 100) {
        check_unique(&mem, p).unwrap();
    }
    assert!((0..512).all(|w| mem.read(100, w) == 0));
    // The VM is ending: pause refused, nothing evicted.
    vm.run().stop();
    assert!(matches!(sw.swap_out(10), Err(SwapError::Ending { reclaimed: 0 })));
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Page sharing remaps guest pages: a page mapped from a pool file (read, or
/// written and copied-on-write) must never be discarded (it would revert to the
/// pool's content); a page remapped to fresh anonymous memory (a new VMA the
/// userfaultfd does not cover yet) is registered before it is discarded, so its
/// content still comes back.
fn remapped_pages_are_safe(mode: Mode) {
    let mem = Mem::new(1 << 20);
    let n = mem.pages();
    fill_unique(&mem, 0..n);
    let (vm, dir, sw) = swapper_mode("remap", mode, &mem, |_| {});
    assert_eq!(sw.swap_out(0).unwrap(), 0);
    // Register now (first eviction), then remap like page sharing would.
    assert_eq!(sw.swap_out_gpas(&[gpa(50)]).unwrap(), 1);
    check_unique(&mem, 50).unwrap();
    // SAFETY: memfd pool page mapped privately over pages 7 and 8; anonymous over 9.
    unsafe {
        let fd = libc::memfd_create(c"pool".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, PAGE as i64), 0);
        let pool = libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        std::ptr::copy_nonoverlapping(mem.word(7, 0) as *const u8, pool as *mut u8, PAGE);
        for p in [7usize, 8] {
            let r = libc::mmap(
                mem.word(p, 0) as *mut _,
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                0,
            );
            assert_ne!(r, libc::MAP_FAILED);
        }
        libc::munmap(pool, PAGE);
        libc::close(fd);
        let r = libc::mmap(
            mem.word(9, 0) as *mut _,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        assert_ne!(r, libc::MAP_FAILED);
    }
    let _ = mem.read(7, 0); // maps the pool page (file page)
    mem.write(8, 3, 0xdead); // copy-on-write: an anonymous page inside a file VMA
    fill_unique(&mem, 9..10);
    let s0 = sw.stats();
    assert_eq!(sw.swap_out_gpas(&[gpa(7), gpa(8), gpa(9)]).unwrap(), 1);
    let s1 = sw.stats();
    assert_eq!(s1.skipped_shared - s0.skipped_shared, 1, "pool page");
    assert_eq!(s1.skipped_vma - s0.skipped_vma, 1, "private copy in a file mapping");
    assert!(mem.present(7) && mem.present(8) && !mem.present(9));
    check_unique(&mem, 7).unwrap();
    assert_eq!(mem.read(8, 3), 0xdead);
    check_unique(&mem, 9).unwrap(); // faults, and the handler brings it back
    assert_eq!(sw.stats().pages_in - s0.pages_in, 1);
    // The VMM asks for an explicit re-registration too: fine.
    vm.changes().remapped(mem.base + 9 * PAGE, PAGE).unwrap();
    assert!(vm.changes().remapped(mem.base + mem.len, PAGE).is_err());
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The zero fill ahead of a fault must never reach pages mapped from a pool file:
/// in a private file mapping the kernel maps the zero page over any page without a
/// page table entry, although the file holds its content (a page shared by page
/// sharing that the guest has not touched since the remap). Here a fault in such a
/// mapping (its pool page punched) must not wipe the 16 pool pages that follow.
fn zero_fill_never_reaches_pool_pages(mode: Mode) {
    const RUN: usize = 17;
    let mem = Arc::new(Mem::new(1 << 20));
    fill_unique(&mem, 0..mem.pages());
    let (vm, dir, sw) = swapper_mode("zfpool", mode, &mem, |c| c.register_eagerly = true);
    // SAFETY: a memfd "pool" of RUN pages holding pages 10.. of the memory, mapped
    // privately over them, as page sharing remaps a run of shared pages.
    unsafe {
        let fd = libc::memfd_create(c"pool".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, (RUN * PAGE) as i64), 0);
        let len = RUN * PAGE;
        let pool = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert_ne!(pool, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(mem.word(10, 0) as *const u8, pool as *mut u8, len);
        libc::munmap(pool, len);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let r = libc::mmap(mem.word(10, 0) as *mut _, len, prot, libc::MAP_PRIVATE | libc::MAP_FIXED, fd, 0);
        assert_ne!(r, libc::MAP_FAILED);
        // What the VMM's `remapped` hook does after each remap.
        vm.changes().remapped(mem.word(10, 0) as usize, len).unwrap();
        // The first pool page goes away while page 10 still maps it.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(libc::fallocate(fd, punch, 0, PAGE as i64), 0);
        libc::close(fd);
    }
    // A write to page 10 from another thread (it may block in the handler): the
    // handler copies a zeroed page there and used to fill the pages after it.
    let m = mem.clone();
    std::thread::spawn(move || m.write(10, 0, 1)).join().unwrap();
    assert_eq!(mem.read(10, 1), 0, "the punched page reads zeros");
    for p in 11..10 + RUN {
        check_unique(&mem, p).unwrap_or_else(|e| panic!("pool page {p}: {e}"));
    }
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Once registered, every first touch of guest memory is a userfaultfd fault: a
/// write gets a zeroed page and the following pages the zero page (one fault per
/// 16 pages with the default window).
fn first_touch_goes_through_the_handler(mode: Mode) {
    let mem = Arc::new(Mem::new(4 << 20));
    let n = mem.pages();
    let (_vm, dir, sw) = swapper_mode("touch", mode, &mem, |c| c.register_eagerly = true);
    let m = mem.clone();
    std::thread::spawn(move || {
        for p in 0..n {
            m.write(p, 0, p as u64 + 1);
        }
    })
    .join()
    .unwrap();
    let s = sw.stats();
    assert_eq!(s.zero_fills as usize, n / 16);
    assert!((0..n).all(|p| mem.read(p, 0) == p as u64 + 1));
    eprintln!(
        "first touch (write) through the handler: {} faults for {n} pages, p50 {:.1} us p99 {:.1} us",
        s.zero_fills, s.zero_fill.p50_us, s.zero_fill.p99_us
    );
    drop(sw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random and idle-aware victims compared by the faults the "guest" takes when it
/// touches its hot set again after an eviction of half its memory.
fn idle_victims_fault_less_than_random(mode: Mode) {
    let run = |policy: VictimPolicy| -> (u64, u64) {
        let mem = Arc::new(Mem::new(8 << 20));
        let n = mem.pages();
        fill_unique(&mem, 0..n);
        let hot: Vec<usize> = (0..n).filter(|&p| mix(p as u64 * 7919) % 5 == 0).collect();
        let vm = test_vm("victims", &mem, GPA);
        let dir = tmpdir(&mode.tag(&format!("victims-{policy:?}")));
        let sw = swapper_in(&dir, &vm, |c| {
            mode.configure(c);
            c.victims = policy;
            c.prefetch_pages = 1;
        });
        let mut bm = vec![0u64; n / 64];
        for &p in &hot {
            bm[p / 64] |= 1 << (p % 64);
        }
        // Three periods: the guest writes its hot set, the VMM reads the dirty log.
        for period in 0..3 {
            for &p in &hot {
                mem.write(p, 1, period);
            }
            sw.note_dirty(&bm, GPA);
        }
        assert_eq!(sw.swap_out(n / 2).unwrap(), n / 2);
        let before = sw.stats().pages_in;
        let m = mem.clone();
        let h = hot.clone();
        std::thread::spawn(move || {
            for &p in &h {
                m.write(p, 1, 99);
            }
        })
        .join()
        .unwrap();
        let faults = sw.stats().pages_in - before;
        drop(sw);
        std::fs::remove_dir_all(&dir).unwrap();
        (faults, hot.len() as u64)
    };
    let (random, hot) = run(VictimPolicy::Random);
    let (idle, _) = run(VictimPolicy::Idle);
    eprintln!("hot set of {hot} pages, half of memory evicted: faults afterwards random {random}, idle {idle}");
    assert_eq!(idle, 0);
    assert!(random > 0);
}

/// A second swapper for the same VM name in the same directory is refused while
/// the first lives; a stale file of a dead run is replaced.
#[test]
fn one_file_per_vm_name() {
    let mem = Mem::new(1 << 20);
    let dir = tmpdir("names");
    let a = swapper_in(&dir, &test_vm("same", &mem, GPA), |_| {});
    let mem2 = Mem::new(1 << 20);
    let e = Swapper::new(test_vm("same", &mem2, GPA), Config::new(&dir));
    assert!(e.is_err());
    drop(a);
    assert!(swapd::clean_stale(&dir).unwrap().is_empty());
    let b = swapper_in(&dir, &test_vm("same", &mem2, GPA), |_| {});
    drop(b);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A slot that cannot be read (here: the file was cut short under the swapper,
/// standing in for an I/O error) is fatal too, with the read error in the message.
#[test]
fn unreadable_slot_is_fatal() {
    let mem = Arc::new(Mem::new(1 << 20));
    fill_unique(&mem, 0..mem.pages());
    let (vm, dir, sw) = swapper("unreadable", &mem, |_| {});
    assert_eq!(sw.swap_out_gpas(&[gpa(0), gpa(1)]).unwrap(), 2);
    std::fs::OpenOptions::new().write(true).open(sw.file_path()).unwrap().set_len(4096).unwrap();
    let m = mem.clone();
    let victim = std::thread::spawn(move || m.read(1, 9));
    let msg = wait_fatal(&vm);
    assert!(msg.contains("cannot read slot 1"), "{msg}");
    let s = sw.stats();
    assert_eq!(s.read_errors, 1);
    assert_eq!(s.faults_unresolved, 1);
    assert!(!victim.is_finished());
    drop(sw);
    assert_eq!(victim.join().unwrap(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A compressed entry damaged in memory: the fault on its page decompresses it,
/// finds the checksum wrong, calls `fatal` and leaves the fault unresolved (the
/// guest never sees it); the VM ending releases the faulting thread.
#[test]
fn corrupt_cache_entry_is_fatal_and_never_handed_out() {
    let mem = Arc::new(Mem::new(1 << 20));
    fill_unique(&mem, 0..mem.pages());
    let (vm, dir, sw) = swapper("zcorrupt", &mem, |c| c.cache = Some(CacheConfig::new(1 << 20)));
    // Even pages compress (cached), odd ones do not (file).
    assert_eq!(sw.swap_out_gpas(&[gpa(2), gpa(3), gpa(4)]).unwrap(), 3);
    assert!(sw.is_cached(gpa(2)) && !sw.is_cached(gpa(3)) && sw.is_swapped(gpa(3)) && sw.is_cached(gpa(4)));
    assert!(sw.damage_cache_entry(gpa(4)));
    assert!(!sw.damage_cache_entry(gpa(3)), "not in the cache");
    check_unique(&mem, 2).unwrap();
    check_unique(&mem, 3).unwrap();
    let m = mem.clone();
    let victim = std::thread::spawn(move || (0..512).map(|w| m.read(4, w)).collect::<Vec<u64>>());
    let msg = wait_fatal(&vm);
    assert!(msg.contains("compression cache") && msg.contains(&format!("{:#x}", gpa(4))), "{msg}");
    let s = sw.stats();
    let c = s.cache.clone().unwrap();
    assert_eq!((c.corrupt, c.hits, s.faults_unresolved), (1, 1, 1), "{s:?}");
    assert!(!victim.is_finished(), "the faulting thread must still be blocked");
    assert!(sw.is_cached(gpa(4)));
    drop(sw);
    let seen = victim.join().unwrap();
    assert!(seen.iter().all(|&v| v == 0), "the damaged content never reached the reader");
    assert_eq!(vm.fatal_errors().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Anonymous memory of this process (RssAnon), bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The cache's memory is host memory: it grows as pages are cached, is what
/// `cache_bytes` says, and goes back to the system when the swapper (the VM) goes.
#[test]
fn the_cache_memory_is_returned_when_the_swapper_goes() {
    let mem = Mem::new(64 << 20);
    let n = mem.pages();
    // Even pages: 1600 random bytes, then a repeated word (about 1.6 KiB with lz4).
    for p in (0..n).filter(|p| p % 2 == 0) {
        (0..512).for_each(|w| mem.write(p, w, if w < 200 { mix((p * 512 + w) as u64) } else { 1 }));
    }
    let (_vm, dir, sw) = swapper("zmem", &mem, |c| c.cache = Some(CacheConfig::new(64 << 20)));
    let evens: Vec<u64> = (0..n).filter(|p| p % 2 == 0).map(gpa).collect();
    assert_eq!(sw.swap_out_gpas(&evens).unwrap(), n / 2);
    let c = sw.stats().cache.unwrap();
    assert_eq!((c.stored, c.refused, c.spilled), ((n / 2) as u64, 0, 0), "{c:?}");
    assert!(c.bytes > 8 << 20, "{c:?}");
    assert_eq!(sw.cache_bytes(), c.bytes);
    let held = rss_anon();
    drop(sw);
    let after = rss_anon();
    eprintln!("cache {} KiB; RssAnon {} -> {} KiB", c.bytes >> 10, held >> 10, after >> 10);
    assert!(held - after >= c.bytes * 8 / 10, "cache of {} bytes, RssAnon fell by {}", c.bytes, held - after);
    std::fs::remove_dir_all(&dir).unwrap();
}
