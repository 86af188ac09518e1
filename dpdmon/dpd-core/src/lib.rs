//! Sans-IO dead peer detection (DPD) core for Haven's `dpdmon`.
//!
//! What it does: holds the DPD state machine of every tunnel (100 000 and
//! more) on one hierarchical timer wheel ([`wheel`]) and decides, from the
//! inputs a driver feeds it, when to ask ikemgr for an IKEv2 liveness probe
//! (an empty INFORMATIONAL request, RFC 7296 section 1.4), when a probe is
//! retransmitted (same message ID), and when a peer is dead. Modes `disable`,
//! `on-idle`, `on-demand`, `periodic`; fixed (FortiOS) and exponential
//! (PAN-OS) retry schedules; HA roles (only the owner probes); the FortiOS
//! `dpd:` view fields; the detection budget ([`dead_after_ms`]); a serde
//! snapshot for restarts that never brings a verdict forward.
//!
//! What it does not do: no IO, no clock reads, no threads, no logging. It
//! does not send probes or flush tunnels (ikemgr does, on [`Event`]s), does
//! not read configuration files or the bus (the `dpdmon` daemon maps
//! `tunnel.state`, `esp.activity`, `ha.role` and ikemgr's probe reports onto
//! the `handle_*` calls), and does not export metrics (it keeps plain
//! counters in [`Stats`]).
//!
//! The API follows quinn-proto: getters, `handle_*` inputs that carry `now`,
//! and `poll_*` outputs; see [`Dpd`] for the polling order.

#![forbid(unsafe_code)]

mod engine;
mod settings;
pub mod wheel;

pub use engine::{
    Activity, Dpd, DpdView, Event, Phase, Snapshot, Stats, TunnelSnapshot, ViewChange,
    SNAPSHOT_VERSION,
};
pub use settings::{dead_after_ms, Mode, Role, Schedule, Settings, MAX_TRIES};

/// Errors of the DPD core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpdError {
    /// Misuse: settings a probe round cannot run with.
    #[error("invalid DPD settings: {0}")]
    InvalidSettings(&'static str),
    /// Incompatible: a snapshot written by a newer dpdmon.
    #[error("DPD snapshot version {found} is newer than the supported {supported}")]
    SnapshotVersion { found: u16, supported: u16 },
}
