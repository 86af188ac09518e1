//! Sync message bodies: serde structs encoded as MessagePack with named fields
//! (`rmp_serde::to_vec_named`) inside the link AEAD. The header's type byte selects the
//! body type, so a body can never be read as another type.
//!
//! Field additions are compatible: unknown named fields are ignored by older readers.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{DropReason, HaError, Result};
use crate::wire::{MemberId, MsgType, MAX_BODY_LEN};

/// Key material inside a sync message. `Debug` prints `<redacted>`; the buffer is
/// overwritten with zeros on drop (best effort: copies made by the allocator on growth
/// are not reached). Serialized as a MessagePack `bin`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyBytes(pub Vec<u8>);

impl KeyBytes {
    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

impl Serialize for KeyBytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = KeyBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("key bytes")
            }
            fn visit_bytes<E: serde::de::Error>(
                self,
                v: &[u8],
            ) -> std::result::Result<KeyBytes, E> {
                Ok(KeyBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(
                self,
                v: Vec<u8>,
            ) -> std::result::Result<KeyBytes, E> {
                Ok(KeyBytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<KeyBytes, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    if out.len() >= MAX_BODY_LEN {
                        return Err(serde::de::Error::custom("key too long"));
                    }
                    out.push(b);
                }
                Ok(KeyBytes(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// FGCP role a member announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaRole {
    /// Still in the hello phase: not yet part of an election result.
    Hello,
    /// Carries the tunnels and shared addresses.
    Primary,
    /// Holds standby copies.
    Secondary,
}

/// Heartbeat (FGCP `hbdev`, or FGSP peer liveness), sent every `hb-interval`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender (also in the header; the election uses the authenticated header value).
    pub member: MemberId,
    /// Serial number / host name shown in `diagnose sys ha status`; the last election
    /// tie-breaker.
    pub serial: String,
    /// `priority` (0..=255, higher preferred).
    pub priority: u8,
    /// `override` as configured on the sender (all members should agree; see
    /// [`crate::election`]).
    #[serde(rename = "override")]
    pub override_: bool,
    /// Milliseconds since the sender's HA age started (start, or last reset by a monitored
    /// link failure).
    pub uptime_ms: u64,
    /// Monitored interfaces (`monitor`) that are up, and how many are monitored.
    pub monitor_up: u16,
    /// Number of monitored interfaces.
    pub monitor_total: u16,
    /// The sender's current role.
    pub role: HaRole,
    /// Whom the sender currently takes for primary.
    pub primary: Option<MemberId>,
    /// FGCP heartbeats: the epoch under which the sender speaks for its cluster on the FGSP
    /// link (0: it does not). The member that speaks next takes an epoch above it, so the
    /// FGSP peers, which refuse an epoch older than the last one heard for that member id,
    /// accept it whatever the two members' clocks say. Absent from older senders.
    #[serde(default)]
    pub fgsp_epoch: u64,
    /// FGCP heartbeats from the member that speaks for its cluster on the FGSP link: the
    /// FGSP peers it hears. The member that speaks next waits for their acknowledgements of
    /// its first sequence leases, as its predecessor did (it has not heard them yet itself).
    /// Empty from any other sender and absent from older ones.
    #[serde(default)]
    pub fgsp_peers: Vec<MemberId>,
}

/// One IKE SA, complete enough to continue it on another member (RFC 7296 §2.14 keys,
/// message IDs of RFC 7296 §2.2). Sent at establishment, on rekey and whenever its CHILD
/// SAs change; [`IkeMsgIdSync`] carries message-ID moves in between.
///
/// The keys, negotiated algorithms, identities and CHILD SAs travel in `state`: ikemgr's
/// own encoding of its IKE SA (`ike_proto::sa::IkeSaSnapshot`), opaque here, handed back
/// to ikemgr unchanged on takeover. The plain fields are what hasyncd itself needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSaSync {
    /// Tunnel instance (`vpn1_1`).
    pub tunnel: String,
    /// phase1-interface name (`vpn1`).
    pub phase1: String,
    /// Initiator's SPI.
    pub spi_i: u64,
    /// Responder's SPI.
    pub spi_r: u64,
    /// The peer's address and port.
    pub remote_addr: String,
    /// Next message ID we will use for a request.
    pub next_request_id: u32,
    /// Next message ID we expect in a request from the peer.
    pub next_expected_id: u32,
    /// The peer sent IKEV2_MESSAGE_ID_SYNC_SUPPORTED (RFC 6311 §4.1).
    pub msg_id_sync: bool,
    /// ikemgr's encoding of the IKE SA (keys included).
    pub state: KeyBytes,
}

/// The message IDs of an IKE SA after an exchange (RFC 7296 §2.2), sent after every
/// exchange without the keys; a full [`IkeSaSync`] goes out at establishment and rekey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeMsgIdSync {
    /// Tunnel instance.
    pub tunnel: String,
    /// Initiator's SPI.
    pub spi_i: u64,
    /// Responder's SPI.
    pub spi_r: u64,
    /// Next message ID we will use for a request.
    pub next_request_id: u32,
    /// Next message ID we expect in a request from the peer.
    pub next_expected_id: u32,
}

/// A CHILD SA lifetime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChildLifetime {
    /// Soft (rekey) lifetime left in seconds, 0 for none.
    pub soft_s: u32,
    /// Hard lifetime left in seconds, 0 for none.
    pub hard_s: u32,
    /// Soft limit in bytes, 0 for none.
    pub soft_bytes: u64,
    /// Hard limit in bytes, 0 for none.
    pub hard_bytes: u64,
}

