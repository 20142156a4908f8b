//! The per-VM swap file `NAME.vswp`, its slot allocator and the slot checksums.
//!
//! Layout: a 4 KiB header at offset 0, then slot `i` (one 4 KiB guest page) at
//! `4096 * (i + 1)`. The file is created when the VM starts, sized for all of the
//! VM's memory (sparse by default; [`FileOptions::preallocate`] reserves the blocks
//! up front as ESX does) and removed when the [`SwapFile`] is dropped. The header
//! names the owning process (pid, its start time, the boot id), so a file left by a
//! crashed run is recognised and removed by [`clean_stale`]. The file is written
//! under a temporary name (`.NAME.vswp.PID.tmp`) and linked to its own only once its
//! header is complete, so a process killed at any moment leaves either a swap file
//! with a header or a temporary file, both of which `clean_stale` removes once the
//! process is gone.
//!
//! Checksums (crc32c of each slot's 4 KiB) live in memory only, in [`Slots`]: the
//! file is never read by another run, and a checksum stored beside the data could
//! be corrupted with it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pagestate::PAGE_SIZE;

/// Size of the header, also the offset of slot 0.
pub const HEADER_SIZE: usize = 4096;
/// File name extension.
pub const EXTENSION: &str = "vswp";
/// First 8 bytes of every swap file.
pub const MAGIC: [u8; 8] = *b"VMMVSWP\0";
/// Format version.
pub const VERSION: u32 = 1;

/// A heap buffer aligned to 4 KiB (O_DIRECT needs aligned memory, offsets, sizes).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a page), 4 KiB aligned.
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(PAGE_SIZE).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size, valid layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE_SIZE).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// How the file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open with `O_DIRECT` (default): swapped pages do not sit in the host page
    /// cache, which would keep the memory eviction meant to free. Falls back to
    /// buffered I/O (with write-back and cache drop after each batch) when the
    /// file system refuses it.
    pub direct_io: bool,
    /// Reserve the blocks for every slot at creation (`fallocate`): a full disk then
    /// fails VM start instead of eviction. Off by default (sparse file).
    pub preallocate: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions { direct_io: true, preallocate: false }
    }
}

/// The header at offset 0 (the first [`Header::ENCODED`] bytes are meaningful).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub page_size: u32,
    pub pid: u32,
    /// Start time of `pid` (field 22 of `/proc/PID/stat`, clock ticks since boot).
    pub pid_start: u64,
    /// `/proc/sys/kernel/random/boot_id` of the boot that created the file.
    pub boot_id: [u8; 36],
    pub slots: u64,
    pub created_unix_ms: u64,
    pub name: String,
}

impl Header {
    /// Bytes of the fixed part before the name: magic 8, version 4, page size 4,
    /// pid 4, pad 4, pid start 8, boot id 36, pad 4, slots 8, created 8, name length 2.
    const FIXED: usize = 8 + 4 + 4 + 4 + 4 + 8 + 36 + 4 + 8 + 8 + 2;
    /// Longest name stored.
    pub const NAME_MAX: usize = 255;
    /// Upper bound of the encoded size (fixed part, name, crc32c).
    pub const ENCODED: usize = Self::FIXED + Self::NAME_MAX + 4;

    /// The header of a file created now by this process.
    pub fn for_this_process(name: &str, slots: u64) -> Header {
        let pid = std::process::id();
        Header {
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            boot_id: boot_id(),
            slots,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            name: name.chars().take(Self::NAME_MAX).collect(),
        }
    }

    /// Encode into the first bytes of `out` (at least [`Header::ENCODED`] long).
    pub fn encode(&self, out: &mut [u8]) {
        let name = self.name.as_bytes();
        let name = &name[..name.len().min(Self::NAME_MAX)];
        let mut w = Vec::with_capacity(Self::ENCODED);
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&self.version.to_le_bytes());
        w.extend_from_slice(&self.page_size.to_le_bytes());
        w.extend_from_slice(&self.pid.to_le_bytes());
        w.extend_from_slice(&0u32.to_le_bytes());
        w.extend_from_slice(&self.pid_start.to_le_bytes());
        w.extend_from_slice(&self.boot_id);
        w.extend_from_slice(&0u32.to_le_bytes());
        w.extend_from_slice(&self.slots.to_le_bytes());
        w.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        w.extend_from_slice(&(name.len() as u16).to_le_bytes());
        w.extend_from_slice(name);
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        out[..w.len()].copy_from_slice(&w);
    }

    /// Decode and check (magic, crc); `None` if this is not a swap file header.
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < Self::FIXED + 4 || b[..8] != MAGIC {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let name_len = u16::from_le_bytes(b[Self::FIXED - 2..Self::FIXED].try_into().unwrap()) as usize;
        if name_len > Self::NAME_MAX || b.len() < Self::FIXED + name_len + 4 {
            return None;
        }
        let end = Self::FIXED + name_len;
        if crc32c::crc32c(&b[..end]) != u32_at(end) {
            return None;
        }
        Some(Header {
            version: u32_at(8),
            page_size: u32_at(12),
            pid: u32_at(16),
            pid_start: u64_at(24),
            boot_id: b[32..68].try_into().unwrap(),
            slots: u64_at(72),
            created_unix_ms: u64_at(80),
            name: String::from_utf8_lossy(&b[Self::FIXED..end]).into_owned(),
        })
    }

    /// Whether the process that created the file is still running (same boot, pid
    /// alive, same start time: a recycled pid does not count).
    pub fn owner_alive(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        match process_start(self.pid) {
            Some(start) => self.pid_start == 0 || start == self.pid_start,
            None => false,
        }
    }
}

