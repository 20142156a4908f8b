//! vmm: a userspace hypervisor on KVM whose subject is memory reclamation.
//!
//! It boots the project's own test guest (or another 64-bit ELF kernel) natively on
//! hosts with hardware virtualisation and on PVM hosts without it, runs several VMs
//! in one process, and reclaims their memory with a virtio balloon, transparent page
//! sharing and a host swapper, steered by a free-memory policy.
//!
//! Layers, bottom up:
//! - [`memory`]: guest RAM (anonymous, private, 4 KiB host pages by default), its
//!   residency, and the discard route every reclaimer frees guest pages through;
//! - [`x86`], [`loader`], [`boot`]: long mode, page tables, PVM specifics, kernel
//!   image and boot information; [`linux`]: the Linux boot protocol (bzImage,
//!   vmlinux, zero page, ACPI, in-kernel irqchip), also used by the test guest
//!   packaged as a bzImage;
//! - [`devices`], [`console`], [`console_input`]: port I/O devices (16550 console,
//!   system ports) and the virtio-mmio balloon with its worker thread;
//! - [`vm`], [`control`], [`kvm_stats`]: one VM (its vCPU threads and exits; what
//!   other threads share of it, `VmShared`; their pause, resume and stop are
//!   `pagestate::RunControl`, shared with the reclaimers), its run-time command
//!   channel, KVM's binary statistics;
//! - [`host`]: the VMs of one process and everything that reclaims their memory,
//!   started and torn down in one order;
//! - [`reclaim`]: page sharing over the VMs of the process, a host swapper per VM,
//!   and the free-memory policy thread that drives balloons and swappers;
//! - [`api`]: the control socket (`vmm ctl`);
//! - [`config`]: what users ask for;
//! - [`demo`], [`bench`](mod@bench): `vmm demo` and the benchmarks behind `vmm bench`;
//! - [`sample`]: one snapshot of a host's memory, shown by [`top`] (`vmm top`)
//!   and recorded by [`lab`] (`vmm lab`).
//!
//! See `docs/architecture.md` for threads and the life of a guest page.

pub mod api;
pub mod bench;
pub mod boot;
pub mod config;
pub mod console;
pub mod console_input;
pub mod control;
pub mod demo;
pub mod devices;
pub mod host;
pub mod kvm_stats;
pub mod lab;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod reclaim;
pub mod sample;
pub mod top;
pub mod units;
pub mod vm;
pub mod x86;
