//! Why a VM could not be created or started, said in one line with the VM's name.

use crate::boot::BootError;
use crate::config::ConfigError;
use crate::devices::bus::BusError;
use crate::linux::kind::KindError;
use crate::linux::platform::PlatformError;
use crate::loader::LoadError;
use crate::memory::MemoryError;
use crate::x86::msrs::MsrError;

/// `/dev/kvm` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    /// No KVM on this host.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or enable nested virtualisation)")]
    Missing,
    /// Not allowed to open it.
    #[error("no permission to open /dev/kvm: run as root or join the group that owns it (usually kvm)")]
    Permission,
    /// Anything else.
    #[error("cannot open /dev/kvm: {0}")]
    Other(kvm_ioctls::Error),
}

/// Why a VM could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// What the user asked for is wrong (the message names the VM where it matters).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be used.
    #[error(transparent)]
    Kvm(#[from] KvmOpenError),
    /// Setting the VM up failed.
    #[error("vm {vm}: {source}")]
    Setup {
        /// The VM.
        vm: String,
        /// What failed.
        #[source]
        source: SetupError,
    },
}

/// What failed while a VM was set up or started.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The kernel could not be read or loaded.
    #[error(transparent)]
    Kernel(#[from] LoadError),
    /// The kernel is none this VMM boots.
    #[error(transparent)]
    Kind(#[from] KindError),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// The ioctl and what for.
        what: String,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM or its memory slots.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The Linux boot protocol's platform (irqchip, ACPI, zero page).
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The test guest's boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// PVM's VIF area.
    #[error("the PVM VIF area: {0}")]
    Vif(#[from] MsrError),
    /// The console (its log file, or stdin forwarding).
    #[error("console: {0}")]
    Console(#[source] std::io::Error),
    /// A device could not be placed on its bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd for a device queue.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    /// A failed ioctl.
    pub(crate) fn ioctl(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
        let what = what.into();
        move |source| SetupError::Ioctl { what, source }
    }
}
