//! A test driver for the balloon behind its real virtio-mmio transport: it writes
//! registers, split rings and buffers into guest memory by hand, so every kind of
//! input a guest could produce can be crafted. Used by the balloon's unit tests and
//! the fuzzer.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::balloon::{Balloon, BalloonConfig};
use super::mmio::{MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use super::virtqueue::RingLayout;
use super::{Interrupt, VirtioDevice, Work};
use crate::devices::bus::BusDevice;
use crate::devices::guest_errors::GuestErrors;
use crate::memory::{GuestRam, HostPages};

pub(crate) const MIB: u64 = 1 << 20;
/// Where the driver puts its rings: queue `q` at `RINGS + q * RING_STRIDE`.
pub(crate) const RINGS: u64 = 0x10_0000;
pub(crate) const RING_STRIDE: u64 = 0x4000;
/// Where the driver puts its buffers.
pub(crate) const BUFFERS: u64 = 0x20_0000;
/// Descriptor flags.
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;
/// Register offsets.
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_DESC: u64 = 0x080;
pub(crate) const REG_QUEUE_AVAIL: u64 = 0x090;
pub(crate) const REG_QUEUE_USED: u64 = 0x0a0;
pub(crate) const REG_STATUS: u64 = 0x070;

/// The rings of queue `q` in a layout of queue size `size`.
pub(crate) fn layout(q: usize, size: u16) -> RingLayout {
    let base = RINGS + q as u64 * RING_STRIDE;
    RingLayout { size, desc: base, avail: base + 0x1000, used: base + 0x2000 }
}

/// A balloon, its transport, and a driver's view of both.
pub(crate) struct Rig {
    pub ram: Arc<GuestRam>,
    pub dev: Arc<Mutex<Balloon>>,
    pub mmio: MmioTransport<Balloon>,
    pub errors: Arc<GuestErrors>,
    /// The queues' notification eventfds, as the worker would read them.
    pub kicks: Vec<EventFd>,
    /// Queue size the driver set up.
    pub size: u16,
    /// Next free descriptor and avail index per queue.
    next: Vec<(u16, u16)>,
}

impl Rig {
    /// A balloon over `mem` bytes of RAM; its errors log as `source`.
    pub fn new(mem: u64, cfg: BalloonConfig, source: &str) -> Rig {
        let ram = Arc::new(GuestRam::new(mem, HostPages::Small).unwrap());
        let interrupt = Arc::new(Interrupt::default());
        let errors = Arc::new(GuestErrors::new(source));
        let generation = Arc::new(AtomicU32::new(0));
        let dev = Arc::new(Mutex::new(Balloon::new(
            source,
            cfg,
            ram.clone(),
            interrupt.clone(),
            errors.clone(),
            generation.clone(),
        )));
        let notify: Vec<EventFd> = (0..4).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let kicks = notify.iter().map(|fd| fd.try_clone().unwrap()).collect();
        let mmio = MmioTransport::new(source, dev.clone(), ram.clone(), interrupt, errors.clone(), notify, generation);
        Rig { ram, dev, mmio, errors, kicks, size: 0, next: vec![(0, 0); 4] }
    }

    /// A 32 MiB balloon negotiated with every feature it offers, queues of 16.
    pub fn standard(cfg: BalloonConfig, source: &str) -> Rig {
        Rig::with_queues(cfg, source, 16)
    }

    /// A 32 MiB balloon negotiated with every feature it offers, queues of `size`.
    pub fn with_queues(cfg: BalloonConfig, source: &str, size: u16) -> Rig {
        let mut r = Rig::new(32 * MIB, cfg, source);
        let feats = r.dev.lock().unwrap().features();
        let queues = r.dev.lock().unwrap().queue_count(feats);
        let layouts: Vec<RingLayout> = (0..queues).map(|q| layout(q, size)).collect();
        let status = r.negotiate(feats, &layouts);
        assert_eq!(status, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        r
    }

    pub fn reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn set(&mut self, offset: u64, v: u32) {
        self.mmio.write(offset, &v.to_le_bytes());
    }

    /// Clears queue `q`'s rings (a driver sets up fresh ones), sets its registers
    /// to `l` and marks it ready.
    pub fn set_queue(&mut self, q: usize, l: RingLayout) {
        // Sizes the device refuses anyway are not cleared: they could run far.
        let n = if l.size <= 256 { l.size as usize } else { 0 };
        for (addr, len) in [(l.desc, 16 * n), (l.avail, 6 + 2 * n), (l.used, 6 + 8 * n)] {
            // Addresses a test spoils on purpose may not be RAM.
            let _ = self.ram.mem().write_slice(&vec![0; len], GuestAddress(addr));
        }
        self.set(REG_QUEUE_SEL, q as u32);
        self.set(REG_QUEUE_NUM, l.size as u32);
        for (reg, addr) in [(REG_QUEUE_DESC, l.desc), (REG_QUEUE_AVAIL, l.avail), (REG_QUEUE_USED, l.used)] {
            self.set(reg, addr as u32);
            self.set(reg + 4, (addr >> 32) as u32);
        }
        self.set(REG_QUEUE_READY, 1);
    }

    /// Resets the device and negotiates `feats`; whether FEATURES_OK stuck.
    pub fn negotiate_features(&mut self, feats: u64) -> bool {
        assert_eq!(self.reg(0), 0x7472_6976);
        assert_eq!(self.reg(8), 5);
        self.set(REG_STATUS, 0);
        self.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.set(0x24, 0);
        self.set(0x20, feats as u32);
        self.set(0x24, 1);
        self.set(0x20, (feats >> 32) as u32);
        self.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.reg(REG_STATUS) & STATUS_FEATURES_OK != 0
    }

    /// Negotiates `feats` (stops if FEATURES_OK does not stick), sets up the
    /// queues `layouts`, sets DRIVER_OK; returns the status the driver reads.
    pub fn negotiate(&mut self, feats: u64, layouts: &[RingLayout]) -> u32 {
        if !self.negotiate_features(feats) {
            return self.reg(REG_STATUS);
        }
        for (q, &l) in layouts.iter().enumerate() {
            self.set_queue(q, l);
        }
        self.size = layouts.first().map_or(0, |l| l.size);
        self.next = vec![(0, 0); 4];
        self.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        self.reg(REG_STATUS)
    }

    /// Writes descriptor `idx` of queue `q`.
    pub fn desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = layout(q, self.size).desc + idx as u64 * 16;
        let mem = self.ram.mem();
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Makes chain `head` available on queue `q` (no notification).
    pub fn make_available(&mut self, q: usize, head: u16) {
        let avail = layout(q, self.size).avail;
        let idx = self.next[q].1;
        let mem = self.ram.mem();
        mem.write_obj(head, GuestAddress(avail + 4 + (idx % self.size) as u64 * 2)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
        self.next[q].1 = idx.wrapping_add(1);
    }

    /// Adds a chain of `(addr, len, write_only)` buffers to queue `q`, linked
    /// through `next` unless `links` overrides them, makes it available and serves
    /// the queue.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)], links: Option<&[u16]>) {
        let first = self.next[q].0;
        for (i, &(addr, len, wo)) in bufs.iter().enumerate() {
            let idx = (first + i as u16) % self.size;
            let has_next = i + 1 < bufs.len() || links.is_some();
            let next = links.map_or((idx + 1) % self.size, |l| l[i]);
            self.desc(q, idx, addr, len, (has_next as u16 * F_NEXT) | (wo as u16 * F_WRITE), next);
        }
        self.next[q].0 = (first + bufs.len() as u16) % self.size;
        self.make_available(q, first);
        self.serve(q);
    }

    /// Serves queue `q` until it has nothing left; returns the number of slices.
    pub fn serve(&self, q: usize) -> usize {
        let mut slices = 1;
        while self.dev.lock().unwrap().process_queue(q) == Work::More {
            slices += 1;
            assert!(slices <= 1 + u16::MAX as usize, "the queue never runs dry");
        }
        slices
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.ram.mem().read_obj(GuestAddress(layout(q, self.size).used + 2)).unwrap()
    }

    /// Writes PFNs as le32 at `BUFFERS + off` and returns (addr, len).
    pub fn pfns(&self, off: u64, pfns: &[u32]) -> (u64, u32) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.ram.mem().write_slice(&bytes, GuestAddress(BUFFERS + off)).unwrap();
        (BUFFERS + off, bytes.len() as u32)
    }

    pub fn fill(&self, pfn: u64, byte: u8) {
        self.ram.mem().write_slice(&[byte; 4096], GuestAddress(pfn * 4096)).unwrap();
    }

    pub fn byte(&self, pfn: u64) -> u8 {
        self.ram.mem().read_obj(GuestAddress(pfn * 4096 + 100)).unwrap()
    }
}