/// One CHILD SA pair (RFC 7296 §2.17 key material per direction).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSaSync {
    /// Tunnel instance.
    pub tunnel: String,
    /// phase1-interface name.
    pub phase1: String,
    /// phase2-interface name.
    pub phase2: String,
    /// The IKE SA it belongs to.
    pub ike_spi_i: u64,
    /// The IKE SA it belongs to.
    pub ike_spi_r: u64,
    /// Inbound SPI (ours).
    pub spi_in: u32,
    /// Outbound SPI (the peer's).
    pub spi_out: u32,
    /// ESP transform, FortiOS spelling (`aes128-sha1`).
    pub transform: String,
    /// Extended sequence numbers (RFC 4303 §2.2.1).
    pub esn: bool,
    /// Inbound key block.
    pub keys_in: KeyBytes,
    /// Outbound key block.
    pub keys_out: KeyBytes,
    /// Local traffic selectors (CIDR).
    pub local_ts: Vec<String>,
    /// Remote traffic selectors (CIDR).
    pub remote_ts: Vec<String>,
    /// Routes the tunnel adds (CIDR).
    pub routes: Vec<String>,
    /// Lifetimes left when sent.
    pub lifetime: ChildLifetime,
    /// Anti-replay window in packets.
    pub replay_window: u32,
}

/// Something removed on the owner (DPD flush, delete exchange, expiry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeleteSync {
    /// An IKE SA (and with it its CHILD SAs).
    IkeSa {
        /// Tunnel instance.
        tunnel: String,
        /// Initiator's SPI.
        spi_i: u64,
        /// Responder's SPI.
        spi_r: u64,
    },
    /// One CHILD SA.
    ChildSa {
        /// Tunnel instance.
        tunnel: String,
        /// Its inbound SPI.
        spi_in: u32,
    },
    /// A whole tunnel instance (dial-up instance deleted).
    Tunnel {
        /// Tunnel instance.
        tunnel: String,
    },
}

/// An outbound sequence-number lease: the owner sends no packet with a sequence number at
/// or above `seq_hw` on this SA until a later lease for it is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqLease {
    /// Tunnel instance.
    pub tunnel: String,
    /// Outbound SPI.
    pub spi_out: u32,
    /// High-water mark (exclusive).
    pub seq_hw: u64,
}

/// Acknowledges a [`SeqLease`] (the receiver has stored `seq_hw` or more).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqLeaseAck {
    /// Tunnel instance.
    pub tunnel: String,
    /// Outbound SPI.
    pub spi_out: u32,
    /// The mark stored.
    pub seq_hw: u64,
}

/// Why a member claims a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimReason {
    /// The tunnel was established on the claimant.
    Established,
    /// IKE or ESP traffic for the tunnel arrived at the claimant.
    Traffic,
    /// The previous owner was declared dead.
    OwnerDead,
    /// Re-announced without its reason (what members before the reason was kept sent in
    /// snapshots and refreshes; also a tunnel known only from a lease or a synced SA).
    Refresh,
}

