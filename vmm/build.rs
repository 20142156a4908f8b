//! Builds the project's test guest (`guest-balloon`, a freestanding kernel for
//! `x86_64-unknown-none`) and embeds it in the vmm binary, so that `vmm run` needs no
//! kernel argument.
//!
//! The guest is built by a nested cargo with its own target directory (so the outer
//! build's lock is not contended) and a clean environment (the outer build's
//! RUSTFLAGS would otherwise leak into a kernel build for another target).
//! `VMM_GUEST_ELF=path` embeds a guest built elsewhere instead.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    println!("cargo:rerun-if-env-changed=VMM_GUEST_ELF");
    if let Some(prebuilt) = env::var_os("VMM_GUEST_ELF") {
        // A guest built elsewhere (packaging, or a build cache).
        println!("cargo:rustc-env=VMM_BUILTIN_GUEST={}", PathBuf::from(prebuilt).display());
        return;
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.join("../guest-balloon").canonicalize().expect("guest-balloon/ next to vmm/");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    for watched in ["src", "abi/src", "Cargo.toml", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(watched).display());
    }

    ensure_guest_target();

    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir).args(["build", "--release", "--target", GUEST_TARGET, "--target-dir"]).arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the test guest");
    if !status.success() {
        panic!("building the test guest (guest-balloon) failed: see the errors above");
    }
    let elf = target_dir.join(GUEST_TARGET).join("release").join("guest-balloon");
    let dest = out_dir.join("guest-balloon.elf");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", elf.display()));
    println!("cargo:rustc-env=VMM_BUILTIN_GUEST={}", dest.display());
}

/// Hosts with `RUSTUP_AUTO_INSTALL=0` do not install the targets listed in
/// rust-toolchain.toml; add the guest target ourselves so a fresh clone builds.
fn ensure_guest_target() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()));
    let installed =
        sysroot.as_deref().map(|s| Path::new(s).join("lib/rustlib").join(GUEST_TARGET).exists()).unwrap_or(false);
    if installed {
        return;
    }
    println!("cargo:warning=installing the {GUEST_TARGET} target for the test guest (rustup target add)");
    let ok =
        Command::new("rustup").args(["target", "add", GUEST_TARGET]).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        panic!("the test guest needs the {GUEST_TARGET} target: run `rustup target add {GUEST_TARGET}`");
    }
}