/// Start time of a process (field 22 of /proc/PID/stat), None if it does not exist.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn boot_id() -> [u8; 36] {
    let mut id = [b'?'; 36];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(36);
        id[..n].copy_from_slice(&s[..n]);
    }
    id
}

/// The path of a VM's swap file.
pub fn swap_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{EXTENSION}"))
}

/// Where a swap file of process `pid` is written before it gets its name:
/// `dir/.NAME.vswp.PID.tmp`.
fn temp_path(dir: &Path, name: &str, pid: u32) -> PathBuf {
    dir.join(format!(".{name}.{EXTENSION}.{pid}.tmp"))
}

/// The pid in a name made by [`temp_path`].
fn temp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, pid) = rest.rsplit_once(&format!(".{EXTENSION}."))?;
    pid.parse().ok()
}

/// Read the header of a file, None if it is not a swap file (or unreadable).
pub fn read_header(path: &Path) -> Option<Header> {
    let f = File::open(path).ok()?;
    let mut b = vec![0u8; Header::ENCODED];
    let n = f.read_at(&mut b, 0).ok()?;
    Header::decode(&b[..n])
}

/// Remove the swap files in `dir` whose owner is gone (crashed run), and the
/// temporary files of swap files being created by a process that is gone. Files
/// that are not swap files (wrong magic or checksum) and files of live processes
/// are left alone. Returns the removed paths.
pub fn clean_stale(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let stale = if let Some(pid) = temp_owner(file_name) {
            // No header to go by: the pid in the name (a reused pid keeps the file).
            let gone = process_start(pid).is_none();
            if gone {
                log::info!("swapd: removing {} (swap file being created, pid {pid} gone)", path.display());
            }
            gone
        } else if path.extension().and_then(|e| e.to_str()) == Some(EXTENSION) {
            match read_header(&path) {
                Some(h) if !h.owner_alive() => {
                    log::info!(
                        "swapd: removing stale swap file {} (vm {}, pid {} gone)",
                        path.display(),
                        h.name,
                        h.pid
                    );
                    true
                }
                Some(_) => false,
                None => {
                    log::warn!("swapd: {} is not a swap file of this format; left alone", path.display());
                    false
                }
            }
        } else {
            false
        };
        if stale {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// An open swap file; removed from the directory on drop.
pub struct SwapFile {
    file: File,
    path: PathBuf,
    slots: u64,
    direct: bool,
}

impl SwapFile {
    /// Create `dir/NAME.vswp` with room for `slots` pages. A stale file of the same
    /// name (dead owner) is replaced; one owned by a live process is an error.
    pub fn create(dir: &Path, name: &str, slots: u64, opts: FileOptions) -> io::Result<SwapFile> {
        if name.is_empty() || name.contains('/') || name.contains('\0') || name.len() > Header::NAME_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad VM name for a swap file: {name:?}")));
        }
        std::fs::create_dir_all(dir)?;
        let path = swap_path(dir, name);
        if path.exists() {
            match read_header(&path) {
                Some(h) if h.owner_alive() => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} is in use by pid {}", path.display(), h.pid),
                    ))
                }
                Some(_) => {
                    log::info!("swapd: replacing stale {}", path.display());
                    std::fs::remove_file(&path)?;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a swap file", path.display()),
                    ))
                }
            }
        }
        // The file is written under a temporary name and gets its own only once its
        // header is complete: killed before that, a run leaves a temporary file that
        // `clean_stale` removes once the process is gone; killed after, a swap file
        // it recognises as stale (never a swap file without a header).
        let tmp = temp_path(dir, name, std::process::id());
        match std::fs::remove_file(&tmp) {
            // Left by an earlier process with our pid.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create_new(true).mode(0o600);
            o.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
            o.open(&tmp)
        };
        let (file, direct) = match open(opts.direct_io) {
            Ok(f) => (f, opts.direct_io),
            Err(e) if opts.direct_io && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!("swapd: {} refuses O_DIRECT; using buffered I/O", dir.display());
                (open(false)?, false)
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("create {}: {e}", tmp.display()))),
        };
        // Until it has its name, dropping it removes the temporary file.
        let mut sf = SwapFile { file, path: tmp, slots, direct };
        let mut hdr = AlignedBuf::new(HEADER_SIZE);
        Header::for_this_process(name, slots).encode(&mut hdr);
        sf.write_all_at(&hdr, 0)?;
        let size = HEADER_SIZE as u64 + slots * PAGE_SIZE as u64;
        if opts.preallocate {
            // SAFETY: fallocate on our descriptor with plain integers.
            let r = unsafe { libc::fallocate(sf.file.as_raw_fd(), 0, 0, size as i64) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("preallocate {} bytes for {}: {e}", size, sf.path.display()),
                ));
            }
        } else {
            sf.file.set_len(size)?;
        }
        // A hard link fails if the name was taken meanwhile (rename would replace it).
        std::fs::hard_link(&sf.path, &path)
            .map_err(|e| io::Error::new(e.kind(), format!("naming {} {}: {e}", sf.path.display(), path.display())))?;
        let _ = std::fs::remove_file(std::mem::replace(&mut sf.path, path));
        Ok(sf)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Whether the file is open with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Byte offset of a slot.
    pub fn offset(slot: u32) -> u64 {
        HEADER_SIZE as u64 + slot as u64 * PAGE_SIZE as u64
    }

    fn write_all_at(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.write_at(buf, off) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "swap file write returned 0")),
                Ok(n) => {
                    buf = &buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write whole pages to consecutive slots from `first`, in one large write. With
    /// buffered I/O the range is written back and dropped from the page cache
    /// before returning, so write errors surface here and the memory is really free.
    pub fn write_slots(&self, first: u32, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len() % PAGE_SIZE, 0);
        debug_assert!(first as u64 + (data.len() / PAGE_SIZE) as u64 <= self.slots);
        let off = Self::offset(first);
        self.write_all_at(data, off)?;
        self.settle(off, data.len())
    }

    /// With buffered I/O, writes `len` bytes at `off` back and drops them from the
    /// page cache, so that write errors surface now and the memory is really free.
    /// Nothing to do with direct I/O.
    fn settle(&self, off: u64, len: usize) -> io::Result<()> {
        if self.direct {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: plain syscalls on our descriptor.
        if unsafe { libc::sync_file_range(fd, off as i64, len as i64, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; advisory, failure is harmless.
        unsafe { libc::posix_fadvise(fd, off as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }

    /// Write pages, each from its own buffer (aligned, one page long), to
    /// consecutive slots from `first`: one vectored write (`pwritev`) per 1024 pages.
    /// Errors as [`SwapFile::write_slots`].
    pub fn write_slots_vectored(&self, first: u32, pages: &[&[u8]]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut slot = first;
        for chunk in pages.chunks(1024) {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|p| {
                    debug_assert_eq!(p.len(), PAGE_SIZE);
                    libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }
                })
                .collect();
            let off = Self::offset(slot);
            // SAFETY: the iovecs point into live borrowed buffers for the call.
            let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, off as libc::off_t) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // A short (or interrupted) write: the rest page by page.
            let done = (n.max(0) as usize) / PAGE_SIZE;
            for (i, p) in chunk.iter().enumerate().skip(done) {
                self.write_all_at(p, Self::offset(slot + i as u32))?;
            }
            self.settle(off, chunk.len() * PAGE_SIZE)?;
            slot += chunk.len() as u32;
        }
        Ok(())
    }

    /// Read consecutive slots from `first` into `buf` (a whole number of pages,
    /// aligned when the file is O_DIRECT).
    pub fn read_slots(&self, first: u32, buf: &mut [u8]) -> io::Result<()> {
        debug_assert_eq!(buf.len() % PAGE_SIZE, 0);
        let mut off = Self::offset(first);
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "swap file shorter than its slots")),
                Ok(n) => {
                    done += n;
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bytes allocated on disk for the file (st_blocks * 512).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("swapd: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Marks "no slot" in page tables.
pub const NO_SLOT: u32 = u32::MAX;

/// The slot allocator and per-slot metadata: which page a slot holds, the batch
/// that wrote it, and the crc32c of its content. Not thread-safe by itself (the
/// swapper keeps it under its table lock).
pub struct Slots {
    used: Vec<u64>,
    total: u32,
    in_use: u32,
    cursor: u32,
    crc: Vec<u32>,
    page: Vec<u32>,
    batch: Vec<u32>,
}

impl Slots {
    /// `total` free slots.
    pub fn new(total: u32) -> Slots {
        let words = (total as usize).div_ceil(64);
        let mut used = vec![0u64; words];
        // Bits past the end count as used, so whole-word skips stay in range.
        if total % 64 != 0 {
            used[words - 1] = !0u64 << (total % 64);
        }
        Slots {
            used,
            total,
            in_use: 0,
            cursor: 0,
            crc: vec![0; total as usize],
            page: vec![NO_SLOT; total as usize],
            batch: vec![0; total as usize],
        }
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    fn is_used(&self, i: u32) -> bool {
        self.used[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Allocate up to `n` slots as few runs as possible, next-fit from where the
    /// last allocation ended (so successive batches land sequentially in the file).
    /// Returns (first, count) runs; fewer than `n` slots in all when the file is full.
    pub fn alloc(&mut self, n: u32) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut need = n;
        let total = self.total;
        let mut i = self.cursor;
        let mut scanned = 0u32;
        while need > 0 && scanned < total {
            if i >= total {
                i = 0;
            }
            let w = (i / 64) as usize;
            if i % 64 == 0 && self.used[w] == !0u64 {
                let step = 64.min(total - i);
                i += step;
                scanned += step;
                continue;
            }
            if self.is_used(i) {
                i += 1;
                scanned += 1;
                continue;
            }
            let start = i;
            while i < total && need > 0 && scanned < total && !self.is_used(i) {
                self.used[(i / 64) as usize] |= 1 << (i % 64);
                i += 1;
                need -= 1;
                scanned += 1;
            }
            out.push((start, i - start));
        }
        self.in_use += n - need;
        self.cursor = if total > 0 { i % total } else { 0 };
        out
    }

    /// Make the next allocation start from the beginning of the file again (after
    /// a write error: reuse slots whose blocks are already allocated first).
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Free one slot.
    pub fn free(&mut self, s: u32) {
        debug_assert!(self.is_used(s), "double free of slot {s}");
        if self.is_used(s) {
            self.used[(s / 64) as usize] &= !(1 << (s % 64));
            self.in_use -= 1;
            self.page[s as usize] = NO_SLOT;
        }
    }

    /// Record what a freshly written slot holds.
    pub fn record(&mut self, s: u32, page: u32, batch: u32, crc: u32) {
        self.crc[s as usize] = crc;
        self.page[s as usize] = page;
        self.batch[s as usize] = batch;
    }

    /// The page index a slot holds (NO_SLOT if free).
    pub fn page_of(&self, s: u32) -> u32 {
        self.page[s as usize]
    }

    /// The batch that wrote a slot.
    pub fn batch_of(&self, s: u32) -> u32 {
        self.batch[s as usize]
    }

    /// Whether `data` matches the checksum recorded for slot `s`.
    pub fn verify(&self, s: u32, data: &[u8]) -> bool {
        crc32c::crc32c(data) == self.crc[s as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("swapd-file-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn header_roundtrip_and_corruption() {
        let h = Header::for_this_process("vm-a", 1234);
        let mut b = vec![0u8; HEADER_SIZE];
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Some(h.clone()));
        assert!(h.owner_alive());
        b[20] ^= 1;
        assert_eq!(Header::decode(&b), None);
        assert_eq!(Header::decode(b"not a swap file"), None);
    }

    #[test]
    fn process_start_parses() {
        assert!(process_start(std::process::id()).unwrap() > 0);
        assert_eq!(process_start(u32::MAX - 7), None);
    }

    #[test]
    fn slots_alloc_free_runs() {
        let mut s = Slots::new(130);
        assert_eq!(s.alloc(100), vec![(0, 100)]);
        assert_eq!(s.alloc(40), vec![(100, 30)]); // full: only 30 left
        assert_eq!(s.in_use(), 130);
        assert_eq!(s.alloc(1), vec![]);
        for i in 10..20 {
            s.free(i);
        }
        s.free(50);
        assert_eq!(s.in_use(), 119);
        // Next fit wraps to the start and takes the holes in order.
        assert_eq!(s.alloc(11), vec![(10, 10), (50, 1)]);
        assert_eq!(s.in_use(), 130);
        let mut s = Slots::new(0);
        assert_eq!(s.alloc(3), vec![]);
    }

    #[test]
    fn create_write_read_remove() {
        let dir = tmpdir("rw");
        let f = SwapFile::create(&dir, "vm1", 16, FileOptions::default()).unwrap();
        let path = f.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (HEADER_SIZE + 16 * PAGE_SIZE) as u64);
        // A second creator of the same name is refused while we live.
        assert!(SwapFile::create(&dir, "vm1", 16, FileOptions::default()).is_err());
        let mut buf = AlignedBuf::new(3 * PAGE_SIZE);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        f.write_slots(5, &buf).unwrap();
        let mut back = AlignedBuf::new(2 * PAGE_SIZE);
        f.read_slots(6, &mut back).unwrap();
        assert_eq!(&back[..], &buf[PAGE_SIZE..]);
        // Pages from scattered places, one vectored write.
        f.write_slots_vectored(10, &[&buf[2 * PAGE_SIZE..], &buf[..PAGE_SIZE]]).unwrap();
        f.read_slots(10, &mut back).unwrap();
        assert_eq!(&back[..PAGE_SIZE], &buf[2 * PAGE_SIZE..]);
        assert_eq!(&back[PAGE_SIZE..], &buf[..PAGE_SIZE]);
        assert_eq!(read_header(&path).unwrap().slots, 16);
        drop(f);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn buffered_mode_works_too() {
        let dir = tmpdir("buf");
        let f = SwapFile::create(&dir, "vm1", 4, FileOptions { direct_io: false, preallocate: true }).unwrap();
        assert!(!f.direct());
        assert!(f.allocated_bytes().unwrap() >= (HEADER_SIZE + 4 * PAGE_SIZE) as u64);
        let buf = AlignedBuf::new(PAGE_SIZE);
        f.write_slots(3, &buf).unwrap();
        drop(f);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file whose owner died is removed by clean_stale; a live one, a foreign file
    /// and a file with a broken header are left alone.
    #[test]
    fn stale_files_are_cleaned() {
        let dir = tmpdir("stale");
        // A pid that is certainly dead: a child that has exited and been reaped.
        let child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        let mut child = child;
        child.wait().unwrap();
        let mut stale = Header::for_this_process("crashed", 8);
        stale.pid = dead_pid;
        stale.pid_start = 1;
        let mut b = vec![0u8; HEADER_SIZE];
        stale.encode(&mut b);
        std::fs::write(swap_path(&dir, "crashed"), &b).unwrap();
        // Same pid as ours but another start time: pid reuse, also stale.
        let mut reused = Header::for_this_process("reused", 8);
        reused.pid_start += 1;
        let mut b2 = vec![0u8; HEADER_SIZE];
        reused.encode(&mut b2);
        std::fs::write(swap_path(&dir, "reused"), &b2).unwrap();
        // Another boot: stale.
        let mut reboot = Header::for_this_process("reboot", 8);
        reboot.boot_id = [b'x'; 36];
        let mut b3 = vec![0u8; HEADER_SIZE];
        reboot.encode(&mut b3);
        std::fs::write(swap_path(&dir, "reboot"), &b3).unwrap();
        let live = SwapFile::create(&dir, "live", 8, FileOptions::default()).unwrap();
        std::fs::write(dir.join("foreign.vswp"), b"hello").unwrap();
        // Killed while creating a swap file: no header yet, only the temporary name.
        std::fs::write(temp_path(&dir, "half", dead_pid), b"").unwrap();
        std::fs::write(temp_path(&dir, "busy", std::process::id()), b"").unwrap();
        std::fs::write(dir.join("other.txt"), &b).unwrap();

        let mut removed = clean_stale(&dir).unwrap();
        removed.sort();
        let mut want = vec![
            swap_path(&dir, "crashed"),
            swap_path(&dir, "reboot"),
            swap_path(&dir, "reused"),
            temp_path(&dir, "half", dead_pid),
        ];
        want.sort();
        assert_eq!(removed, want);
        assert!(live.path().exists());
        assert!(temp_path(&dir, "busy", std::process::id()).exists(), "a live process's file is kept");
        std::fs::remove_file(temp_path(&dir, "busy", std::process::id())).unwrap();
        assert!(dir.join("foreign.vswp").exists());
        assert!(dir.join("other.txt").exists());
        // Creating over a stale file of the same name replaces it.
        std::fs::write(swap_path(&dir, "crashed"), &b).unwrap();
        let again = SwapFile::create(&dir, "crashed", 8, FileOptions::default()).unwrap();
        assert!(read_header(again.path()).unwrap().owner_alive());
        drop(again);
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