impl ClaimReason {
    /// Whether a claim for this reason shows that the claimant carries the tunnel: traffic
    /// for it arrived there, or it was established there. A claim as the successor of a
    /// member declared dead does not (the member may only have been cut off), nor does a
    /// re-announcement that does not say why.
    pub fn shows_carrier(self) -> bool {
        matches!(self, ClaimReason::Traffic | ClaimReason::Established)
    }
}

/// Per-tunnel ownership (FGSP `sync-primary`). The claim with the higher `generation` wins;
/// at equal generation the higher member id wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipClaim {
    /// Tunnel instance.
    pub tunnel: String,
    /// The member carrying it.
    pub owner: MemberId,
    /// Bumped by each takeover.
    pub generation: u64,
    /// Why.
    pub reason: ClaimReason,
}

/// Asks a member for a snapshot of everything it holds (Clone pattern, DESIGN.md §3.3), or,
/// during a transfer, for its chunks from `next` on: the acknowledgement of the windowed
/// transfer ([`crate::snapshot`]), which says every chunk below `next` arrived.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Chosen by the requester, echoed in the chunks (or the sender's id of the transfer
    /// being acknowledged).
    pub request_id: u64,
    /// The first chunk not yet received (0: from the start; then not encoded, so a plain
    /// request keeps the format it had before acknowledgements existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One item of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotItem {
    /// An IKE SA.
    IkeSa(IkeSaSync),
    /// A CHILD SA.
    ChildSa(ChildSaSync),
    /// The last lease of an outbound SA.
    Lease(SeqLease),
    /// A tunnel's owner.
    Ownership(OwnershipClaim),
}

/// A part of a snapshot. The requester applies the items once it has chunks `0..=last`, then
/// applies the updates it buffered from the same sender whose link counter is above
/// `as_of` (the sender's next counter when it took the snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The request answered.
    pub request_id: u64,
    /// Position, from 0.
    pub index: u32,
    /// Whether this is the final chunk.
    pub last: bool,
    /// Updates sent with a link counter at or above this are newer than the snapshot.
    pub as_of: u64,
    /// Items.
    pub items: Vec<SnapshotItem>,
}

/// Any sync message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// [`IkeSaSync`].
    IkeSa(IkeSaSync),
    /// [`IkeMsgIdSync`].
    IkeMsgId(IkeMsgIdSync),
    /// [`ChildSaSync`].
    ChildSa(ChildSaSync),
    /// [`DeleteSync`].
    Delete(DeleteSync),
    /// [`SeqLease`].
    SeqLease(SeqLease),
    /// [`SeqLeaseAck`].
    SeqLeaseAck(SeqLeaseAck),
    /// [`OwnershipClaim`].
    Ownership(OwnershipClaim),
    /// [`SnapshotRequest`].
    SnapshotRequest(SnapshotRequest),
    /// [`SnapshotChunk`].
    SnapshotChunk(SnapshotChunk),
    /// [`crate::config_sync::ConfigStatus`].
    ConfigStatus(crate::config_sync::ConfigStatus),
    /// [`crate::config_sync::ConfigRequest`].
    ConfigRequest(crate::config_sync::ConfigRequest),
    /// [`crate::config_sync::ConfigChunk`].
    ConfigChunk(crate::config_sync::ConfigChunk),
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(v).map_err(|e| HaError::Encode(e.to_string()))
}

/// Deepest MessagePack nesting a body may have. The deepest body type (a snapshot chunk of
/// CHILD SAs) nests 5 levels; rmp-serde's default of 1 024 recursions overflows a 2 MiB
/// thread stack in a debug build when an unknown field is skipped.
pub const MAX_DEPTH: usize = 32;

fn dec<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::result::Result<T, DropReason> {
    let mut rest = body;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    de.set_max_depth(MAX_DEPTH);
    let v = T::deserialize(&mut de).map_err(|_| DropReason::BadPayload)?;
    // Trailing bytes after the value: reject rather than ignore.
    if !rest.is_empty() {
        return Err(DropReason::BadPayload);
    }
    Ok(v)
}

