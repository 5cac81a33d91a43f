//! End-to-end tests live in `tests/`; shared helpers in `tests/support/mod.rs`.
