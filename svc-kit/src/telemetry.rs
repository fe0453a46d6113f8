//! The `tracing` subscriber every binary installs first.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs human-readable logs (or JSON with `json`), filtered by `RUST_LOG`
/// (default `info`). Safe to call more than once: later calls do nothing.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry.with(fmt::layer().json()).try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
}
