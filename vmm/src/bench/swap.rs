//! `vmm bench swap`: evict a guest's data to its swap file (and to a compression
//! cache in front of it), let the guest read it back with `verify`, and put the
//! figures next to the limits the swapper works against, measured in the same run:
//! plain `O_DIRECT` write throughput of the swap directory, the latency of one
//! 4 KiB `O_DIRECT` read from it, and the cost of a bare userfaultfd fault.
//!
//! Two content mixes: `unique` pages (incompressible) and `compressible:45` pages
//! (lz4 makes 47% of a page of each: just within the cache's rule of half a page;
//! `compressible:50` comes out at 52%, just outside it). For each mix, three runs:
//! - **file, guest order**: every page evicted in ascending guest-physical order, so
//!   a fault's neighbours sit in the adjacent slots and prefetch brings them along;
//! - **file, random** (the swapper's default victim choice, as ESX): each batch
//!   holds pages from all over guest RAM, so consecutive guest reads hit scattered
//!   slots;
//! - **cache, random**: the same with a compression cache as large as the data:
//!   what compresses to half a page or less stays in memory, the rest goes to the
//!   file.
//!
//! Each run reports where eviction time went (`SwapStats::stages`). A codec table
//! compares lz4 (what the cache uses) with zstd at level 1 on the same page mixes.
//!
//! A last, smaller run compares the victim choices by the faults the guest takes
//! afterwards: the guest writes 256 MiB, frees all but 16 MiB (freed pages stay
//! resident on the host, and are cold), keeps rewriting the 16 MiB it holds, and the
//! host evicts 128 MiB; then the guest rewrites its 16 MiB again. Random victims
//! hit the hot pages in proportion; idle-aware ones (KVM's dirty log, fed every
//! 100 ms) should take the cold ones.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_abi::content;
use guest_abi::workload::Kind;
use swapd::{CacheStats, EvictStages};

use super::{print_table, verify, wait_serving, with_host};
use crate::config::VmConfig;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::host::{Host, HostOptions};
use crate::reclaim::swap::{self as vm_swap, CacheSize, CompressOptions, DirtyLog, SwapOptions};
use crate::units::format_size;

/// Parameters of the swap benchmark.
pub struct SwapBench {
    /// Guest data to evict per run (the guest allocates this much).
    pub evict: u64,
    /// Swap directory.
    pub dir: PathBuf,
}

/// The content mixes: name, page kind.
const MIXES: [(&str, Kind); 2] = [("unique", Kind::Unique), ("compressible:45", Kind::Compressible(45))];

/// One run of a mix.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    FileGuestOrder,
    FileRandom,
    CacheRandom,
}

impl Run {
    const ALL: [Run; 3] = [Run::FileGuestOrder, Run::FileRandom, Run::CacheRandom];

    fn name(self) -> &'static str {
        match self {
            Run::FileGuestOrder => "file, guest order",
            Run::FileRandom => "file, random",
            Run::CacheRandom => "cache, random",
        }
    }
}

struct Sample {
    evicted_mib: f64,
    evict_s: f64,
    read_s: f64,
    faults: u64,
    prefetched: u64,
    fault_p50_us: f64,
    fault_p99_us: f64,
    pause_p50_us: f64,
    stages: EvictStages,
    cache: Option<CacheStats>,
}

impl Sample {
    fn evict_mib_s(&self) -> f64 {
        self.evicted_mib / self.evict_s
    }
}

/// lz4 or zstd over one mix's pages.
struct Codec {
    ratio: f64,
    compress_us: f64,
    decompress_us: f64,
}

