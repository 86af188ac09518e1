//! Sans-IO IKEv2 protocol core (RFC 7296) for the `ikemgr` daemon.
//!
//! What it does:
//! - [`wire`]: bounds-checked codec for IKEv2 messages and every payload of
//!   RFC 7296 §3 (plus RFC 7383 SKF), with wire enums as newtypes so unknown
//!   codes round-trip; fuzz targets live in `fuzz/` (`decode`, and
//!   `responder`, whose body is [`sa::fuzz`]).
//! - [`crypto`]: PRFs and prf+, SKEYSEED and IKE/CHILD key derivation, DH
//!   groups 2, 5, 14, 15, 16, 19, 20, 21 and 31 with peer public value
//!   validation, and SK payload protection (AES-CBC + HMAC-SHA1/SHA2,
//!   AES-GCM-16, ChaCha20-Poly1305), all through openssl.
//! - [`proposal`]: FortiOS proposal names and `dhgrp` lists mapped to
//!   transforms; proposal building and selection.
//! - [`sa`]: one IKE SA and its CHILD SAs: IKE_SA_INIT (COOKIE,
//!   INVALID_KE_PAYLOAD, NAT detection), IKE_AUTH with PSK or certificates, CREATE_CHILD_SA
//!   (new CHILD SA, CHILD SA rekey with optional PFS, IKE SA rekey,
//!   simultaneous-rekey resolution), INFORMATIONAL (liveness, deletes), with
//!   one task manager per IKE SA that owns message IDs and retransmission.
//! - [`cookie`]: responder-side half-open limits and COOKIEs (§2.6).
//! - [`ts`]: traffic selector narrowing (§2.9).
//!
//! What it does not do: sockets, timers, clock reads, configuration files,
//! the bus, or installing SAs in a datapath. A driver feeds it datagrams
//! (without the RFC 3948 non-ESP marker) and `now`, sends what
//! `poll_transmit` returns, arms `poll_timeout`, and acts on `poll_event`
//! (see [`sa`] for the polling order). Not implemented yet: EAP, IKE
//! fragmentation (RFC 7383 SKF is decoded but not reassembled), RFC 6311
//! message ID sync, MOBIKE, transport mode, ESN, CRL/OCSP checks.
//!
//! Also: [`cert`] (certificate authentication: RFC 7427 and classic RSA /
//! ECDSA signatures, CERT/CERTREQ, chain and identity checks), several
//! CHILD SA policies (phase2s) per IKE SA (`IkeConfig::more_children`), and
//! simultaneous IKE SA rekeys resolved per RFC 7296 §2.8.2.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cert;
pub mod cookie;
pub mod crypto;
pub mod proposal;
pub mod sa;
pub mod ts;
pub mod wire;

pub use sa::{
    Accepted, Addresses, ChildSaInfo, ChildSaKeys, DeleteReason, Event, IkeConfig, IkeError, IkeSa,
    IkeSaInfo, LivenessProbe, NatTraversal, Transmit,
};
