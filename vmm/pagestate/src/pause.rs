//! The pause: holding every writer of a VM's memory still, so that a reclaimer can
//! change how a page is backed without losing a write.
//!
//! [`RunControl`] steers a VM's vCPU threads (run, pause, stop, wake) and gates its
//! device threads. A paused VM has no vCPU inside `KVM_RUN` and no device thread
//! touching guest memory. A vCPU is pulled out of the guest by setting its
//! `kvm_run.immediate_exit` and then sending it a signal: the flag covers the window
//! just before `KVM_RUN` is entered (the signal alone could land before it and be
//! lost), the signal covers a vCPU already running guest code. The vCPU thread clears
//! the flag, then reads the requested mode, so no request is missed.
//!
//! Every hold is a guard that ends it when dropped, so a panic or an early return
//! cannot leave a VM paused or a pause waiting forever:
//! - [`PauseGuard`] ([`RunControl::pause_guard`]): a plain pause (the policy holding a
//!   VM in the low state, the control API, tests). Pauses nest: the VM runs again when
//!   the last guard drops (a count of pausers, not a flag).
//! - [`ReclaimGuard`] ([`RunControl::reclaim_guard`]): a pause that is also exclusive
//!   among reclaimers, for page sharing's merges and the swapper's evictions: one never
//!   works on pages another is halfway through. The exclusion is handed over in
//!   arrival order (a queue of tickets): a reclaimer that lets go and asks again at
//!   once goes behind those already waiting, so reclaimers working in a loop (page
//!   sharing without a rate limit, the swapper evicting batch after batch) cannot
//!   starve one another. A waiter that gives up leaves the queue.
//! - [`DeviceGuard`] ([`RunControl::device_guard`]): a device thread at work on guest
//!   memory; a pause waits for it and holds new ones off.
//! - [`VcpuSlot`] ([`RunControl::register_vcpu`]): a vCPU thread in its run loop.
//!
//! Halted vCPUs (`hlt` exits, no interrupt controller) sleep on the same condition
//! variable and are woken by any mode change or an explicit [`RunControl::wake`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// What the vCPUs of a VM are asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Run guest code.
    Running,
    /// Stay out of the guest until resumed.
    Paused,
    /// Leave the run loop for good.
    Stopping,
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

struct Slot {
    /// `pthread_self()` of the vCPU thread, while it runs its loop.
    thread: Option<libc::pthread_t>,
    /// Address of `kvm_run.immediate_exit` of that vCPU.
    immediate_exit: usize,
}

struct State {
    mode: Mode,
    slots: Vec<Slot>,
    /// vCPU threads that are in their loop (not yet exited).
    alive: u32,
    /// vCPU threads parked because of [`Mode::Paused`].
    parked: u32,
    /// Bumped by [`RunControl::wake`].
    wake_gen: u64,
    /// Device threads currently touching guest memory.
    devices_busy: u32,
    /// Pauses not yet resumed: the VM runs again when this falls to zero.
    pausers: u32,
    /// A reclaimer holds [`RunControl::reclaim_guard`].
    reclaiming: bool,
    /// Reclaimers waiting for the exclusion, by ticket, first come first served.
    reclaim_queue: VecDeque<u64>,
    /// The next ticket handed out.
    next_ticket: u64,
    /// Reclaim guards that were not obtained within their timeout.
    reclaim_timeouts: u64,
    /// Pauses obtained so far, and how long the vCPUs took to leave the guest.
    pauses: u64,
    pause_wait_ns: u64,
}

/// Mode and wake-up state shared by a VM's vCPU threads and everyone steering them.
pub struct RunControl {
    state: Mutex<State>,
    changed: Condvar,
}