/// Runs the benchmark, prints the tables and the JSON line.
pub fn run(b: &SwapBench) -> Result<(), String> {
    vm_swap::prepare_dir(&b.dir).map_err(|e| e.to_string())?;
    let file_write = swapd::limits::file_write_mib_s(&b.dir, 512, swapd::Config::new(&b.dir).batch_pages * 4096)
        .map_err(|e| format!("write test in {}: {e}", b.dir.display()))?;
    let disk =
        swapd::limits::disk_read_4k(&b.dir, 256, 4000).map_err(|e| format!("read test in {}: {e}", b.dir.display()))?;
    let bare = swapd::limits::bare_fault(&b.dir, 16384).map_err(|e| format!("bare userfaultfd fault: {e}"))?;
    let mut samples: Vec<Vec<Sample>> = Vec::new();
    for (mix, kind) in MIXES {
        let mut runs = Vec::new();
        for run in Run::ALL {
            let s = measure(b, kind, run)?;
            log::info!(
                "{mix}, {}: evicted {:.0} MiB in {:.2} s, read back in {:.2} s",
                run.name(),
                s.evicted_mib,
                s.evict_s,
                s.read_s
            );
            runs.push(s);
        }
        samples.push(runs);
    }
    let codecs: Vec<[Codec; 2]> = MIXES.iter().map(|&(_, kind)| codecs(kind)).collect::<Result<_, _>>()?;

    println!("swap benchmark: {} of guest data per run, swap directory {}", format_size(b.evict), b.dir.display());
    let mut rows = vec![[
        "content",
        "eviction",
        "evicted MiB",
        "evict MiB/s",
        "/ write",
        "faults",
        "prefetched",
        "file fault p50 us",
        "p99 us",
        "cache fault p50 us",
        "p99 us",
        "guest us/page",
        "pause p50 us",
    ]
    .map(String::from)
    .to_vec()];
    for ((mix, _), runs) in MIXES.iter().zip(&samples) {
        for (run, s) in Run::ALL.iter().zip(runs) {
            let (cp50, cp99) = s.cache.as_ref().map_or((0.0, 0.0), |c| (c.fault.p50_us, c.fault.p99_us));
            rows.push(vec![
                mix.to_string(),
                run.name().into(),
                format!("{:.0}", s.evicted_mib),
                format!("{:.0}", s.evict_mib_s()),
                format!("{:.2}", s.evict_mib_s() / file_write),
                s.faults.to_string(),
                s.prefetched.to_string(),
                format!("{:.1}", s.fault_p50_us),
                format!("{:.1}", s.fault_p99_us),
                format!("{cp50:.1}"),
                format!("{cp99:.1}"),
                format!("{:.1}", s.read_s * 1e6 / (s.evicted_mib * 256.0)),
                format!("{:.0}", s.pause_p50_us),
            ]);
        }
    }
    print_table(&rows);
    println!(
        "limits: plain O_DIRECT write {file_write:.0} MiB/s; 4 KiB O_DIRECT random read p50 {:.1} us p99 {:.1} us; \
         bare userfaultfd fault {:.1} us (handler {:.1} us; kernel zero-page fault {:.2} us)",
        disk.p50_us, disk.p99_us, bare.round_trip_us, bare.handler_us, bare.kernel_us
    );

    println!(
        "where eviction time goes (% of eviction time; writer threads (checksum, compression, file writes) \
         run in parallel with the rest)"
    );
    let mut rows = vec![[
        "content",
        "eviction",
        "gather",
        "pause wait",
        "scan",
        "copy",
        "verify",
        "register",
        "discard",
        "spill",
        "writer wait",
        "other",
        "writers",
        "compress",
    ]
    .map(String::from)
    .to_vec()];
    for ((mix, _), runs) in MIXES.iter().zip(&samples) {
        for (run, s) in Run::ALL.iter().zip(runs) {
            let st = &s.stages;
            let total = s.evict_s * 1e3;
            let serial = [
                st.gather_ms,
                st.pause_wait_ms,
                st.scan_ms,
                st.copy_ms,
                st.verify_ms,
                st.register_ms,
                st.discard_ms,
                st.spill_ms,
                st.writer_wait_ms,
            ];
            let pct = |ms: f64| format!("{:.1}", 100.0 * ms / total);
            let mut row = vec![mix.to_string(), run.name().into()];
            row.extend(serial.map(pct));
            row.push(pct(total - serial.iter().sum::<f64>()));
            row.extend([st.write_ms, st.compress_ms].map(pct));
            rows.push(row);
        }
    }
    print_table(&rows);

    println!("codecs on the same pages (4096 pages per mix; the cache uses lz4)");
    let mut rows =
        vec![["content", "codec", "ratio", "compress us/page", "decompress us/page"].map(String::from).to_vec()];
    for ((mix, _), pair) in MIXES.iter().zip(&codecs) {
        for (name, c) in ["lz4", "zstd -1"].iter().zip(pair) {
            rows.push(vec![
                mix.to_string(),
                name.to_string(),
                format!("{:.3}", c.ratio),
                format!("{:.2}", c.compress_us),
                format!("{:.2}", c.decompress_us),
            ]);
        }
    }
    print_table(&rows);

    let mut victims = Vec::new();
    for policy in [swapd::VictimPolicy::Random, swapd::VictimPolicy::Idle] {
        let v = victim_faults(&b.dir, policy)?;
        log::info!("{policy:?} victims: {} pages read back in {} faults", v.read_back, v.faults);
        victims.push(v);
    }
    let mut rows = vec![vec![
        "victims".to_string(),
        "evicted MiB".into(),
        "pages read back".into(),
        "faults after".into(),
        "prefetched after".into(),
    ]];
    for (name, v) in ["random", "idle (dirty log)"].iter().zip(&victims) {
        rows.push(vec![
            name.to_string(),
            format!("{:.0}", v.evicted_mib),
            v.read_back.to_string(),
            v.faults.to_string(),
            v.prefetched.to_string(),
        ]);
    }
    println!("victim choice: 16 MiB hot, 240 MiB freed by the guest (cold), 128 MiB evicted");
    print_table(&rows);

    let [seq, rnd, _] = &samples[0][..] else { unreachable!("three runs per mix") };
    let [seq45, rnd45, z45] = &samples[1][..] else { unreachable!("three runs per mix") };
    let zc = z45.cache.clone().unwrap_or_default();
    let mut json = serde_json::json!({
        "bench": "swap",
        "evict_mib": b.evict >> 20,
        "evict_mib_s": rnd.evict_mib_s(),
        "fault_p50_us": rnd.fault_p50_us,
        "fault_p99_us": rnd.fault_p99_us,
        "read_back_s": rnd.read_s,
        "total_s": rnd.evict_s + rnd.read_s,
        "faults": rnd.faults,
        "seq_evict_mib_s": seq.evict_mib_s(),
        "seq_fault_p50_us": seq.fault_p50_us,
        "seq_fault_p99_us": seq.fault_p99_us,
        "seq_read_back_s": seq.read_s,
        "seq_faults": seq.faults,
        "seq_prefetched": seq.prefetched,
        "file_write_mib_s": file_write,
        "disk_read_4k_us": disk.p50_us,
        "disk_read_4k_p99_us": disk.p99_us,
        "uffd_fault_us": bare.round_trip_us,
        "uffd_handler_us": bare.handler_us,
        "kernel_fault_us": bare.kernel_us,
        "evict_over_file_write": rnd.evict_mib_s() / file_write,
        "seq_evict_over_file_write": seq.evict_mib_s() / file_write,
        "fault_p50_over_uffd": rnd.fault_p50_us / bare.round_trip_us,
        "fault_p50_minus_disk_read_us": rnd.fault_p50_us - disk.p50_us,
        "stages_random_ms": rnd.stages,
        "stages_seq_ms": seq.stages,
    });
    // Two objects: one would pass serde_json's macro recursion limit.
    let cache = serde_json::json!({
        "mix45_evict_mib_s": rnd45.evict_mib_s(),
        "mix45_seq_evict_mib_s": seq45.evict_mib_s(),
        "zcache_evict_mib_s": z45.evict_mib_s(),
        "zcache_fault_p50_us": zc.fault.p50_us,
        "zcache_fault_p99_us": zc.fault.p99_us,
        "zcache_fault_over_uffd": zc.fault.p50_us / bare.round_trip_us,
        "zcache_fault_over_uffd_handler": zc.fault.p50_us / bare.handler_us,
        "zcache_ratio": zc.stored_ratio,
        "zcache_stored": zc.stored,
        "zcache_refused": zc.refused,
        "zcache_hits": zc.hits,
        "zcache_compress_us_per_page": zc.compress_us_per_page,
        "zcache_read_back_s": z45.read_s,
        "zcache_refused_incompressible": samples[0][2].cache.as_ref().map_or(0, |c| c.refused),
        "lz4_ratio_45": codecs[1][0].ratio,
        "zstd1_ratio_45": codecs[1][1].ratio,
        "lz4_compress_us": codecs[1][0].compress_us,
        "zstd1_compress_us": codecs[1][1].compress_us,
        "lz4_decompress_us": codecs[1][0].decompress_us,
        "zstd1_decompress_us": codecs[1][1].decompress_us,
        "random_victim_faults": victims[0].faults,
        "idle_victim_faults": victims[1].faults,
        "random_victim_read_back": victims[0].read_back,
        "idle_victim_read_back": victims[1].read_back,
    });
    if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), cache) {
        all.extend(more);
    }
    println!("{json}");
    Ok(())
}

