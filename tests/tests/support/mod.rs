//! The shared helpers now live in this crate's library (`tests/src/lib.rs`); this module keeps
//! `mod support; use support::...;` in the older test files working.
#![allow(unused_imports)]

pub use meshgate_tests::*;