impl RunControl {
    /// Control for `vcpus` vCPUs, initially running.
    pub fn new(vcpus: u32) -> Self {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
            register_signal_handler(kick_signal(), on_kick).expect("install the vCPU kick signal handler");
        });
        let slots = (0..vcpus).map(|_| Slot { thread: None, immediate_exit: 0 }).collect();
        RunControl {
            state: Mutex::new(State {
                mode: Mode::Running,
                slots,
                alive: 0,
                parked: 0,
                wake_gen: 0,
                devices_busy: 0,
                pausers: 0,
                reclaiming: false,
                reclaim_queue: VecDeque::new(),
                next_ticket: 0,
                reclaim_timeouts: 0,
                pauses: 0,
                pause_wait_ns: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Registers the calling thread as vCPU `cpu`, before its run loop; the returned
    /// slot unregisters it when dropped (when the thread leaves its loop). While
    /// registered, pauses and stops kick this thread out of `KVM_RUN` by writing
    /// `*immediate_exit` and signalling the thread.
    ///
    /// # Safety
    /// `immediate_exit` must point to the `immediate_exit` byte of this vCPU's
    /// `kvm_run` mapping (or to any byte that stays valid and that only this
    /// `RunControl` writes concurrently), and stay valid until the returned slot is
    /// dropped. The calling thread must not exit before it drops the slot.
    pub unsafe fn register_vcpu(self: &Arc<Self>, cpu: u32, immediate_exit: *mut u8) -> VcpuSlot {
        let mut s = self.state.lock().unwrap();
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        s.slots[cpu as usize] = Slot { thread: Some(thread), immediate_exit: immediate_exit as usize };
        s.alive += 1;
        VcpuSlot { run: self.clone(), cpu }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: clears its immediate-exit flag,
    /// parks while paused, and says whether to go on.
    pub fn may_run(&self, cpu: u32) -> bool {
        let mut s = self.state.lock().unwrap();
        self.immediate_exit_flag(&s, cpu).store(0, Ordering::SeqCst);
        loop {
            match s.mode {
                Mode::Running => return true,
                Mode::Stopping => return false,
                Mode::Paused => {
                    s.parked += 1;
                    self.changed.notify_all();
                    while s.mode == Mode::Paused {
                        s = self.changed.wait(s).unwrap();
                    }
                    s.parked -= 1;
                }
            }
        }
    }

    /// A halted vCPU sleeps here until woken, the mode changes, or `max` passes.
    pub fn halt(&self, max: Duration) {
        let s = self.state.lock().unwrap();
        let gen = s.wake_gen;
        let _unused =
            self.changed.wait_timeout_while(s, max, |s| s.wake_gen == gen && s.mode == Mode::Running).unwrap();
    }

    /// Wakes every halted vCPU (new work for the guest).
    pub fn wake(&self) {
        self.state.lock().unwrap().wake_gen += 1;
        self.changed.notify_all();
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.state.lock().unwrap().mode
    }

    /// Asks every vCPU to stop for good.
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap();
        if s.mode != Mode::Stopping {
            s.mode = Mode::Stopping;
            self.kick_all(&s);
        }
    }

    /// Pauses the VM: returns once no vCPU is in the guest and no device thread is at
    /// work. Every success must be paired with one [`RunControl::resume`] (the guards
    /// do it); pauses by several threads nest.
    fn pause(&self, timeout: Duration) -> Result<Duration, PauseError> {
        let start = Instant::now();
        let mut s = self.state.lock().unwrap();
        if s.mode == Mode::Stopping {
            return Err(PauseError::Ending);
        }
        s.pausers += 1;
        if s.mode == Mode::Running {
            s.mode = Mode::Paused;
            self.kick_all(&s);
        }
        let (mut s, _) =
            self.changed.wait_timeout_while(s, timeout, |s| s.mode == Mode::Paused && !Self::quiet(s)).unwrap();
        if s.mode == Mode::Paused && Self::quiet(&s) {
            let waited = start.elapsed();
            s.pauses += 1;
            s.pause_wait_ns += waited.as_nanos() as u64;
            return Ok(waited);
        }
        let stopping = s.mode == Mode::Stopping;
        self.release(&mut s);
        if stopping {
            Err(PauseError::Ending)
        } else {
            Err(PauseError::TimedOut { waited: start.elapsed() })
        }
    }

    /// Pauses the VM until the guard drops: returns once no vCPU is in the guest and
    /// no device thread is at work. Fails if the VM is stopping, or did not settle
    /// within `timeout` (then nothing is held).
    pub fn pause_guard(self: &Arc<Self>, timeout: Duration) -> Result<PauseGuard, PauseError> {
        let waited = self.pause(timeout)?;
        Ok(PauseGuard { run: self.clone(), waited })
    }

    /// Pauses the VM for a reclaimer that changes how guest memory is backed (page
    /// sharing remapping pages, the swapper discarding them): like
    /// [`RunControl::pause_guard`], and exclusive among reclaimers, so that one never
    /// works on pages another is halfway through (a page evicted between page
    /// sharing's compare and its remap, or remapped between the swapper's copy and
    /// its discard). Plain pauses (the policy holding a VM, the API) do not exclude
    /// reclaimers. Reclaimers get the exclusion in the order they asked for it.
    /// Fails with [`PauseError::Ending`] if the VM is stopping, and with
    /// [`PauseError::TimedOut`] if the reclaimers ahead or the VM itself did not let
    /// go within `timeout`; then nothing is held and the caller left the queue.
    pub fn reclaim_guard(self: &Arc<Self>, timeout: Duration) -> Result<ReclaimGuard, PauseError> {
        let start = Instant::now();
        {
            let mut s = self.state.lock().unwrap();
            if s.mode == Mode::Stopping {
                return Err(PauseError::Ending);
            }
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.reclaim_queue.push_back(ticket);
            let turn = |s: &State| !s.reclaiming && s.reclaim_queue.front() == Some(&ticket);
            let (mut s, _) =
                self.changed.wait_timeout_while(s, timeout, |s| !turn(s) && s.mode != Mode::Stopping).unwrap();
            if s.mode == Mode::Stopping || !turn(&s) {
                s.reclaim_queue.retain(|&t| t != ticket);
                // The one behind may be first now.
                self.changed.notify_all();
                if s.mode == Mode::Stopping {
                    return Err(PauseError::Ending);
                }
                s.reclaim_timeouts += 1;
                return Err(PauseError::TimedOut { waited: start.elapsed() });
            }
            s.reclaim_queue.pop_front();
            s.reclaiming = true;
        }
        // Dropping the guard unpaused gives the exclusion back.
        let mut guard = ReclaimGuard { run: self.clone(), paused: false };
        match self.pause(timeout.saturating_sub(start.elapsed())) {
            Ok(_) => {}
            Err(PauseError::TimedOut { .. }) => {
                self.state.lock().unwrap().reclaim_timeouts += 1;
                return Err(PauseError::TimedOut { waited: start.elapsed() });
            }
            Err(e) => return Err(e),
        }
        guard.paused = true;
        Ok(guard)
    }

    /// Reclaim guards not obtained within their timeout so far (each one a
    /// reclaimer that had to try again later).
    pub fn reclaim_timeouts(&self) -> u64 {
        self.state.lock().unwrap().reclaim_timeouts
    }

    /// No vCPU in the guest and no device thread at work.
    fn quiet(s: &State) -> bool {
        s.parked >= s.alive && s.devices_busy == 0
    }

    /// A device thread is about to touch guest memory: waits while the VM is paused,
    /// then holds pauses off until the guard drops. None if the VM is stopping.
    pub fn device_guard(&self) -> Option<DeviceGuard<'_>> {
        let mut s = self.state.lock().unwrap();
        while s.mode == Mode::Paused {
            s = self.changed.wait(s).unwrap();
        }
        if s.mode == Mode::Stopping {
            return None;
        }
        s.devices_busy += 1;
        Some(DeviceGuard(self))
    }

    /// Ends one pause; the vCPUs run again when no other pause holds the VM.
    fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        self.release(&mut s);
    }

    fn release(&self, s: &mut State) {
        s.pausers = s.pausers.saturating_sub(1);
        if s.pausers == 0 && s.mode == Mode::Paused {
            s.mode = Mode::Running;
            self.changed.notify_all();
        }
    }

    /// Pauses obtained so far (every kind), and the total time the vCPUs and device
    /// threads took to let go.
    pub fn pause_stats(&self) -> (u64, Duration) {
        let s = self.state.lock().unwrap();
        (s.pauses, Duration::from_nanos(s.pause_wait_ns))
    }

    /// Waits until every vCPU thread has left its loop.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self.changed.wait_timeout_while(s, timeout, |s| s.alive > 0).unwrap();
        s.alive == 0
    }

    /// Pulls every registered vCPU out of the guest and wakes every sleeper.
    fn kick_all(&self, s: &State) {
        for (cpu, slot) in s.slots.iter().enumerate() {
            if let Some(thread) = slot.thread {
                self.immediate_exit_flag(s, cpu as u32).store(1, Ordering::SeqCst);
                // SAFETY: the thread is registered, so it has not exited (it
                // unregisters under this lock before it ends).
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
        }
        self.changed.notify_all();
    }

    fn immediate_exit_flag<'a>(&self, s: &'a State, cpu: u32) -> &'a AtomicU8 {
        let addr = s.slots[cpu as usize].immediate_exit;
        assert_ne!(addr, 0, "vCPU {cpu} is not registered");
        // SAFETY: the address points into the vCPU's kvm_run mapping, which lives as
        // long as the registration; KVM reads the byte, we write it atomically.
        unsafe { AtomicU8::from_ptr(addr as *mut u8) }
    }
}

