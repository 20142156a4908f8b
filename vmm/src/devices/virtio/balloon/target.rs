//! Who owns a balloon's target: the free-memory policy or the user.
//!
//! A leaf module: the device, its counters and the control API all name the mode.

use serde::{Deserialize, Serialize};

/// Who moves a balloon's target. A target the user sets belongs to the user until
/// handed back: the free-memory policy must never undo it 100 ms later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetMode {
    /// The free-memory policy may move it, when one runs: from boot (the boot
    /// `size` is where it starts), and again after [`Balloon::release_target`](super::Balloon::release_target).
    #[default]
    Auto,
    /// Set by the user ([`Balloon::set_target`](super::Balloon::set_target)): the policy leaves it alone.
    Pinned,
}
