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
//! Pauses nest: several threads (the swapper's evictor, the free-memory policy, page
//! sharing, the control API) may pause the same VM independently; it runs again only
//! when the last of them resumes. [`RunControl::pause_guard`] ties a pause to a
//! value that resumes on drop.
//!
//! Halted vCPUs (`hlt` exits, no interrupt controller) sleep on the same condition
//! variable and are woken by any mode change or an explicit [`RunControl::wake`].

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
    /// Pauses not yet resumed; the VM is paused while this is not zero.
    pausers: u32,
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
            state: Mutex::new(State { mode: Mode::Running, slots, alive: 0, parked: 0, wake_gen: 0, devices_busy: 0, pausers: 0 }),
            changed: Condvar::new(),
        }
    }

    /// Called by vCPU thread `cpu` before its loop; `immediate_exit` points into its
    /// `kvm_run` mapping, which outlives the registration.
    pub fn register(&self, cpu: u32, immediate_exit: *mut u8) {
        let mut s = self.state.lock().unwrap();
        // SAFETY: pthread_self has no preconditions.
        s.slots[cpu as usize] = Slot { thread: Some(unsafe { libc::pthread_self() }), immediate_exit: immediate_exit as usize };
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
        let _unused = self
            .changed
            .wait_timeout_while(s, max, |s| s.wake_gen == gen && s.mode == Mode::Running)
            .unwrap();
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
        self.set_mode(Mode::Stopping);
    }

    /// Pauses the VM: returns once no vCPU is in the guest and no device thread is at
    /// work, or `None` if it was stopping or did not settle within `timeout` (then
    /// this pause is withdrawn). Each successful pause must be matched by one
    /// [`RunControl::resume`]; the VM runs again after the last one.
    pub fn pause(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let first = {
            let mut s = self.state.lock().unwrap();
            if s.mode == Mode::Stopping {
                return None;
            }
            s.pausers += 1;
            s.mode != Mode::Paused
        };
        if first {
            self.set_mode(Mode::Paused);
        }
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.mode == Mode::Paused && !Self::quiet(s))
            .unwrap();
        if s.mode == Mode::Paused && Self::quiet(&s) {
            return Some(start.elapsed());
        }
        drop(s);
        self.resume();
        None
    }

    /// As [`RunControl::pause`], with a guard that resumes when dropped.
    pub fn pause_guard(self: &Arc<Self>, timeout: Duration) -> Option<PauseGuard> {
        self.pause(timeout).map(|took| PauseGuard { run: self.clone(), took })
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

    /// Withdraws one pause; the vCPUs run again when no pause is left.
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        debug_assert!(s.pausers > 0, "resume without a pause");
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

    /// Sets the mode (never leaving `Stopping`) and pulls every vCPU out of the guest.
    fn set_mode(&self, mode: Mode) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.mode == Mode::Stopping {
            return false;
        }
        s.mode = mode;
        for (cpu, slot) in s.slots.iter().enumerate() {
            if let Some(thread) = slot.thread {
                self.immediate_exit_flag(&s, cpu as u32).store(1, Ordering::SeqCst);
                // SAFETY: the thread is registered, so it has not exited (it
                // unregisters under this lock before it ends).
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
        }
        self.changed.notify_all();
        true
    }

    fn immediate_exit_flag<'a>(&self, s: &'a State, cpu: u32) -> &'a AtomicU8 {
        let addr = s.slots[cpu as usize].immediate_exit;
        assert_ne!(addr, 0, "vCPU {cpu} is not registered");
        // SAFETY: the address points into the vCPU's kvm_run mapping, which lives as
        // long as the registration; KVM reads the byte, we write it atomically.
        unsafe { AtomicU8::from_ptr(addr as *mut u8) }
    }
}

/// One pause of a VM; dropping it resumes (see [`RunControl::pause_guard`]).
pub struct PauseGuard {
    run: Arc<RunControl>,
    took: Duration,
}

impl PauseGuard {
    /// How long the VM took to settle.
    pub fn took(&self) -> Duration {
        self.took
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.run.resume();
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
}
