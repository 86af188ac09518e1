//! The HA link datagram: a fixed clear header followed by the AEAD ciphertext and tag.
//!
//! ```text
//!  0        1        2                 4                                 8
//! +--------+--------+-----------------+---------------------------------+
//! |version |  type  |   group (BE)    |        sender member id (BE)    |
//! +--------+--------+-----------------+---------------------------------+
//! |                       sender epoch, u64 (BE)                        |  8..16
//! +---------------------------------------------------------------------+
//! |                      message counter, u64 (BE)                      | 16..24
//! +---------------------------------------------------------------------+
//! |                      stream position, u64 (BE)                      | 24..32
//! +---------------------------------------------------------------------+
//! |              AES-256-GCM ciphertext of the body ...                 | 32..
//! +---------------------------------------------------------------------+
//! |                     GCM tag, 16 bytes                               |
//! +---------------------------------------------------------------------+
//! ```
//!
//! The whole header is the AEAD's associated data (RFC 5116 §2.1), so no header bit can
//! be changed without the tag failing. `group` is the FGCP `group-id` or the FGSP
//! `standalone-group-id`; it is in clear so that a message of another group is counted as
//! such before any crypto runs. This module only frames; [`crate::link`] protects.
//!
//! The counter numbers every datagram a sender seals in an epoch; the stream position
//! numbers only those sent to every member of the link (from 1). A datagram addressed to
//! one member (a snapshot chunk or its acknowledgement) has [`FOR_ONE`] set and carries the
//! position of the sender's last datagram to every member (0: none yet). A receiver tells
//! a lost datagram from one addressed to another member by a gap in the stream positions,
//! not in the counters, and learns from any datagram how far the stream went (hasyncd's
//! loss repair).

use crate::error::DropReason;

/// Wire format version.
pub const VERSION: u8 = 2;
/// Set in [`Header::stream`] on a datagram addressed to one member; the other bits are then
/// the position of the sender's last datagram to every member.
pub const FOR_ONE: u64 = 1 << 63;
/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// AES-GCM tag length (RFC 5116 §5.1: AEAD_AES_256_GCM, 16-octet tag).
pub const TAG_LEN: usize = 16;
/// Largest datagram accepted or produced (header, ciphertext and tag). Snapshot chunks
/// are cut to fit.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Largest body (plaintext) that fits in one datagram.
pub const MAX_BODY_LEN: usize = MAX_MESSAGE_LEN - HEADER_LEN - TAG_LEN;

/// A cluster member's id on the HA link (FGSP `group-member-id`, or the id hasyncd gives
/// an FGCP member). Unique within a group: the per-sender keys and nonces depend on it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct MemberId(pub u32);

impl std::fmt::Display for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Message type byte. A newtype so that unknown codes decode and re-encode unchanged;
/// [`MsgType::is_known`] tells whether this build understands one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgType(pub u8);

impl MsgType {
    /// [`crate::msg::Heartbeat`].
    pub const HEARTBEAT: MsgType = MsgType(1);
    /// [`crate::msg::IkeSaSync`].
    pub const IKE_SA: MsgType = MsgType(2);
    /// [`crate::msg::ChildSaSync`].
    pub const CHILD_SA: MsgType = MsgType(3);
    /// [`crate::msg::DeleteSync`].
    pub const DELETE: MsgType = MsgType(4);
    /// [`crate::msg::SeqLease`].
    pub const SEQ_LEASE: MsgType = MsgType(5);
    /// [`crate::msg::SeqLeaseAck`].
    pub const SEQ_LEASE_ACK: MsgType = MsgType(6);
    /// [`crate::msg::OwnershipClaim`].
    pub const OWNERSHIP: MsgType = MsgType(7);
    /// [`crate::msg::SnapshotRequest`].
    pub const SNAPSHOT_REQUEST: MsgType = MsgType(8);
    /// [`crate::msg::SnapshotChunk`].
    pub const SNAPSHOT_CHUNK: MsgType = MsgType(9);
    /// [`crate::msg::IkeMsgIdSync`].
    pub const IKE_MSG_ID: MsgType = MsgType(10);
    /// [`crate::config_sync::ConfigStatus`].
    pub const CONFIG_STATUS: MsgType = MsgType(11);
    /// [`crate::config_sync::ConfigRequest`].
    pub const CONFIG_REQUEST: MsgType = MsgType(12);
    /// [`crate::config_sync::ConfigChunk`].
    pub const CONFIG_CHUNK: MsgType = MsgType(13);