impl Message {
    /// The header type byte for this body.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Heartbeat(_) => MsgType::HEARTBEAT,
            Message::IkeSa(_) => MsgType::IKE_SA,
            Message::IkeMsgId(_) => MsgType::IKE_MSG_ID,
            Message::ChildSa(_) => MsgType::CHILD_SA,
            Message::Delete(_) => MsgType::DELETE,
            Message::SeqLease(_) => MsgType::SEQ_LEASE,
            Message::SeqLeaseAck(_) => MsgType::SEQ_LEASE_ACK,
            Message::Ownership(_) => MsgType::OWNERSHIP,
            Message::SnapshotRequest(_) => MsgType::SNAPSHOT_REQUEST,
            Message::SnapshotChunk(_) => MsgType::SNAPSHOT_CHUNK,
            Message::ConfigStatus(_) => MsgType::CONFIG_STATUS,
            Message::ConfigRequest(_) => MsgType::CONFIG_REQUEST,
            Message::ConfigChunk(_) => MsgType::CONFIG_CHUNK,
        }
    }

    /// Encoded body (plaintext).
    pub fn encode_body(&self) -> Result<Vec<u8>> {
        match self {
            Message::Heartbeat(m) => enc(m),
            Message::IkeSa(m) => enc(m),
            Message::IkeMsgId(m) => enc(m),
            Message::ChildSa(m) => enc(m),
            Message::Delete(m) => enc(m),
            Message::SeqLease(m) => enc(m),
            Message::SeqLeaseAck(m) => enc(m),
            Message::Ownership(m) => enc(m),
            Message::SnapshotRequest(m) => enc(m),
            Message::SnapshotChunk(m) => enc(m),
            Message::ConfigStatus(m) => enc(m),
            Message::ConfigRequest(m) => enc(m),
            Message::ConfigChunk(m) => enc(m),
        }
    }

    /// Decode a body of type `ty`. Unknown types give [`DropReason::UnknownType`], a body
    /// that does not decode exactly (including trailing bytes) [`DropReason::BadPayload`].
    pub fn decode_body(ty: MsgType, body: &[u8]) -> std::result::Result<Message, DropReason> {
        Ok(match ty {
            MsgType::HEARTBEAT => Message::Heartbeat(dec(body)?),
            MsgType::IKE_SA => Message::IkeSa(dec(body)?),
            MsgType::IKE_MSG_ID => Message::IkeMsgId(dec(body)?),
            MsgType::CHILD_SA => Message::ChildSa(dec(body)?),
            MsgType::DELETE => Message::Delete(dec(body)?),
            MsgType::SEQ_LEASE => Message::SeqLease(dec(body)?),
            MsgType::SEQ_LEASE_ACK => Message::SeqLeaseAck(dec(body)?),
            MsgType::OWNERSHIP => Message::Ownership(dec(body)?),
            MsgType::SNAPSHOT_REQUEST => Message::SnapshotRequest(dec(body)?),
            MsgType::SNAPSHOT_CHUNK => Message::SnapshotChunk(dec(body)?),
            MsgType::CONFIG_STATUS => Message::ConfigStatus(dec(body)?),
            MsgType::CONFIG_REQUEST => Message::ConfigRequest(dec(body)?),
            MsgType::CONFIG_CHUNK => Message::ConfigChunk(dec(body)?),
            _ => return Err(DropReason::UnknownType),
        })
    }
}

/// Cut `items` into snapshot chunks whose encoded bodies each fit in `max_body` bytes
/// (at most [`MAX_BODY_LEN`]; e.g. 1 400 to keep UDP datagrams unfragmented on a 1 500-byte
/// MTU, once the 40-byte link overhead is counted). Always returns at least one chunk (an
/// empty snapshot is one empty, `last` chunk). Fails only if a single item does not fit.
pub fn snapshot_chunks(
    request_id: u64,
    as_of: u64,
    items: impl IntoIterator<Item = SnapshotItem>,
    max_body: usize,
) -> Result<Vec<SnapshotChunk>> {
    let budget = chunk_budget(max_body);
    let mut chunks = Vec::new();
    let mut cur: Vec<SnapshotItem> = Vec::new();
    let mut cur_len = 0usize;
    for item in items {
        let n = enc(&item)?.len();
        if n > budget {
            return Err(HaError::TooLarge(n));
        }
        if cur_len + n > budget {
            chunks.push(std::mem::take(&mut cur));
            cur_len = 0;
        }
        cur_len += n;
        cur.push(item);
    }
    chunks.push(cur);
    let count = chunks.len();
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, items)| SnapshotChunk {
            request_id,
            index: u32::try_from(i).unwrap_or(u32::MAX),
            last: i + 1 == count,
            as_of,
            items,
        })
        .collect())
}

/// Room for a chunk's own fields and array header (named fields: under 80 bytes).
const CHUNK_OVERHEAD: usize = 128;

