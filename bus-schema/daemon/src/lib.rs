//! The shell every Haven daemon runs in.
//!
//! What it does: parses the common command line (`--config`, `--run-dir`,
//! `--metrics-listen`, `--log-level`), prepares the run-dir (0700), loads and reloads the
//! configuration (SIGHUP or the control socket; a reload that fails validation changes
//! nothing), serves Prometheus metrics, binds the daemon's bus PUB socket and control
//! socket, follows the daemons it depends on with the Clone-pattern recovery of
//! DESIGN.md §3.3, and streams debug lines to attached `vpnctl` sessions. The daemon's own
//! behaviour is a [`DaemonLogic`] driven by a thin actix actor.
//!
//! What it does not do: any IPsec. It holds no protocol state of its own; the daemon's
//! logic owns what it publishes.

pub mod logging;
pub mod pktinfo;
mod shell;
pub mod telemetry;

pub use shell::{diff_keyed, drop_later, run, DaemonArgs, DaemonLogic, Outbox};

/// Wall-clock time in nanoseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