    /// Whether this build has a body type for the code.
    pub fn is_known(self) -> bool {
        (1..=13).contains(&self.0)
    }
}

/// The clear header of a link message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`VERSION`] when produced by this build.
    pub version: u8,
    /// Body type.
    pub msg_type: MsgType,
    /// Cluster group.
    pub group: u16,
    /// Sending member.
    pub sender: MemberId,
    /// Sender epoch: strictly larger each time the sender starts (see [`crate::link`]).
    pub epoch: u64,
    /// Per-epoch message counter, strictly increasing; the AEAD nonce.
    pub counter: u64,
    /// Per-epoch position among the datagrams sent to every member (from 1); on a datagram
    /// addressed to one member, [`FOR_ONE`] with the position of the last one sent to all.
    pub stream: u64,
}

impl Header {
    /// Encoded header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        // Constant ranges into a fixed-size array: checked at compile time.
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.version;
        out[1] = self.msg_type.0;
        out[2..4].copy_from_slice(&self.group.to_be_bytes());
        out[4..8].copy_from_slice(&self.sender.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_be_bytes());
        out[16..24].copy_from_slice(&self.counter.to_be_bytes());
        out[24..32].copy_from_slice(&self.stream.to_be_bytes());
        out
    }

    /// Parse a datagram's header and split off the sealed part (ciphertext and tag).
    ///
    /// Checks, in order: length cap, minimum length (header plus tag), version. The type is
    /// returned as is (unknown codes included) so the caller decides and counts.
    pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), DropReason> {
        if datagram.len() > MAX_MESSAGE_LEN {
            return Err(DropReason::Oversized);
        }
        let (head, sealed) = datagram
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(DropReason::Truncated)?;
        if sealed.len() < TAG_LEN {
            return Err(DropReason::Truncated);
        }
        if head[0] != VERSION {
            return Err(DropReason::BadVersion);
        }
        let mut r = Reader(head);
        let header = Header {
            version: r.u8(),
            msg_type: MsgType(r.u8()),
            group: u16::from_be_bytes(r.array()),
            sender: MemberId(u32::from_be_bytes(r.array())),
            epoch: u64::from_be_bytes(r.array()),
            counter: u64::from_be_bytes(r.array()),
            stream: u64::from_be_bytes(r.array()),
        };
        Ok((header, sealed))
    }
}

/// Reader over the fixed-size header array: every read is within the array (the reads
/// in [`Header::parse`] add up to exactly [`HEADER_LEN`]), and a short read yields zeros
/// rather than a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((a, rest)) => {
                self.0 = rest;
                *a
            }
            None => [0; N],
        }
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: VERSION,
            msg_type: MsgType(0xee),
            group: 0x0102,
            sender: MemberId(0x0304_0506),
            epoch: 0x1112_1314_1516_1718,
            counter: 0x2122_2324_2526_2728,
            stream: 0x3132_3334_3536_3738,
        }
    }

    #[test]
    fn golden_header_bytes() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [
                2, 0xee, 1, 2, 3, 4, 5, 6, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x21,
                0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37,
                0x38
            ]
        );
        let mut dgram = bytes.to_vec();
        dgram.extend_from_slice(&[0xaa; TAG_LEN + 3]);
        let (back, sealed) = Header::parse(&dgram).unwrap();
        assert_eq!(back, h);
        assert_eq!(sealed.len(), TAG_LEN + 3);
        assert!(!back.msg_type.is_known());
    }

    #[test]
    fn short_long_and_version() {
        let mut dgram = sample().encode().to_vec();
        for n in 0..HEADER_LEN + TAG_LEN {
            assert_eq!(
                Header::parse(&dgram[..n.min(dgram.len())]).err(),
                Some(DropReason::Truncated),
                "{n}"
            );
            if dgram.len() <= n {
                dgram.push(0);
            }
        }
        dgram.resize(HEADER_LEN + TAG_LEN, 0);
        assert!(Header::parse(&dgram).is_ok());
        dgram.resize(MAX_MESSAGE_LEN, 0);
        assert!(Header::parse(&dgram).is_ok());
        dgram.push(0);
        assert_eq!(Header::parse(&dgram).err(), Some(DropReason::Oversized));
        dgram.truncate(HEADER_LEN + TAG_LEN);
        // The first format (a 24-byte header without the stream position) is refused.
        dgram[0] = 1;
        assert_eq!(Header::parse(&dgram).err(), Some(DropReason::BadVersion));
    }
}