/// The item bytes a chunk of at most `max_body` bytes may carry.
pub(crate) fn chunk_budget(max_body: usize) -> usize {
    max_body.min(MAX_BODY_LEN).saturating_sub(CHUNK_OVERHEAD)
}

/// The encoded length of `item`, encoded into `scratch` (cleared first, reused by the
/// caller so that sizing many items allocates nothing).
pub(crate) fn encoded_len(scratch: &mut Vec<u8>, item: &SnapshotItem) -> Result<usize> {
    scratch.clear();
    rmp_serde::encode::write_named(scratch, item).map_err(|e| HaError::Encode(e.to_string()))?;
    Ok(scratch.len())
}

/// Collects the chunks of one snapshot on the requesting side.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    request_id: u64,
    from: Option<MemberId>,
    parts: std::collections::BTreeMap<u32, SnapshotChunk>,
    last_index: Option<u32>,
}

/// A complete snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Who sent it.
    pub from: MemberId,
    /// Link counter the snapshot is current to (see [`SnapshotChunk::as_of`]).
    pub as_of: u64,
    /// All items, in chunk order.
    pub items: Vec<SnapshotItem>,
}

/// Most chunks one snapshot may have (64 KiB each: 4 GiB in all).
pub const MAX_SNAPSHOT_CHUNKS: u32 = 65_536;

impl SnapshotAssembler {
    /// Expect the answer to `request_id` from `from`.
    pub fn new(request_id: u64, from: MemberId) -> Self {
        SnapshotAssembler {
            request_id,
            from: Some(from),
            ..Default::default()
        }
    }

