//! The thread that serves a virtio device: waits for queue notifications
//! (ioeventfds) and the device's periodic work, and runs them under the VM's
//! device gate so that a paused VM has no device thread touching guest memory.
//!
//! Without an interrupt controller the guest polls its used rings, halting in
//! between; after handling notifications the worker wakes the VM's halted vCPUs
//! (what an interrupt would do), so a guest waiting for its buffers does not sleep
//! out the VMM's halt timeout.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use pagestate::RunControl;

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
            let mut period_ms = -1i32;
            loop {
                let n = match epoll.wait(period_ms, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("{name}: epoll failed, device stopped: {e}");
                        return;
                    }
                };
                let Some(busy) = run.device_guard() else {
                    return;
                };
                let mut dev = device.lock().unwrap();
                for ev in &events[..n] {
                    let token = ev.data();
                    if token == stop_token {
                        return;
                    }
                    let _ = notify[token as usize].read();
                    dev.process_queue(token as usize);
                }
                let p = dev.tick();
                period_ms = if p == 0 { -1 } else { p.min(i32::MAX as u64) as i32 };
                drop(dev);
                drop(busy);
                if n > 0 {
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
    use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
    use crate::devices::virtio::{GuestErrors, Interrupt};
    use crate::memory::{GuestRam, HostPages};

    #[test]
    fn a_queue_notification_wakes_halted_vcpus() {
        let ram = Arc::new(GuestRam::new(32 << 20, HostPages::Small).unwrap());
        let dev = Balloon::new(
            "test/balloon",
            BalloonConfig { stats_interval: Duration::ZERO, ..BalloonConfig::default() },
            ram,
            Arc::new(Interrupt::default()),
            Arc::new(GuestErrors::default()),
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