/// One guest: allocate `kind` pages, evict them as `run` says, read them back.
fn measure(b: &SwapBench, kind: Kind, run: Run) -> Result<Sample, String> {
    // Room for the data, the guest's bookkeeping and its kernel.
    let mut cfg = VmConfig::new("swapbench", b.evict + (b.evict / 8).max(64 << 20));
    cfg.workload = guest_abi::workload::Step::Alloc { pages: b.evict / guest_abi::PAGE_SIZE, kind }.to_string();
    let mut swap = SwapOptions::new(&b.dir);
    if run == Run::CacheRandom {
        swap.compress = Some(CompressOptions { cache: CacheSize::Bytes(b.evict), ..CompressOptions::default() });
    }
    let opts = HostOptions { swap: Some(swap), ..HostOptions::default() };
    with_host(cfg, opts, |host| evict_and_read(host, run == Run::FileGuestOrder))
}

/// The swapper registers guest RAM with its userfaultfd at the first eviction: the
/// guest fills its memory at full speed before.
fn evict_and_read(host: &Host, guest_order: bool) -> Result<Sample, String> {
    let vm = &host.vms()[0];
    wait_serving(vm, Duration::from_secs(600))?;
    let sw = host.swapper(0).expect("a swapper");
    let resident = vm.ram().resident_bytes() / guest_abi::PAGE_SIZE;
    let t = Instant::now();
    let reclaimed = if guest_order {
        let gpas: Vec<u64> = vm
            .ram()
            .regions()
            .iter()
            .flat_map(|r| (r.base..r.base + r.size).step_by(guest_abi::PAGE_SIZE as usize))
            .collect();
        sw.swap_out_gpas(&gpas)
    } else {
        sw.swap_out(resident as usize)
    }
    .map_err(|e| format!("eviction: {e}"))?;
    let evict_s = t.elapsed().as_secs_f64();
    let evicted = sw.stats();
    let t = Instant::now();
    verify(vm, Duration::from_secs(600)).map_err(|e| format!("after swapping: {e}"))?;
    let read_s = t.elapsed().as_secs_f64();
    let s = sw.stats();
    Ok(Sample {
        evicted_mib: reclaimed as f64 / 256.0,
        evict_s,
        read_s,
        faults: s.pages_in - evicted.pages_in,
        prefetched: s.prefetched - evicted.prefetched,
        fault_p50_us: s.fault_in.p50_us,
        fault_p99_us: s.fault_in.p99_us,
        pause_p50_us: s.pause.p50_us,
        stages: evicted.stages,
        cache: s.cache,
    })
}

