//! The VMM's own I/O ports (see `guest_abi`): how a guest ends the VM with an exit
//! code, marks its first instruction, and wakes its halted vCPUs.

/// What a write to a system port asks of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum SystemEvent {
    /// The guest ends the VM with this code.
    Exit(u32),
    /// The guest's first instruction ran.
    BootMarker,
    /// Wake every halted vCPU of the VM.
    Kick,
}

/// Decodes an `out` to one of the system ports; `None` if the port is not one.
pub fn decode_out(port: u16, data: &[u8]) -> Option<SystemEvent> {
    match port {
        guest_abi::EXIT_PORT => {
            let mut bytes = [0u8; 4];
            let n = data.len().min(4);
            bytes[..n].copy_from_slice(&data[..n]);
            Some(SystemEvent::Exit(u32::from_le_bytes(bytes)))
        }
        guest_abi::BOOT_MARKER_PORT => Some(SystemEvent::BootMarker),
        guest_abi::KICK_PORT => Some(SystemEvent::Kick),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_of_every_width() {
        assert_eq!(decode_out(guest_abi::EXIT_PORT, &[7]), Some(SystemEvent::Exit(7)));
        assert_eq!(decode_out(guest_abi::EXIT_PORT, &[0, 3, 0, 0]), Some(SystemEvent::Exit(0x300)));
        assert_eq!(decode_out(guest_abi::KICK_PORT, &[0]), Some(SystemEvent::Kick));
        assert_eq!(decode_out(0x80, &[0]), None);
    }
}
