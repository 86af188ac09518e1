//! Errors of the HA core: [`HaError`] for the local side (configuration, misuse, internal)
//! and [`DropReason`] for a message from the link that was rejected.

use thiserror::Error;

/// Why an incoming HA link message was dropped. Every variant leaves all state unchanged;
/// the caller counts it by [`DropReason::label`] (`hasyncd_link_drops_total{reason=…}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than the header plus the AEAD tag.
    Truncated,
    /// Longer than [`crate::wire::MAX_MESSAGE_LEN`].
    Oversized,
    /// Version byte other than [`crate::wire::VERSION`].
    BadVersion,
    /// A message type this build does not know.
    UnknownType,
    /// The header names another cluster group.
    WrongGroup,
    /// The header names this member as the sender (a reflected or looped message).
    Reflected,
    /// A sender epoch older than the one already authenticated from that sender.
    StaleEpoch,
    /// A counter already seen, or left of the replay window.
    Replayed,
    /// The AEAD tag did not verify: forged, corrupted, or another password.
    AuthFailed,
    /// Authenticated, but the body does not decode as its type.
    BadPayload,
    /// Authenticated, but the receiver already tracks its maximum number of senders.
    TooManySenders,
}

impl DropReason {
    /// Every reason, for describing metrics at start.
    pub const ALL: [DropReason; 11] = [
        DropReason::Truncated,
        DropReason::Oversized,
        DropReason::BadVersion,
        DropReason::UnknownType,
        DropReason::WrongGroup,
        DropReason::Reflected,
        DropReason::StaleEpoch,
        DropReason::Replayed,
        DropReason::AuthFailed,
        DropReason::BadPayload,
        DropReason::TooManySenders,
    ];

    /// Position in [`DropReason::ALL`] (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Metric label value (snake_case, stable).
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Oversized => "oversized",
            DropReason::BadVersion => "bad_version",
            DropReason::UnknownType => "unknown_type",
            DropReason::WrongGroup => "wrong_group",
            DropReason::Reflected => "reflected",
            DropReason::StaleEpoch => "stale_epoch",
            DropReason::Replayed => "replayed",
            DropReason::AuthFailed => "auth_failed",
            DropReason::BadPayload => "bad_payload",
            DropReason::TooManySenders => "too_many_senders",
        }
    }

    /// True when the message could only have come from a holder of the link key (it
    /// authenticated): a bug or version skew on a member rather than an attacker.
    pub fn after_authentication(self) -> bool {
        matches!(self, DropReason::BadPayload | DropReason::TooManySenders)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Local errors of the HA core.
#[derive(Debug, Error)]
pub enum HaError {
    // --- configuration
    /// The cluster has no usable secret; the HA link refuses to run unprotected.
    #[error("no HA link without a secret: {0}")]
    NoSecret(&'static str),
    /// A configuration value out of range.
    #[error("invalid HA configuration: {0}")]
    Config(&'static str),
    // --- misuse
    /// The message to send does not fit in [`crate::wire::MAX_MESSAGE_LEN`].
    #[error("HA message of {0} bytes exceeds the link limit")]
    TooLarge(usize),
    /// The sender's counter space for this epoch is used up: restart with a new epoch.
    #[error("HA link counter exhausted for this epoch")]
    CounterExhausted,
    /// A message body could not be encoded.
    #[error("HA message encoding failed: {0}")]
    Encode(String),
    // --- internal
    /// OpenSSL failed (key derivation or AEAD).
    #[error("crypto failure: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

/// Result with [`HaError`].
pub type Result<T> = std::result::Result<T, HaError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_declaration_order_and_labels_are_unique() {
        let mut labels = std::collections::BTreeSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(labels.insert(r.label()));
        }
    }
}