/// Why a pause was not obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The VM is stopping (or stopped): nothing to hold.
    #[error("the VM is ending")]
    Ending,
    /// Another reclaimer held the VM, or a vCPU or device thread did not let go, for
    /// the whole timeout. The VM runs on; the caller may try again.
    #[error("the VM did not pause within {:.1}s (another reclaimer or a busy device held it)", waited.as_secs_f64())]
    TimedOut {
        /// How long the caller waited.
        waited: Duration,
    },
}

/// A pause of a VM, ended when dropped (see [`RunControl::pause_guard`]).
pub struct PauseGuard {
    run: Arc<RunControl>,
    waited: Duration,
}

impl PauseGuard {
    /// How long the pause took to settle (every vCPU out of the guest).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.run.resume();
    }
}

/// A device thread at work on guest memory (see [`RunControl::device_guard`]).
pub struct DeviceGuard<'a>(&'a RunControl);

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        s.devices_busy -= 1;
        self.0.changed.notify_all();
    }
}

/// A vCPU thread registered with its VM's [`RunControl`] (see
/// [`RunControl::register_vcpu`]); unregistered when dropped.
pub struct VcpuSlot {
    run: Arc<RunControl>,
    cpu: u32,
}

impl Drop for VcpuSlot {
    fn drop(&mut self) {
        let mut s = self.run.state.lock().unwrap();
        s.slots[self.cpu as usize].thread = None;
        s.alive -= 1;
        self.run.changed.notify_all();
    }
}

