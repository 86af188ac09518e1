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
//!
//! ```
//! use dpd_core::{Activity, Dpd, Event, Mode, Settings};
//!
//! let t0 = 1_700_000_000_000; // ms, the clock of espd's activity timestamps
//! let mut dpd: Dpd<String> = Dpd::new(t0);
//! // Seed 000: `set dpd on-idle`, `set dpd-retryinterval 60`, 3 retries.
//! let vpn = "vpn1_2".to_string();
//! dpd.handle_tunnel_upsert(t0, vpn.clone(), Settings::fortios(Mode::OnIdle, 3, 60_000))?;
//! // espd batch: a packet from the peer 10 s in.
//! dpd.handle_datapath_activity(
//!     t0 + 10_000,
//!     [Activity { tunnel: &vpn, last_rx_ns: (t0 + 10_000) * 1_000_000, last_tx_ns: 0 }],
//! );
//! // The driver sleeps until poll_timeout and runs the timers.
//! let mut dead = None;
//! while let Some(at) = dpd.poll_timeout() {
//!     dpd.handle_timeout(at);
//!     while let Some(ev) = dpd.poll_event() {
//!         match ev {
//!             // ikemgr sends the INFORMATIONAL and reports its message ID.
//!             Event::SendProbe { tunnel, seqno: None, .. } => dpd.handle_probe_sent(at, &tunnel, 114),
//!             Event::SendProbe { .. } => {}
//!             Event::PeerDead { tunnel, detected_after_ms, .. } => {
//!                 dead = Some((at, detected_after_ms));
//!                 dpd.handle_tunnel_removed(at, &tunnel); // after the flush
//!             }
//!         }
//!     }
//!     while let Some(_change) = dpd.poll_view_change() { /* publish dpd.state */ }
//! }
//! // Silent from 10 s: probes at 70, 130, 190 s, verdict at 250 s.
//! assert_eq!(dead, Some((t0 + 250_000, 240_000)));
//! # Ok::<(), dpd_core::DpdError>(())
//! ```

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
