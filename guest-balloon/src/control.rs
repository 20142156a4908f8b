//! The guest's side of the control page (`guest_abi::ControlPage`).
//!
//! The page is how the VMM follows and steers the guest without any exit: the guest
//! publishes its state, a heartbeat and its page counts; the VMM posts commands
//! that the serving guest runs. Both sides change the page concurrently, so every
//! field is accessed atomically, in place.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_abi::{ControlPage, CONTROL_CMD_MAX};

/// An atomic view of one field of the page.
macro_rules! field {
    ($self:ident, $atomic:ident, $field:ident) => {
        // SAFETY: the page lies in identity-mapped guest RAM for the guest's whole
        // life and its fields are naturally aligned; all accesses are atomic.
        unsafe { $atomic::from_ptr(addr_of_mut!((*$self.page).$field)) }
    };
}

/// A handle to the control page (copyable: every vCPU bumps the heartbeat).
#[derive(Clone, Copy)]
pub struct Control {
    page: *mut ControlPage,
}

impl Control {
    /// The page at guest-physical (= virtual) address `gpa`.
    pub fn new(gpa: u64) -> Control {
        Control { page: gpa as *mut ControlPage }
    }

    /// Publishes a `guest_abi::guest_state` value.
    pub fn set_state(&self, state: u32) {
        field!(self, AtomicU32, state).store(state, Ordering::Release);
    }

    /// Signals progress (the VMM's watchdog calls a guest hung when this stops).
    pub fn beat(&self) {
        field!(self, AtomicU64, heartbeat).fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the workload's counters.
    pub fn publish(&self, steps_done: u64, allocated_pages: u64, free_pages: u64) {
        field!(self, AtomicU64, steps_done).store(steps_done, Ordering::Relaxed);
        field!(self, AtomicU64, allocated_pages).store(allocated_pages, Ordering::Relaxed);
        field!(self, AtomicU64, free_pages).store(free_pages, Ordering::Release);
    }

    /// The sequence number of a posted, not yet acknowledged command.
    pub fn pending(&self) -> Option<u32> {
        let posted = field!(self, AtomicU32, cmd_seq).load(Ordering::Acquire);
        (posted != field!(self, AtomicU32, ack_seq).load(Ordering::Relaxed)).then_some(posted)
    }

    /// Copies the posted command into `buf`; returns its bytes.
    pub fn read_command<'b>(&self, buf: &'b mut [u8; CONTROL_CMD_MAX]) -> &'b [u8] {
        let len = (field!(self, AtomicU32, cmd_len).load(Ordering::Relaxed) as usize).min(CONTROL_CMD_MAX);
        // SAFETY: `cmd` is CONTROL_CMD_MAX bytes inside the page; the VMM does not
        // write it while a command is unacknowledged. Volatile: memory shared with
        // the host.
        let cmd = unsafe { addr_of_mut!((*self.page).cmd) as *const u8 };
        for (i, b) in buf[..len].iter_mut().enumerate() {
            // SAFETY: i < len <= CONTROL_CMD_MAX, see above.
            *b = unsafe { cmd.add(i).read_volatile() };
        }
        &buf[..len]
    }

    /// Reports command `seq` finished with `status` (0 = success).
    pub fn finish(&self, seq: u32, status: u32) {
        field!(self, AtomicU32, cmd_status).store(status, Ordering::Relaxed);
        field!(self, AtomicU32, ack_seq).store(seq, Ordering::Release);
    }
}
