//! The meshgate binary's library half: wiring, admin server, web listener. Used by `main.rs`
//! and by tests that run a gateway in-process.

pub mod admin;
pub mod admin_api;
pub mod app;
pub mod ctl;
pub mod fd_limit;
pub mod features;
pub mod huge_pages;
pub mod listener_limits;
pub mod logging;
pub mod process_metrics;
pub mod reload;
pub mod serve;
mod tls_stream;
pub mod tracing_export;
pub mod triggers_api;
pub mod web;

pub use app::{RunningGateway, ShutdownReport, StartError, start};