/// A reclaimer's exclusive pause of a VM, ended when dropped (see
/// [`RunControl::reclaim_guard`]).
pub struct ReclaimGuard {
    run: Arc<RunControl>,
    /// False while only the exclusion is held (a pause that failed).
    paused: bool,
}

impl Drop for ReclaimGuard {
    fn drop(&mut self) {
        if self.paused {
            self.run.resume();
        }
        self.run.state.lock().unwrap().reclaiming = false;
        self.run.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A fake vCPU thread: counts loop turns while it may run.
    fn vcpu(run: Arc<RunControl>, turns: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let flag = Box::leak(Box::new(0u8));
            // SAFETY: a leaked byte stays valid forever; this thread drops the slot
            // before it ends.
            let slot = unsafe { run.register_vcpu(0, flag) };
            while run.may_run(0) {
                turns.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(slot);
        })
    }

    fn still(turns: &AtomicU64) -> bool {
        let before = turns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        turns.load(Ordering::SeqCst) == before
    }

    #[test]
    fn pauses_nest_and_the_last_resume_lets_the_vm_run() {
        let run = Arc::new(RunControl::new(1));
        let turns = Arc::new(AtomicU64::new(0));
        let t = vcpu(run.clone(), turns.clone());
        let a = run.pause_guard(Duration::from_secs(5)).expect("first pause");
        let b = run.pause_guard(Duration::from_secs(5)).expect("nested pause");
        assert!(still(&turns));
        drop(a);
        assert_eq!(run.mode(), Mode::Paused, "one pauser cannot resume the VM under another");
        assert!(still(&turns));
        drop(b);
        assert_eq!(run.mode(), Mode::Running);
        let before = turns.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while turns.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "the vCPU did not run again");
            std::thread::sleep(Duration::from_millis(1));
        }
        run.stop();
        t.join().unwrap();
        assert_eq!(run.pause_guard(Duration::from_millis(10)).err(), Some(PauseError::Ending), "a stopping VM");
        assert_eq!(run.reclaim_guard(Duration::from_millis(10)).err(), Some(PauseError::Ending));
    }

    #[test]
    fn concurrent_pausers_each_hold_the_vm() {
        let run = Arc::new(RunControl::new(1));
        let turns = Arc::new(AtomicU64::new(0));
        let t = vcpu(run.clone(), turns.clone());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (run, turns) = (run.clone(), turns.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let g = run.pause_guard(Duration::from_secs(5)).expect("pause");
                        let seen = turns.load(Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(300));
                        assert_eq!(turns.load(Ordering::SeqCst), seen, "the vCPU ran during a pause");
                        drop(g);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(run.mode(), Mode::Running);
        run.stop();
        t.join().unwrap();
    }

    #[test]
    fn a_pause_that_does_not_settle_is_withdrawn() {
        let run = Arc::new(RunControl::new(1));
        let device = run.device_guard().expect("a running VM lets devices in");
        let refused = run.pause_guard(Duration::from_millis(20));
        assert!(matches!(refused, Err(PauseError::TimedOut { .. })), "a busy device thread holds the pause off");
        assert_eq!(run.mode(), Mode::Running);
        drop(device);
        let pause = run.pause_guard(Duration::from_secs(1)).expect("pause once the device is done");
        assert_eq!(run.mode(), Mode::Paused);
        drop(pause);
        assert_eq!(run.mode(), Mode::Running);
        run.stop();
        assert!(run.device_guard().is_none(), "no device work on a stopping VM");
    }

    #[test]
    fn a_panic_inside_device_work_releases_the_gate() {
        let run = Arc::new(RunControl::new(1));
        let r = run.clone();
        let worker = std::thread::spawn(move || {
            let _busy = r.device_guard().expect("running");
            panic!("device bug");
        });
        assert!(worker.join().is_err());
        assert!(run.pause_guard(Duration::from_secs(1)).is_ok(), "the panicking device thread let go");
    }

    #[test]
    fn reclaimers_exclude_each_other_but_not_plain_pauses() {
        let run = Arc::new(RunControl::new(1));
        let plain = run.pause_guard(Duration::from_secs(1)).expect("plain pause");
        let a = run.reclaim_guard(Duration::from_secs(1)).expect("a reclaimer next to a plain pause");
        let second = run.reclaim_guard(Duration::from_millis(20));
        assert!(matches!(second, Err(PauseError::TimedOut { .. })), "a second reclaimer waits");
        let waiter = {
            let run = run.clone();
            std::thread::spawn(move || run.reclaim_guard(Duration::from_secs(5)).is_ok())
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert!(waiter.join().unwrap(), "the waiting reclaimer got its turn");
        drop(plain);
        assert_eq!(run.mode(), Mode::Running, "every pause was given back");
        let device = run.device_guard().expect("running");
        assert!(run.reclaim_guard(Duration::from_millis(20)).is_err(), "a busy device thread holds it off");
        drop(device);
        assert!(run.reclaim_guard(Duration::from_secs(1)).is_ok(), "a failed attempt left nothing held");
    }

    fn queued(run: &RunControl) -> usize {
        run.state.lock().unwrap().reclaim_queue.len()
    }

    fn wait_queued(run: &RunControl, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while queued(run) != n {
            assert!(Instant::now() < deadline, "{n} reclaimers never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_reclaim_exclusion_goes_in_arrival_order() {
        let run = Arc::new(RunControl::new(1));
        let holder = run.reclaim_guard(Duration::from_secs(1)).expect("first reclaimer");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for id in 0..3usize {
            let (r, order) = (run.clone(), order.clone());
            waiters.push(std::thread::spawn(move || {
                let g = r.reclaim_guard(Duration::from_secs(10)).expect("its turn came");
                order.lock().unwrap().push(id);
                std::thread::sleep(Duration::from_millis(2));
                drop(g);
            }));
            wait_queued(&run, id + 1);
        }
        // The holder lets go and asks again at once: it goes behind the three.
        drop(holder);
        let again = run.reclaim_guard(Duration::from_secs(10)).expect("the holder's next turn");
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2], "first come, first served, and before the old holder");
        drop(again);
        waiters.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(run.reclaim_timeouts(), 0);
    }

    #[test]
    fn a_looping_reclaimer_does_not_starve_another() {
        let run = Arc::new(RunControl::new(1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let turns = Arc::new(AtomicU64::new(0));
        let looper = {
            let (run, stop, turns) = (run.clone(), stop.clone(), turns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let g = run.reclaim_guard(Duration::from_secs(10)).expect("looper");
                    std::thread::sleep(Duration::from_micros(500));
                    drop(g);
                    turns.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        while turns.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..20 {
            // With a plain condition variable the looper, awake and holding the lock
            // when it lets go, could take the exclusion back before this waiter ran.
            let g = run.reclaim_guard(Duration::from_millis(500)).expect("a turn within a few holds");
            drop(g);
        }
        stop.store(true, Ordering::SeqCst);
        looper.join().unwrap();
        assert_eq!(run.reclaim_timeouts(), 0);
    }

    #[test]
    fn a_reclaimer_that_gives_up_leaves_the_queue() {
        let run = Arc::new(RunControl::new(1));
        let holder = run.reclaim_guard(Duration::from_secs(1)).expect("first reclaimer");
        let refused = run.reclaim_guard(Duration::from_millis(20));
        assert!(matches!(refused, Err(PauseError::TimedOut { .. })), "{:?}", refused.err());
        assert_eq!(queued(&run), 0, "the ticket was withdrawn");
        assert_eq!(run.reclaim_timeouts(), 1, "the timeout is counted");
        drop(holder);
        // Were the withdrawn ticket still first, this would wait forever.
        assert!(run.reclaim_guard(Duration::from_millis(200)).is_ok());
        run.stop();
        assert_eq!(run.reclaim_guard(Duration::from_millis(10)).err(), Some(PauseError::Ending));
        assert_eq!(queued(&run), 0);
    }
}
