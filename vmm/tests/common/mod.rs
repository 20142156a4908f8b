//! Helpers shared by the tests of the `vmm` binaries and library.
#![allow(dead_code)] // each test binary uses a different subset

mod running;
mod temp_dir;
#[allow(unused_imports)] // each test binary uses a different subset
pub use running::Running;
#[allow(unused_imports)] // each test binary uses a different subset
pub use temp_dir::TempDir;
