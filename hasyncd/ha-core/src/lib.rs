//! Sans-IO core of `hasyncd`, the Haven cluster daemon (DESIGN.md §6, issue 6).
//!
//! What it does:
//! - [`wire`]: the HA link datagram header, parsed with bounds checks and a size cap;
//! - [`link`]: the link's protection: a master key from the cluster `password` / FGSP
//!   `psksecret` (PBKDF2-HMAC-SHA256, group-specific salt), per-(sender, epoch) AES-256-GCM
//!   keys (HKDF-SHA256), nonces from the message counter, per-sender replay windows, and a
//!   typed [`DropReason`] for every rejected datagram;
//! - [`msg`]: the sync message bodies (heartbeat, IKE SA, CHILD SA, deletions, outbound
//!   sequence leases and their acks, tunnel ownership claims, snapshot request/chunks) and
//!   the snapshot chunker/assembler of the Clone pattern;
//! - [`election`]: FGCP heartbeats, peer loss after `hb-lost-threshold` missed beats, and the
//!   primary election in FortiOS's documented order (see the module for the table);
//! - [`fgsp`]: the FGSP per-tunnel role table (`sync-primary`/`standby`), promotion on
//!   traffic or owner death, and outbound sequence leases with the stated no-replay bound.
//!
//! What it does not do: sockets, timers, clock reads (time comes in as `now_ms`), threads,
//! the bus, configuration parsing (the daemon maps `haven-config` values onto the types
//! here), gratuitous ARP or address plumbing, or IKE/ESP themselves.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod election;
mod error;
pub mod fgsp;
pub mod link;
pub mod msg;
mod replay;

#[doc(hidden)]
pub mod fuzzing;
pub mod wire;

pub use election::{ElectionEvent, Fgcp, FgcpConfig, MemberStatus};
pub use error::{DropReason, HaError, Result};
pub use fgsp::{Outgoing, StartSeq, TunnelEvent, TunnelRole, TunnelTable};
pub use link::{ClusterKind, HaLink, LinkKey, LinkStats, Received};
pub use msg::Message;
pub use wire::{Header, MemberId, MsgType};