/// lz4 (block, as the cache) and zstd level 1 (one reused context) over 4096
/// pages of `kind` as the guest writes them.
fn codecs(kind: Kind) -> Result<[Codec; 2], String> {
    const PAGES: u64 = 4096;
    let page_bytes = |p: &content::Page| -> Vec<u8> { p.iter().flat_map(|w| w.to_le_bytes()).collect() };
    let mut page = [0u64; content::WORDS_PER_PAGE];
    let pages: Vec<Vec<u8>> = (0..PAGES)
        .map(|i| {
            content::fill(&mut page, content::alloc_key(kind, i, 0x5eed));
            page_bytes(&page)
        })
        .collect();
    let n = PAGES as f64;
    let size = n * guest_abi::PAGE_SIZE as f64;
    let mut out = vec![0u8; 2 * guest_abi::PAGE_SIZE as usize];
    let mut back = vec![0u8; guest_abi::PAGE_SIZE as usize];

    let t = Instant::now();
    let lz: Vec<Vec<u8>> = pages
        .iter()
        .map(|p| {
            let k = lz4_flex::block::compress_into(p, &mut out).expect("room for lz4's worst case");
            out[..k].to_vec()
        })
        .collect();
    let lz_c = t.elapsed().as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    for (c, p) in lz.iter().zip(&pages) {
        let k = lz4_flex::block::decompress_into(c, &mut back).map_err(|e| format!("lz4: {e}"))?;
        if k != back.len() || back != *p {
            return Err("lz4 round trip differs".into());
        }
    }
    let lz_d = t.elapsed().as_secs_f64() * 1e6 / n;

    let mut zc = zstd::bulk::Compressor::new(1).map_err(|e| format!("zstd: {e}"))?;
    let mut zd = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?;
    let t = Instant::now();
    let zs: Vec<Vec<u8>> = pages
        .iter()
        .map(|p| zc.compress_to_buffer(p, &mut out).map(|k| out[..k].to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("zstd: {e}"))?;
    let zs_c = t.elapsed().as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    for (c, p) in zs.iter().zip(&pages) {
        let k = zd.decompress_to_buffer(c, &mut back).map_err(|e| format!("zstd: {e}"))?;
        if k != back.len() || back != *p {
            return Err("zstd round trip differs".into());
        }
    }
    let zs_d = t.elapsed().as_secs_f64() * 1e6 / n;
    let ratio = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>() as f64 / size;
    Ok([
        Codec { ratio: ratio(&lz), compress_us: lz_c, decompress_us: lz_d },
        Codec { ratio: ratio(&zs), compress_us: zs_c, decompress_us: zs_d },
    ])
}

/// What one victim choice cost the guest afterwards.
pub struct VictimSample {
    /// Evicted (written or zero), MiB.
    pub evicted_mib: f64,
    /// Pages read back from the file while the guest rewrote and checked its 16 MiB.
    pub read_back: u64,
    /// Faults that read them (the rest came with prefetch).
    pub faults: u64,
    /// Pages brought by prefetch.
    pub prefetched: u64,
}

/// The victim comparison's scenario (module doc) with swap files in `dir`.
pub fn victim_faults(dir: &Path, policy: swapd::VictimPolicy) -> Result<VictimSample, String> {
    let mut cfg = VmConfig::new("victims", 320 << 20);
    cfg.workload = "alloc 256M unique; free 240M".into();
    // The freed 240 MiB must stay resident (a guest that does not report its free
    // memory): that is what idle victims should find.
    cfg.balloon = Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() });
    let mut swap = SwapOptions::new(dir);
    swap.victims = policy;
    with_host(cfg, HostOptions { swap: Some(swap), ..HostOptions::default() }, |host| {
        let vm = &host.vms()[0];
        wait_serving(vm, Duration::from_secs(600))?;
        let sw = host.swapper(0).expect("a swapper");
        let log = match policy {
            swapd::VictimPolicy::Idle => {
                Some(DirtyLog::enable(vm.memory_slots().clone()).map_err(|e| format!("dirty log: {e}"))?)
            }
            swapd::VictimPolicy::Random => None,
        };
        // The guest keeps its 16 MiB hot while the host reads the dirty log.
        std::thread::scope(|s| {
            let guest = s.spawn(|| vm.run_command("repeat 10 { touch 16M; idle 50ms }", Duration::from_secs(600)));
            while !guest.is_finished() {
                if let Some(l) = &log {
                    l.feed(&sw).map_err(|e| format!("dirty log: {e}"))?;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            guest.join().expect("command thread").map(|_| ())
        })?;
        if let Some(l) = &log {
            l.feed(&sw).map_err(|e| format!("dirty log: {e}"))?;
        }
        // What the guest pays afterwards: pages read back from the file while it
        // rewrites and checks its 16 MiB (hot pages that were evicted, and any of
        // its kernel's).
        let reclaimed =
            sw.swap_out((128 << 20) / guest_abi::PAGE_SIZE as usize).map_err(|e| format!("eviction: {e}"))?;
        let evicted = sw.stats();
        let out = vm.run_command("touch 16M; verify", Duration::from_secs(600))?;
        if out.status != 0 {
            return Err(format!("the guest's check failed after swapping: {:?}", out.lines));
        }
        let after = sw.stats();
        Ok(VictimSample {
            evicted_mib: reclaimed as f64 / 256.0,
            read_back: (after.pages_in + after.prefetched) - (evicted.pages_in + evicted.prefetched),
            faults: after.pages_in - evicted.pages_in,
            prefetched: after.prefetched - evicted.prefetched,
        })
    })
}
