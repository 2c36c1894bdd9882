//! `swaptest` 2.0.0: plugins/swaptest's source, built as a second version (its
//! `describe()` version is this crate's, 2.0.0), so that the two can be swapped
//! for each other under load.

#[path = "../../swaptest/src/lib.rs"]
mod swaptest;

pub use swaptest::*;
