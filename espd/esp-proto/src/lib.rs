//! Sans-IO ESP (RFC 4303) for the espd datapath.
//!
//! What it does:
//! - tunnel-mode ESP packet transforms for one SA per direction: [`EncryptSa::encapsulate`]
//!   and [`DecryptSa::decapsulate`] write into caller buffers and allocate nothing per packet;
//!   AES-GCM-16-128/256 (RFC 4106), AES-CBC-128/256 with HMAC-SHA1-96 / HMAC-SHA2-256-128 /
//!   HMAC-SHA2-512-256 (RFC 2404, RFC 4868) and ChaCha20-Poly1305 (RFC 7634), through
//!   OpenSSL with contexts keyed once per SA;
//! - RFC 4303 §2.4 padding built and checked, Next Header 4 / 41 / 59, and the inner IP
//!   header validated against the decrypted length before it is handed out;
//! - the anti-replay window with ESN inference (RFC 4303 §3.4.3, Appendix A2; RFC 4304),
//!   checked before decryption and advanced only after the ICV verified;
//! - an outbound counter that never cycles, a rekey signal well before the end, and
//!   [`SeqLease`] blocks of sequence numbers to persist before use (crash and HA safety);
//! - per-SA packet/byte counters, drop counters per [`DropReason`], soft/hard lifetimes in
//!   bytes, packets and time polled with `now` ([`LifetimeEvent`]);
//! - RFC 3948 UDP-encapsulation demux ([`classify_udp4500`]) and builders.
//!
//! How a datapath drives it (per worker thread, per SA):
//! 1. ikemgr installs a CHILD SA: split each direction's KEYMAT with [`SaKeys::split`], build
//!    an [`EncryptSa`] (with [`OutboundOptions`]: first sequence number, optional [`SeqLease`])
//!    and a [`DecryptSa`] (replay window size, [`DEFAULT_WINDOW`] = 2048).
//! 2. Per packet: [`EncryptSa::encapsulate`] (TUN -> wire) or, after the caller found the SA
//!    by [`EspHeader::peek`]'s SPI (and, on UDP/4500, after [`classify_udp4500`]),
//!    [`DecryptSa::decapsulate`] (wire -> TUN). Errors map to [`DropReason`] counters.
//! 3. After each batch: [`EncryptSa::poll_seq_lease`] (persist or sync the mark, then
//!    [`EncryptSa::seq_lease_persisted`]) and `poll_event(now)` on both SAs (soft: ask ikemgr
//!    to rekey; hard: remove the SA). Arm a timer for `next_timeout()`.
//!
//! One SA on several worker threads: give each thread its own [`EspCrypto`] (contexts are
//! per thread), share an [`AtomicSeq`] for outbound numbers and a [`ReplayWindow`] behind a
//! lock taken only around `check` (before [`EspCrypto::open`]) and `accept` (after it), then
//! [`decode_payload`]; sum the per-thread [`Counters`] into one [`Lifetime`] per SA.
//!
//! What it does not do: sockets, TUN, threads, timers or clock reads (time comes in as
//! `now`), SPI lookup (the caller maps SPIs to SAs and counts unknown ones), selector
//! checks on the inner packet, IKE, transport mode, TFC padding on output, or ICV-failure
//! resynchronisation of ESN (RFC 4303 Appendix A3).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
mod attacks;
mod crypto;
mod error;
mod esp;
pub mod inner;
mod lifetime;
mod replay;
mod sa;
mod seq;
mod transform;
pub mod udp;
pub mod wire;

#[doc(hidden)]
pub mod fuzzing;

pub use error::{DropReason, ErrorKind, EspError, Result};
pub use esp::{decode_payload, EspCrypto};
pub use lifetime::{Counters, Lifetime, LifetimeConfig, LifetimeEvent, LimitKind};
pub use replay::{ReplayWindow, DEFAULT_WINDOW, MAX_WINDOW};
pub use sa::{Decapsulated, DecryptSa, EncryptSa, OutboundOptions, SaConfig, SaKeys};
pub use seq::{AtomicSeq, SeqLease, SEQ_SOFT_MARGIN_32, SEQ_SOFT_MARGIN_64};
pub use transform::{Encryption, Integrity, Transform, AEAD_ICV_LEN};
pub use udp::{classify_udp4500, Udp4500};
pub use wire::EspHeader;
