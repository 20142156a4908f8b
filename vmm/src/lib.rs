//! vmm: a userspace hypervisor on KVM whose subject is memory reclamation.
//!
//! It boots the project's own test guest (or another 64-bit ELF kernel) natively on
//! hosts with hardware virtualisation and on PVM hosts without it, runs several VMs
//! in one process, and (in later layers) reclaims their memory with a balloon,
//! transparent page sharing and a host swapper.
//!
//! Layers, bottom up:
//! - [`memory`]: guest RAM (anonymous, private, 4 KiB host pages by default);
//! - [`x86`], [`loader`], [`boot`]: long mode, page tables, PVM specifics, kernel
//!   image and boot information;
//! - [`devices`], [`console`]: port I/O devices (16550 console, system ports);
//! - [`vcpu`], [`run_control`]: vCPU threads, exits, pause/resume/stop;
//! - [`vm`], [`control`]: one VM and its run-time command channel;
//! - [`host`]: several VMs in one process;
//! - [`reclaim`]: reclaim mechanisms driven while VMs run (host swapper);
//! - [`api`]: the control socket (`vmm ctl`);
//! - [`reclaim`]: page sharing over the VMs of the process;
//! - [`config`]: what users ask for;
//! - [`bench`]: the benchmarks behind `vmm bench`.
//!
//! See `docs/architecture.md` for threads and the life of a guest page.

pub mod api;
pub mod bench;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod demo;
pub mod devices;
pub mod host;
pub mod kvm_stats;
pub mod loader;
pub mod memory;
pub mod reclaim;
pub mod run_control;
pub mod vcpu;
pub mod vm;
pub mod x86;
