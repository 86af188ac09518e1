//! Sans-IO core of `hasyncd`, the Haven cluster daemon (DESIGN.md §6, issue 6).
//!
//! What it does:
//! - [`wire`]: the HA link datagram header, parsed with bounds checks and a size cap;
//!
//! What it does not do: sockets, timers, clock reads (time comes in as `now_ms`), threads,
//! the bus, configuration parsing (the daemon maps `haven-config` values onto the types
//! here), gratuitous ARP or address plumbing, or IKE/ESP themselves.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod msg;
pub mod wire;

pub use error::{DropReason, HaError, Result};
pub use wire::{Header, MemberId, MsgType};