    /// Offer a chunk from `sender`. Returns the snapshot once every chunk arrived. Chunks of
    /// other requests or senders, duplicates, and indices beyond the announced last one are
    /// ignored (returns `None`).
    pub fn push(&mut self, sender: MemberId, chunk: SnapshotChunk) -> Option<Snapshot> {
        let from = self.from?;
        if sender != from || chunk.request_id != self.request_id {
            return None;
        }
        if chunk.index >= MAX_SNAPSHOT_CHUNKS || self.last_index.is_some_and(|l| chunk.index > l) {
            return None;
        }
        if chunk.last {
            if self.parts.keys().any(|&i| i > chunk.index) {
                return None;
            }
            self.last_index = Some(chunk.index);
        }
        self.parts.entry(chunk.index).or_insert(chunk);
        let last = self.last_index?;
        if self.parts.len() as u64 != u64::from(last) + 1 {
            return None;
        }
        let parts = std::mem::take(&mut self.parts);
        self.from = None;
        let as_of = parts.values().map(|c| c.as_of).min().unwrap_or(0);
        Some(Snapshot {
            from,
            as_of,
            items: parts.into_values().flat_map(|c| c.items).collect(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ike_sa(tunnel: &str) -> IkeSaSync {
        IkeSaSync {
            tunnel: tunnel.into(),
            phase1: "vpn1".into(),
            spi_i: 0x87458c81a3be17f9,
            spi_r: 0xc8db7d3f2c70e638,
            remote_addr: "192.168.1.2:500".into(),
            next_request_id: 5,
            next_expected_id: 3,
            msg_id_sync: true,
            state: KeyBytes(vec![7; 300]),
        }
    }

    pub(crate) fn child_sa(tunnel: &str, spi_in: u32) -> ChildSaSync {
        ChildSaSync {
            tunnel: tunnel.into(),
            phase1: "vpn1".into(),
            phase2: "vpn1".into(),
            ike_spi_i: 0x87458c81a3be17f9,
            ike_spi_r: 0xc8db7d3f2c70e638,
            spi_in,
            spi_out: 0x10aa45b0,
            transform: "aes128-sha1".into(),
            esn: false,
            keys_in: KeyBytes(vec![0x5d; 36]),
            keys_out: KeyBytes(vec![0x65; 36]),
            local_ts: vec!["0.0.0.0/0".into()],
            remote_ts: vec!["10.10.1.0/24".into()],
            routes: vec!["10.10.1.0/24".into()],
            lifetime: ChildLifetime {
                soft_s: 10_480,
                hard_s: 10_788,
                ..Default::default()
            },
            replay_window: 2048,
        }
    }

    pub(crate) fn all_samples() -> Vec<Message> {
        vec![
            Message::Heartbeat(Heartbeat {
                member: MemberId(1),
                serial: "FGVM02TM22000001".into(),
                priority: 200,
                override_: false,
                uptime_ms: 123_456,
                monitor_up: 2,
                monitor_total: 2,
                role: HaRole::Secondary,
                primary: Some(MemberId(2)),
                fgsp_epoch: 1_795_000_000_123,
                fgsp_peers: vec![MemberId(2), MemberId(3)],
            }),
            Message::IkeSa(ike_sa("vpn1_1")),
            Message::IkeMsgId(IkeMsgIdSync {
                tunnel: "vpn1_1".into(),
                spi_i: 0x87458c81a3be17f9,
                spi_r: 0xc8db7d3f2c70e638,
                next_request_id: 6,
                next_expected_id: 4,
            }),
            Message::ChildSa(child_sa("vpn1_1", 0xa575b631)),
            Message::Delete(DeleteSync::IkeSa {
                tunnel: "vpn1_2".into(),
                spi_i: 1,
                spi_r: 2,
            }),
            Message::Delete(DeleteSync::ChildSa {
                tunnel: "vpn1_2".into(),
                spi_in: 0x85700354,
            }),
            Message::Delete(DeleteSync::Tunnel {
                tunnel: "vpn1_2".into(),
            }),
            Message::SeqLease(SeqLease {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa45b0,
                seq_hw: 4096,
            }),
            Message::SeqLeaseAck(SeqLeaseAck {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa45b0,
                seq_hw: 4096,
            }),
            Message::Ownership(OwnershipClaim {
                tunnel: "vpn1_1".into(),
                owner: MemberId(3),
                generation: 2,
                reason: ClaimReason::Traffic,
            }),
            Message::SnapshotRequest(SnapshotRequest {
                request_id: 9,
                next: 0,
            }),
            Message::SnapshotChunk(SnapshotChunk {
                request_id: 9,
                index: 0,
                last: true,
                as_of: 17,
                items: vec![
                    SnapshotItem::IkeSa(ike_sa("vpn1_1")),
                    SnapshotItem::Lease(SeqLease {
                        tunnel: "vpn1_1".into(),
                        spi_out: 1,
                        seq_hw: 2,
                    }),
                ],
            }),
            Message::ConfigStatus(crate::config_sync::ConfigStatus {
                sync_config: true,
                running: crate::config_sync::ConfigSums::compute("g", "r"),
                file: None,
                text_id: crate::config_sync::Digest16::of(b"text"),
                text_len: 4,
            }),
            Message::ConfigRequest(crate::config_sync::ConfigRequest {
                text_id: crate::config_sync::Digest16::of(b"text"),
                offset: 0,
            }),
            Message::ConfigChunk(crate::config_sync::ConfigChunk {
                text_id: crate::config_sync::Digest16::of(b"text"),
                total: 4,
                offset: 0,
                data: KeyBytes(b"text".to_vec()),
            }),
        ]
    }

    #[test]
    fn every_type_round_trips_and_is_typed() {
        for m in all_samples() {
            let body = m.encode_body().unwrap();
            assert_eq!(Message::decode_body(m.msg_type(), &body).unwrap(), m);
            assert!(m.msg_type().is_known());
            // Trailing byte rejected.
            let mut long = body.clone();
            long.push(0xc0);
            assert_eq!(
                Message::decode_body(m.msg_type(), &long),
                Err(DropReason::BadPayload)
            );
            // Every truncation rejected, never a panic.
            for n in 0..body.len() {
                assert!(Message::decode_body(m.msg_type(), &body[..n]).is_err());
            }
        }
        assert_eq!(
            Message::decode_body(MsgType(0), &[0x80]),
            Err(DropReason::UnknownType)
        );
    }

    #[test]
    fn deeply_nested_unknown_field_is_rejected_without_overflow() {
        // {"x": [[[[ ... ]]]]} with tens of thousands of levels, skipped as an unknown field.
        let mut body = vec![0x81, 0xa1, b'x'];
        body.extend(std::iter::repeat_n(0x91u8, 60_000));
        body.push(0xc0);
        assert_eq!(
            Message::decode_body(MsgType::SNAPSHOT_REQUEST, &body),
            Err(DropReason::BadPayload)
        );
    }

    /// A heartbeat from a member of an older version, which sends neither `fgsp_epoch` nor
    /// `fgsp_peers`, still decodes: both are taken as absent (0, none). The other way, an
    /// older member skips them as unknown fields (below).
    #[test]
    fn a_heartbeat_without_the_newer_fields_decodes_with_their_defaults() {
        #[derive(Serialize)]
        struct OlderHeartbeat {
            member: MemberId,
            serial: String,
            priority: u8,
            #[serde(rename = "override")]
            override_: bool,
            uptime_ms: u64,
            monitor_up: u16,
            monitor_total: u16,
            role: HaRole,
            primary: Option<MemberId>,
        }
        let body = enc(&OlderHeartbeat {
            member: MemberId(7),
            serial: "HVN000000000007".into(),
            priority: 200,
            override_: false,
            uptime_ms: 5_000,
            monitor_up: 1,
            monitor_total: 1,
            role: HaRole::Primary,
            primary: Some(MemberId(7)),
        })
        .unwrap();
        let Ok(Message::Heartbeat(hb)) = Message::decode_body(MsgType::HEARTBEAT, &body) else {
            panic!("an older heartbeat must decode");
        };
        assert_eq!((hb.member, hb.priority), (MemberId(7), 200));
        assert_eq!(hb.fgsp_epoch, 0);
        assert!(hb.fgsp_peers.is_empty());
    }

    #[test]
    fn unknown_fields_within_the_depth_limit_are_skipped() {
        // {"request_id": 3, "future": [[[1]]]}: an added field of a newer version.
        let mut body = vec![0x82, 0xaa];
        body.extend_from_slice(b"request_id");
        body.push(3);
        body.push(0xa6);
        body.extend_from_slice(b"future");
        body.extend_from_slice(&[0x91, 0x91, 0x91, 0x01]);
        assert_eq!(
            Message::decode_body(MsgType::SNAPSHOT_REQUEST, &body),
            Ok(Message::SnapshotRequest(SnapshotRequest {
                request_id: 3,
                next: 0
            }))
        );
    }

    #[test]
    fn body_of_one_type_is_not_read_as_another() {
        let hb = all_samples().remove(0).encode_body().unwrap();
        assert_eq!(
            Message::decode_body(MsgType::SEQ_LEASE, &hb),
            Err(DropReason::BadPayload)
        );
    }

    #[test]
    fn keys_are_bin_and_redacted() {
        let sa = child_sa("vpn1_1", 7);
        let dbg = format!("{sa:?}");
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains("93, 93"));
        let body = rmp_serde::to_vec_named(&sa.keys_in).unwrap();
        assert_eq!(body[0], 0xc4, "msgpack bin 8");
    }

    #[test]
    fn snapshot_chunks_fit_and_reassemble() {
        let items: Vec<SnapshotItem> = (0..400)
            .map(|i| SnapshotItem::ChildSa(child_sa(&format!("vpn1_{i}"), i)))
            .collect();
        let chunks = snapshot_chunks(5, 77, items.clone(), MAX_BODY_LEN).unwrap();
        assert!(chunks.len() > 1);
        for c in &chunks {
            let n = Message::SnapshotChunk(c.clone())
                .encode_body()
                .unwrap()
                .len();
            assert!(n <= MAX_BODY_LEN, "{n}");
        }
        let small = snapshot_chunks(5, 77, items.clone(), 1400).unwrap();
        assert!(small.len() > chunks.len());
        for c in &small {
            let n = Message::SnapshotChunk(c.clone())
                .encode_body()
                .unwrap()
                .len();
            assert!(n <= 1400, "{n}");
        }
        assert!(matches!(
            snapshot_chunks(5, 77, items.clone(), 200),
            Err(HaError::TooLarge(_))
        ));
        let mut asm = SnapshotAssembler::new(5, MemberId(2));
        let mut rev = chunks.clone();
        rev.reverse();
        let n = rev.len();
        let mut done = None;
        for (i, c) in rev.into_iter().enumerate() {
            // A chunk from someone else or for another request is ignored.
            assert!(asm.push(MemberId(3), c.clone()).is_none());
            let r = asm.push(MemberId(2), c);
            if i + 1 < n {
                assert!(r.is_none());
            } else {
                done = r;
            }
        }
        let snap = done.expect("complete");
        assert_eq!(snap.items, items);
        assert_eq!(snap.as_of, 77);
        assert_eq!(snap.from, MemberId(2));

        let empty = snapshot_chunks(1, 0, Vec::new(), MAX_BODY_LEN).unwrap();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].last);
    }
}
