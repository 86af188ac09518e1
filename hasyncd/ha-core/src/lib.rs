//! Sans-IO core of `hasyncd`, the Haven cluster daemon (DESIGN.md §6, issue 6).
//!
//! What it does:
//! - [`wire`]: the HA link datagram header, parsed with bounds checks and a size cap;
//! - [`link`]: the link's protection: a master key from the cluster `password` / FGSP
//!   `psksecret` (PBKDF2-HMAC-SHA256, group-specific salt), per-(sender, epoch) AES-256-GCM
//!   keys (HKDF-SHA256), nonces from the message counter, per-sender replay windows, and a
//!   typed [`DropReason`] for every rejected datagram;
//! - [`msg`]: the sync message bodies (heartbeat, IKE SA and message-ID updates, CHILD SA, deletions, outbound
//!   sequence leases and their acks, tunnel ownership claims, snapshot request/chunks) and
//!   the snapshot chunker/assembler of the Clone pattern;
//! - [`election`]: FGCP heartbeats, peer loss after `hb-lost-threshold` missed beats, and the
//!   primary election in FortiOS's documented order (see the module for the table);
//! - [`fgsp`]: the FGSP per-tunnel role table (`sync-primary`/`standby`), promotion on
//!   traffic or owner death, and outbound sequence leases with the stated no-replay bound.
//!
//! - [`liveness`]: FGSP peer up/lost tracking.
//! - [`config_sync`]: FGCP configuration checksums and the transfer of the primary's
//!   configuration text to a secondary.
//!
//! # How hasyncd drives it
//! ```text
//! start:   key  = LinkKey::derive(kind, group, secret, DEFAULT_PBKDF2_ITERATIONS)?  // refuses no secret
//!          link = HaLink::new(key, me, epoch)?   // epoch = max(stored + 1, unix ms), stored first
//!          fgcp = Fgcp::new(FgcpConfig{..}, now_ms)?        (FGCP)
//!          table = TunnelTable::new(me); live = Liveness::new(..)  (FGSP)
//! rx datagram:
//!          match link.open(bytes) { Err(reason) => count reason.label(),
//!            Ok(r) => { if r.new_epoch { send SnapshotRequest / expect one }
//!                       Heartbeat  -> fgcp.handle_heartbeat(r.sender, &hb, now_ms)
//!                       IkeSa/IkeMsgId/ChildSa/Delete -> replica store (+ table.handle_message)
//!                       Ownership/SeqLease/SeqLeaseAck/SnapshotChunk -> table.handle_message
//!                       SnapshotRequest -> msg::snapshot_chunks(id, link.next_counter(), items, max) } }
//! local:   ikemgr established a tunnel -> table.local_established; CHILD SA -> table.sa_added;
//!          espd asks for a lease -> table.propose_lease; traffic on a standby tunnel ->
//!          table.traffic_for; monitored link change -> fgcp.set_monitor_up
//! then:    drain fgcp.poll_event / table.poll_event (roles to the bus, StartSeq into
//!          ChildSaInfo::initial_seq, LeaseConfirmed to espd), send fgcp.poll_transmit and
//!          table.poll_transmit through link.seal, arm a timer at the earliest of
//!          fgcp.poll_timeout, table.poll_timeout, live.poll_timeout.
//! ```
//! An FGSP peer that is an FGCP cluster (seed 001): only the FGCP primary speaks on the FGSP
//! link, with the cluster's `group-member-id`; its secondaries keep their table from the
//! FGCP link. A new primary opens the FGSP link with an epoch above the old primary's (the
//! same member id is now on another machine: epochs must never repeat for it).
//!
//! What it does not do: sockets, timers, clock reads (time comes in as `now_ms`), threads,
//! the bus, configuration parsing (the daemon maps `haven-config` values onto the types
//! here), gratuitous ARP or address plumbing, or IKE/ESP themselves.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config_sync;
pub mod election;
mod error;
pub mod fgsp;
pub mod link;
pub mod liveness;
pub mod msg;
mod replay;
pub mod snapshot;

#[doc(hidden)]
pub mod fuzzing;
pub mod wire;

pub use election::{ElectionEvent, Fgcp, FgcpConfig, MemberStatus};
pub use error::{DropReason, HaError, Result};
pub use fgsp::{Outgoing, StartSeq, TableMode, TunnelEvent, TunnelRole, TunnelTable};
pub use link::{ClusterKind, HaLink, LinkKey, LinkStats, Received};
pub use liveness::{Liveness, PeerEvent};
pub use msg::Message;
pub use wire::{Header, MemberId, MsgType};
