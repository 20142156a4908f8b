//! Stopping, pausing and waking a VM's vCPUs from other threads.
//!
//! Reclaim code must be able to hold every writer of guest memory: a paused VM has
//! no vCPU inside `KVM_RUN`. A vCPU is pulled out of the guest by setting its
//! `kvm_run.immediate_exit` and then sending it a signal: the flag covers the window
//! just before `KVM_RUN` is entered (the signal alone could land before it and be
//! lost), the signal covers a vCPU already running guest code. The vCPU thread
//! clears the flag, then reads the requested mode, so no request is missed.
//!
//! Device threads bracket their work on guest memory with
//! [`RunControl::device_enter`]/[`RunControl::device_exit`]; a pause also waits for
//! them, and holds them while it lasts.
//!
//! Halted vCPUs (`hlt` exits, no interrupt controller) sleep on the same condition
//! variable and are woken by any mode change or an explicit [`RunControl::wake`].
//!
//! Pauses nest: page sharing, the swapper and the control API may each pause a VM
//! at the same time, and the VM runs again only when the last of them resumes it
//! (a count of pausers, not a flag, so that no pauser resumes a VM another one still
//! needs held). [`RunControl::pause_guard`] pairs the two calls.

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
            }),
            changed: Condvar::new(),
        }
    }

    /// Called by vCPU thread `cpu` before its loop; `immediate_exit` points into its
    /// `kvm_run` mapping, which outlives the registration.
    pub fn register(&self, cpu: u32, immediate_exit: *mut u8) {
        let mut s = self.state.lock().unwrap();
        // SAFETY: pthread_self has no preconditions.
        s.slots[cpu as usize] =
            Slot { thread: Some(unsafe { libc::pthread_self() }), immediate_exit: immediate_exit as usize };
        s.alive += 1;
    }

    /// Called by vCPU thread `cpu` when it leaves its loop.
    pub fn unregister(&self, cpu: u32) {
        let mut s = self.state.lock().unwrap();
        s.slots[cpu as usize].thread = None;
        s.alive -= 1;
        self.changed.notify_all();
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
    /// work, or `None` if it was stopping or did not settle within `timeout`. Every
    /// `Some` must be paired with one [`RunControl::resume`]; pauses by several
    /// threads nest.
    pub fn pause(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut s = self.state.lock().unwrap();
        if s.mode == Mode::Stopping {
            return None;
        }
        s.pausers += 1;
        if s.mode == Mode::Running {
            s.mode = Mode::Paused;
            self.kick_all(&s);
        }
        let (mut s, _) =
            self.changed.wait_timeout_while(s, timeout, |s| s.mode == Mode::Paused && !Self::quiet(s)).unwrap();
        if s.mode == Mode::Paused && Self::quiet(&s) {
            return Some(start.elapsed());
        }
        self.release(&mut s);
        None
    }

    /// Pauses like [`RunControl::pause`]; the VM resumes when the guard drops.
    pub fn pause_guard(self: &Arc<Self>, timeout: Duration) -> Option<PauseGuard> {
        self.pause(timeout).map(|_| PauseGuard(self.clone()))
    }

    /// Pauses the VM for a reclaimer that changes how guest memory is backed (page
    /// sharing remapping pages, the swapper discarding them): like
    /// [`RunControl::pause_guard`], and exclusive among reclaimers, so that one never
    /// works on pages another is halfway through (a page evicted between page
    /// sharing's compare and its remap, or remapped between the swapper's copy and
    /// its discard). Plain pauses (the policy holding a VM, the API) do not exclude
    /// reclaimers. None if the VM is stopping, or if another reclaimer or the VM
    /// itself did not let go within `timeout`.
    pub fn reclaim_guard(self: &Arc<Self>, timeout: Duration) -> Option<ReclaimGuard> {
        let deadline = Instant::now() + timeout;
        {
            let s = self.state.lock().unwrap();
            let (mut s, _) =
                self.changed.wait_timeout_while(s, timeout, |s| s.reclaiming && s.mode != Mode::Stopping).unwrap();
            if s.reclaiming || s.mode == Mode::Stopping {
                return None;
            }
            s.reclaiming = true;
        }
        // Dropping the guard unpaused gives the exclusion back.
        let mut guard = ReclaimGuard { run: self.clone(), paused: false };
        guard.paused = self.pause(deadline.saturating_duration_since(Instant::now())).is_some();
        guard.paused.then_some(guard)
    }

    /// No vCPU in the guest and no device thread at work.
    fn quiet(s: &State) -> bool {
        s.parked >= s.alive && s.devices_busy == 0
    }

    /// A device thread is about to touch guest memory: waits while the VM is
    /// paused; false if the VM is stopping. Pair with [`RunControl::device_exit`].
    pub fn device_enter(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        while s.mode == Mode::Paused {
            s = self.changed.wait(s).unwrap();
        }
        if s.mode == Mode::Stopping {
            return false;
        }
        s.devices_busy += 1;
        true
    }

    /// The device thread is done with guest memory for now.
    pub fn device_exit(&self) {
        let mut s = self.state.lock().unwrap();
        s.devices_busy -= 1;
        self.changed.notify_all();
    }

    /// Ends one pause; the vCPUs run again when no other pause holds the VM.
    pub fn resume(&self) {
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

/// A pause of a VM, ended when dropped (see [`RunControl::pause_guard`]).
pub struct PauseGuard(Arc<RunControl>);

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.0.resume();
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
            run.register(0, flag);
            while run.may_run(0) {
                turns.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
            run.unregister(0);
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
        assert!(run.pause(Duration::from_millis(10)).is_none(), "a stopping VM cannot be paused");
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
        assert!(run.device_enter());
        assert!(run.pause(Duration::from_millis(20)).is_none(), "a busy device thread holds the pause off");
        assert_eq!(run.mode(), Mode::Running);
        run.device_exit();
        assert!(run.pause(Duration::from_secs(1)).is_some());
        run.resume();
        assert_eq!(run.mode(), Mode::Running);
    }

    #[test]
    fn reclaimers_exclude_each_other_but_not_plain_pauses() {
        let run = Arc::new(RunControl::new(1));
        let plain = run.pause_guard(Duration::from_secs(1)).expect("plain pause");
        let a = run.reclaim_guard(Duration::from_secs(1)).expect("a reclaimer next to a plain pause");
        assert!(run.reclaim_guard(Duration::from_millis(20)).is_none(), "a second reclaimer waits");
        let waiter = {
            let run = run.clone();
            std::thread::spawn(move || run.reclaim_guard(Duration::from_secs(5)).is_some())
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert!(waiter.join().unwrap(), "the waiting reclaimer got its turn");
        drop(plain);
        assert_eq!(run.mode(), Mode::Running, "every pause was given back");
        assert!(run.device_enter());
        assert!(run.reclaim_guard(Duration::from_millis(20)).is_none(), "a busy device thread holds it off");
        run.device_exit();
        assert!(run.reclaim_guard(Duration::from_secs(1)).is_some(), "a failed attempt left nothing held");
    }
}
