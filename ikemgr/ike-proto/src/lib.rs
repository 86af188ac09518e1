//! Sans-IO IKEv2 protocol core (RFC 7296).
//!
//! What it does: encodes and decodes IKEv2 messages ([`wire`]).
//!
//! What it does not do: sockets, timers, clocks, configuration files, the
//! bus, or installing SAs. A driver feeds it datagrams and `now`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod crypto;
pub mod proposal;
pub mod sa;
pub mod ts;
pub mod wire;
