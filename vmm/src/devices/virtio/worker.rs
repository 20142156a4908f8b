//! The thread that serves a virtio device: waits for queue notifications
//! (ioeventfds) and the device's periodic work, and runs them under the VM's
//! device gate so that a paused VM has no device thread touching guest memory.
//!
//! Work is done in the device's bounded slices ([`VirtioDevice::process_queue`]),
//! one queue at a time, each under the device lock and the gate taken for that slice
//! only. A queue whose slice ended with chains still available stays pending and is
//! served again without a new notification. A pause waits for the slice at hand
//! only: the next one does not start while the VM is paused. The device lock is not
//! fair, so a guest that keeps handing over work could still keep it from others
//! by keeping the worker busy; the worker therefore rests [`REST`] with the lock and
//! the gate released whenever it has been busy for [`BUSY_LIMIT`] without waiting
//! for a notification. The control API and vCPU register accesses wait for the
//! device at most that long plus one slice, and such a guest gets at most
//! `BUSY_LIMIT / (BUSY_LIMIT + REST)` of one host core.
//!
//! Without an interrupt controller the guest polls its used rings, halting in
//! between; after handling notifications the worker wakes the VM's halted vCPUs
//! (what an interrupt would do), so a guest waiting for its buffers does not sleep
//! out the VMM's halt timeout.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagestate::RunControl;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, Work};

/// Longest the worker works without waiting for a notification or resting.
pub const BUSY_LIMIT: Duration = Duration::from_millis(10);
/// How long it rests then, lock and gate released.
pub const REST: Duration = Duration::from_millis(1);
/// A wait for notifications at least this long counts as a rest: others could
/// take the device meanwhile.
const IDLE: Duration = Duration::from_micros(100);

/// A running worker; dropping it stops the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Serves `device`: `notify[i]` signals queue `i`.
    pub fn spawn<D: VirtioDevice + 'static>(
        name: String,
        device: Arc<Mutex<D>>,
        notify: Vec<EventFd>,
        run: Arc<RunControl>,
    ) -> std::io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = notify.len() as u64;
        for (i, fd) in notify.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
            let mut events = vec![EpollEvent::default(); notify.len() + 1];
            let mut pending = vec![false; notify.len()];
            let mut period_ms = -1i32;
            let mut busy_since: Option<Instant> = None;
            // Runs `f` on the device under the gate; None if the VM is stopping.
            let with_device = |f: &mut dyn FnMut(&mut D)| {
                let _gate = run.device_guard()?;
                f(&mut device.lock().unwrap());
                Some(())
            };
            loop {
                let timeout = if pending.contains(&true) { 0 } else { period_ms };
                let waiting = Instant::now();
                let n = match epoll.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("{name}: epoll failed, device stopped: {e}");
                        return;
                    }
                };
                if waiting.elapsed() >= IDLE {
                    busy_since = None;
                }
                for ev in &events[..n] {
                    let token = ev.data();
                    if token == stop_token {
                        return;
                    }
                    let _ = notify[token as usize].read();
                    pending[token as usize] = true;
                }
                let mut served = false;
                for (q, more) in pending.iter_mut().enumerate() {
                    if !*more {
                        continue;
                    }
                    let start = Instant::now();
                    let mut work = Work::Done;
                    if with_device(&mut |dev| work = dev.process_queue(q)).is_none() {
                        return;
                    }
                    served = true;
                    *more = work == Work::More;
                    if busy_since.get_or_insert(start).elapsed() >= BUSY_LIMIT {
                        // Let the others in: the lock is not fair.
                        run.wake();
                        std::thread::sleep(REST);
                        busy_since = None;
                    }
                }
                let mut p = 0;
                if with_device(&mut |dev| p = dev.tick()).is_none() {
                    return;
                }
                period_ms = if p == 0 { -1 } else { p.min(i32::MAX as u64) as i32 };
                if served {
                    run.wake();
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::guest_errors::GuestErrors;
    use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
    use crate::devices::virtio::Interrupt;
    use crate::memory::{GuestRam, HostPages};

    #[test]
    fn a_queue_notification_wakes_halted_vcpus() {
        let ram = Arc::new(GuestRam::new(32 << 20, HostPages::Small).unwrap());
        let dev = Balloon::new(
            "test/balloon",
            BalloonConfig { stats_interval: Duration::ZERO, ..BalloonConfig::default() },
            ram,
            Arc::new(Interrupt::default()),
            Arc::new(GuestErrors::new("test/balloon")),
            Arc::new(AtomicU32::new(0)),
        );
        let notify: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let kick = notify[0].try_clone().unwrap();
        let run = Arc::new(RunControl::new(1));
        let _worker = Worker::spawn("test-balloon".into(), Arc::new(Mutex::new(dev)), notify, run.clone()).unwrap();
        // A vCPU halts for up to a minute; the notification must end that early
        // (without the wake-up it would sleep the whole minute).
        let halted = std::thread::spawn({
            let run = run.clone();
            move || {
                let t = Instant::now();
                run.halt(Duration::from_secs(60));
                t.elapsed()
            }
        });
        while !halted.is_finished() {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(halted.join().unwrap() < Duration::from_secs(30));
    }
}
