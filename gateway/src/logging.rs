//! Logs go to stderr (stdout carries the startup banner), pretty or JSON, filtered by
//! `log.level` (a `tracing` directive) unless `RUST_LOG` is set.

use meshgate_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// lapin traces every frame it sends, the AMQP login (`connection.start-ok`, which carries
/// the password) included: its logs stop at `debug` unless a directive names lapin itself.
fn without_lapin_frames(directives: &str) -> String {
    if directives.contains("lapin") {
        directives.to_owned()
    } else {
        format!("{directives},lapin=debug")
    }
}

pub fn init(config: &LogConfig) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(without_lapin_frames(&v)).ok());
    let filter = from_env
        .or_else(|| EnvFilter::try_new(without_lapin_frames(&config.level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
