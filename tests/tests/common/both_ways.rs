//! `both_ways!`: one test function run as two `#[test]`s, one per way of running
//! it. Shared by the test crates of the workspace (`swapd/tests` includes this file
//! by path), so that each says only what its two ways are.

/// Runs each named test function (`fn name(way)`) twice: as `first::name` with the
/// first argument and as `second::name` with the second. The arguments are
/// written as seen from inside those modules (`super::Mode::File`).
#[allow(unused_macros)] // not every test binary uses it
macro_rules! both_ways {
    ($first:ident => $a:expr, $second:ident => $b:expr; $($name:ident),* $(,)?) => {
        mod $first {
            $(#[test]
            fn $name() {
                super::$name($a)
            })*
        }
        mod $second {
            $(#[test]
            fn $name() {
                super::$name($b)
            })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_ways;
