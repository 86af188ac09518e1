//! The one error type of this crate.

use thiserror::Error;

/// Everything that can go wrong in the ESP core.
///
/// Variants that a peer (or anyone on the path) can cause map 1:1 to a drop counter: see
/// [`EspError::drop_reason`]. Unknown SPIs are the caller's to count: this crate only ever
/// sees packets already routed to an SA.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EspError {
    // --- peer misbehaved / hostile input -------------------------------------------------
    /// Shorter than header + IV + minimal payload + ICV, (CBC) payload not block-aligned, or
    /// longer than any IP packet.
    #[error("truncated or malformed ESP packet")]
    Truncated,
    /// Outside the window or already seen (RFC 4303 §3.4.3). Also sequence number zero.
    #[error("replayed or too old sequence number")]
    Replay,
    /// ICV/tag verification failed (RFC 4303 §3.4.4).
    #[error("integrity check failed")]
    Auth,
    /// Pad Length exceeds the payload or the padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4).
    #[error("bad ESP padding")]
    Padding,
    /// Next Header is neither IPv4 (4), IPv6 (41) nor a dummy packet (59).
    #[error("unsupported next header {0}")]
    NextHeader(u8),
    /// The decrypted inner packet's header is malformed or inconsistent with its length.
    #[error("malformed inner packet header")]
    InnerHeader,
    /// The packet's SPI is not this SA's (the caller routed it to the wrong SA).
    #[error("packet SPI does not belong to this SA")]
    SpiMismatch,

    // --- local limits ------------------------------------------------------------------
    /// Outbound: the sequence number space is exhausted; the SA must be replaced (RFC 4303 §3.3.3).
    #[error("sequence number space exhausted")]
    SeqExhausted,
    /// Outbound: the next sequence number is beyond the persisted lease; persist and retry.
    #[error("sequence number lease not yet persisted")]
    LeaseExhausted,
    /// A hard byte or packet lifetime has been reached; the SA must not be used.
    #[error("SA hard lifetime reached")]
    Expired,

    // --- misuse ------------------------------------------------------------------------
    /// The output buffer cannot hold the result.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// Invalid SA parameters (key length, transform combination, window size...).
    #[error("invalid SA parameters: {0}")]
    Config(&'static str),
    /// Outbound: the inner packet is not an IPv4 or IPv6 packet (version nibble, or longer
    /// than any IP packet).
    #[error("inner packet is not IPv4 or IPv6")]
    NotIp,

    // --- internal ----------------------------------------------------------------------
    /// The crypto library reported an error other than an authentication failure.
    #[error("crypto library error")]
    Crypto,
}

/// The four families of errors (STYLE.md: peer-misbehaved, incompatible, misuse, internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The packet is bad: drop it and count it.
    PeerMisbehaved,
    /// A local limit was reached (lifetime, sequence space, lease).
    Limit,
    /// The caller used the API wrongly.
    Misuse,
    /// The crypto library failed.
    Internal,
}

/// Why a packet was dropped: one counter each (`espd_drops_total{reason=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// [`EspError::Truncated`]
    Truncated,
    /// [`EspError::Replay`]
    Replay,
    /// [`EspError::Auth`]
    Auth,
    /// [`EspError::Padding`]
    Padding,
    /// [`EspError::NextHeader`]
    NextHeader,
    /// [`EspError::InnerHeader`]
    InnerHeader,
    /// [`EspError::SpiMismatch`]
    SpiMismatch,
    /// [`EspError::SeqExhausted`]
    SeqExhausted,
    /// [`EspError::LeaseExhausted`]
    LeaseExhausted,
    /// [`EspError::Expired`]
    Expired,
    /// [`EspError::BufferTooSmall`]
    BufferTooSmall,
    /// [`EspError::Config`]
    Config,
    /// [`EspError::NotIp`]
    NotIp,
    /// [`EspError::Crypto`]
    Crypto,
    /// No SA for the packet's SPI: counted by the caller (this crate never sees such a
    /// packet), listed here so that all drop labels come from one place.
    UnknownSpi,
}

impl DropReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DropReason; 15] = [
        DropReason::Truncated,
        DropReason::Replay,
        DropReason::Auth,
        DropReason::Padding,
        DropReason::NextHeader,
        DropReason::InnerHeader,
        DropReason::SpiMismatch,
        DropReason::SeqExhausted,
        DropReason::LeaseExhausted,
        DropReason::Expired,
        DropReason::BufferTooSmall,
        DropReason::Config,
        DropReason::NotIp,
        DropReason::Crypto,
        DropReason::UnknownSpi,
    ];

    /// Position in [`DropReason::ALL`] (for per-reason counter arrays).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable label for metrics and `diagnose` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Replay => "replay",
            DropReason::Auth => "icv",
            DropReason::Padding => "padding",
            DropReason::NextHeader => "next_header",
            DropReason::InnerHeader => "inner_header",
            DropReason::SpiMismatch => "spi_mismatch",
            DropReason::SeqExhausted => "seq_exhausted",
            DropReason::LeaseExhausted => "seq_lease",
            DropReason::Expired => "expired",
            DropReason::BufferTooSmall => "buffer_too_small",
            DropReason::Config => "config",
            DropReason::NotIp => "not_ip",
            DropReason::Crypto => "crypto",
            DropReason::UnknownSpi => "unknown_spi",
        }
    }
}

impl EspError {
    /// The drop counter this error increments.
    pub const fn drop_reason(self) -> DropReason {
        match self {
            EspError::Truncated => DropReason::Truncated,
            EspError::Replay => DropReason::Replay,
            EspError::Auth => DropReason::Auth,
            EspError::Padding => DropReason::Padding,
            EspError::NextHeader(_) => DropReason::NextHeader,
            EspError::InnerHeader => DropReason::InnerHeader,
            EspError::SpiMismatch => DropReason::SpiMismatch,
            EspError::SeqExhausted => DropReason::SeqExhausted,
            EspError::LeaseExhausted => DropReason::LeaseExhausted,
            EspError::Expired => DropReason::Expired,
            EspError::BufferTooSmall => DropReason::BufferTooSmall,
            EspError::Config(_) => DropReason::Config,
            EspError::NotIp => DropReason::NotIp,
            EspError::Crypto => DropReason::Crypto,
        }
    }

    /// Which family the error belongs to.
    pub const fn kind(self) -> ErrorKind {
        match self {
            EspError::Truncated
            | EspError::Replay
            | EspError::Auth
            | EspError::Padding
            | EspError::NextHeader(_)
            | EspError::InnerHeader => ErrorKind::PeerMisbehaved,
            EspError::SeqExhausted | EspError::LeaseExhausted | EspError::Expired => {
                ErrorKind::Limit
            }
            EspError::SpiMismatch
            | EspError::BufferTooSmall
            | EspError::Config(_)
            | EspError::NotIp => ErrorKind::Misuse,
            EspError::Crypto => ErrorKind::Internal,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = EspError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_are_distinct_and_complete() {
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(
            EspError::NextHeader(7).drop_reason(),
            DropReason::NextHeader
        );
        assert_eq!(EspError::Replay.kind(), ErrorKind::PeerMisbehaved);
        assert_eq!(EspError::Expired.kind(), ErrorKind::Limit);
    }
}
