//! The VMM's side of the control page: run-time commands for a running test guest
//! without any exit (the guest polls the page), and the guest's progress counters.
//!
//! Protocol (see `guest_abi::ControlPage`): write the command text and its length,
//! then publish it by incrementing `cmd_seq` with release ordering; the guest answers
//! by setting `ack_seq` to that number after storing `cmd_status`.

use std::mem::offset_of;
use std::sync::atomic::Ordering;

use guest_abi::{ControlPage, CONTROL_CMD_MAX, CONTROL_PAGE_GPA};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A snapshot of what the guest publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProgress {
    /// A `guest_abi::guest_state` value.
    pub state: u32,
    /// Incremented by the guest while it makes progress.
    pub heartbeat: u64,
    /// Workload steps finished.
    pub steps_done: u64,
    /// Pages the workload holds.
    pub allocated_pages: u64,
    /// Pages free in the guest's allocator.
    pub free_pages: u64,
    /// Last command the guest finished.
    pub ack_seq: u32,
    /// Its status (0 = success).
    pub cmd_status: u32,
}

fn field(offset: usize) -> GuestAddress {
    GuestAddress(CONTROL_PAGE_GPA + offset as u64)
}

/// Reads the guest's counters.
pub fn progress(mem: &GuestMemoryMmap) -> GuestProgress {
    let u32_at = |o| mem.load::<u32>(field(o), Ordering::Acquire).unwrap_or(0);
    let u64_at = |o| mem.load::<u64>(field(o), Ordering::Acquire).unwrap_or(0);
    GuestProgress {
        state: u32_at(offset_of!(ControlPage, state)),
        heartbeat: u64_at(offset_of!(ControlPage, heartbeat)),
        steps_done: u64_at(offset_of!(ControlPage, steps_done)),
        allocated_pages: u64_at(offset_of!(ControlPage, allocated_pages)),
        free_pages: u64_at(offset_of!(ControlPage, free_pages)),
        ack_seq: u32_at(offset_of!(ControlPage, ack_seq)),
        cmd_status: u32_at(offset_of!(ControlPage, cmd_status)),
    }
}

/// The sequence number of the last command posted.
pub fn posted_seq(mem: &GuestMemoryMmap) -> u32 {
    mem.load::<u32>(field(offset_of!(ControlPage, cmd_seq)), Ordering::Acquire).unwrap_or(0)
}

/// Posts `cmd`; returns its sequence number. The caller checks the guest is idle.
pub fn post(mem: &GuestMemoryMmap, cmd: &str) -> Result<u32, String> {
    if cmd.len() > CONTROL_CMD_MAX {
        return Err(format!("command is {} bytes, at most {CONTROL_CMD_MAX}", cmd.len()));
    }
    let write_err = |e: vm_memory::GuestMemoryError| format!("writing the control page: {e}");
    mem.write_slice(cmd.as_bytes(), field(offset_of!(ControlPage, cmd))).map_err(write_err)?;
    mem.store(cmd.len() as u32, field(offset_of!(ControlPage, cmd_len)), Ordering::Release).map_err(write_err)?;
    let seq = posted_seq(mem).wrapping_add(1);
    mem.store(seq, field(offset_of!(ControlPage, cmd_seq)), Ordering::Release).map_err(write_err)?;
    Ok(seq)
}
