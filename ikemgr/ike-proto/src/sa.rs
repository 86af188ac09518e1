//! One IKE SA and its CHILD SAs: the exchanges of RFC 7296 driven by a
//! sans-IO task manager that alone owns message IDs and retransmission.
//!
//! # Driving an [`IkeSa`]
//! Create one with [`IkeSa::initiate`] or, on a first IKE_SA_INIT request
//! that passed the [`crate::cookie::CookieGuard`], with [`IkeSa::accept`].
//! Then, after every input:
//! 1. feed inputs: [`IkeSa::handle_datagram`] for each datagram whose SPIs
//!    belong to this SA (route by our own SPI, see [`IkeSa::local_spis`];
//!    a retransmitted IKE_SA_INIT has a zero responder SPI, route it by
//!    initiator SPI and source address), with the addresses it travelled
//!    on and without the RFC 3948 non-ESP marker; [`IkeSa::handle_timeout`]
//!    when the instant from `poll_timeout` has passed; and the mutators
//!    (`start_liveness_check`, `rekey_child`, `create_child`, `rekey_ike`,
//!    `delete_child`, `delete`);
//! 2. drain [`IkeSa::poll_transmit`] and send each datagram from
//!    `Transmit::source` (port 4500 means: prepend the non-ESP marker);
//! 3. drain [`IkeSa::poll_event`] (install CHILD SAs inbound first, then
//!    outbound; re-index SPIs on `IkeSaRekeyed`; drop the SA after
//!    `IkeSaDeleted` for its current SPIs);
//! 4. arm a timer for [`IkeSa::poll_timeout`].
//!
//! Every input carries `now`; nothing here reads a clock or touches a socket.

use crate::crypto::{
    derive_child_keys, derive_ike_keys, sha1, skeyseed, skeyseed_rekey, CryptoError, Encr, IkeKeys,
    Integ, KeyExchange, Secret, SkCipher,
};
use crate::proposal::{
    accept_esp_reply, accept_ike_reply, esp_proposals, ike_proposals, select_esp, select_ike,
    EspAlgs, EspSuite, IkeAlgs, IkeSuite,
};
use crate::ts;
use crate::wire::{
    decode_chain, encode_chain, AuthMethod, AuthPayload, DecodeError, DeletePayload, DhGroup,
    ExchangeType, Flags, Header, IdPayload, KePayload, Message, NotifyPayload, NotifyType, Payload,
    PayloadType, ProtocolId, TrafficSelector, IKEV2_VERSION,
};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the SA layer, split as STYLE.md asks: the peer misbehaved, we
/// are incompatible, the caller misused the API, or something internal.
#[derive(Debug, thiserror::Error)]
pub enum IkeError {
    /// Peer: undecodable message.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// Peer: message does not fit the exchange or state.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// Peer: wrong or replayed message ID (dropped, §2.3).
    #[error("message id {got} outside the window (expected {expected})")]
    InvalidMessageId {
        /// What arrived.
        got: u32,
        /// What was expected.
        expected: u32,
    },
    /// Peer: integrity check or decryption failed.
    #[error("integrity check failed")]
    Integrity,
    /// Peer: SPIs do not belong to this SA.
    #[error("SPIs do not match this IKE SA")]
    WrongSa,
    /// Peer: invalid DH public value or similar crypto-level refusal.
    #[error("crypto: {0}")]
    Crypto(CryptoError),
    /// Incompatible: no proposal in common.
    #[error("no proposal chosen")]
    NoProposalChosen,
    /// Misuse: the SA is not established or already closed.
    #[error("IKE SA not established")]
    NotEstablished,
    /// Misuse: no such CHILD SA.
    #[error("no CHILD SA with inbound SPI {0:08x}")]
    UnknownChild(u32),
    /// Internal: a broken invariant or resource (entropy) failure.
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl From<CryptoError> for IkeError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::IntegrityCheckFailed => IkeError::Integrity,
            other => IkeError::Crypto(other),
        }
    }
}

impl IkeError {
    /// Short label of the error's kind, for drop counters
    /// (`ikemgr_drops_total{reason}`).
    pub fn kind(&self) -> &'static str {
        match self {
            IkeError::Decode(_) => "decode",
            IkeError::Unexpected(_) => "unexpected",
            IkeError::InvalidMessageId { .. } => "message_id",
            IkeError::Integrity => "integrity",
            IkeError::WrongSa => "wrong_sa",
            IkeError::Crypto(_) => "crypto",
            IkeError::NoProposalChosen => "no_proposal",
            IkeError::NotEstablished => "not_established",
            IkeError::UnknownChild(_) => "unknown_child",
            IkeError::Internal(_) => "internal",
        }
    }

    /// The Notify a responder would answer with, where one applies.
    pub fn notify(&self) -> Option<NotifyType> {
        match self {
            IkeError::Decode(DecodeError::InvalidMajorVersion(_)) => {
                Some(NotifyType::INVALID_MAJOR_VERSION)
            }
            IkeError::Decode(_) | IkeError::Unexpected(_) => Some(NotifyType::INVALID_SYNTAX),
            IkeError::NoProposalChosen => Some(NotifyType::NO_PROPOSAL_CHOSEN),
            IkeError::InvalidMessageId { .. } => Some(NotifyType::INVALID_MESSAGE_ID),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, IkeError>;

/// Source of randomness for SPIs, nonces and IVs. Tests inject chosen
/// nonces through it; DH private keys always come from openssl.
pub trait Entropy: Send {
    /// Fills `buf` with random octets.
    fn fill(&mut self, buf: &mut [u8]) -> std::result::Result<(), CryptoError>;
}

/// openssl's CSPRNG.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> std::result::Result<(), CryptoError> {
        crate::crypto::random_bytes(buf)
    }
}

/// Initiator retransmission schedule: the wait after the first send, after
/// the first retransmission, and so on; after the last one the exchange
/// fails. Retransmissions are byte-identical (§2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetransmitPolicy {
    /// Waits, in order.
    pub timeouts: Vec<Duration>,
}

impl Default for RetransmitPolicy {
    fn default() -> Self {
        RetransmitPolicy {
            timeouts: [2, 4, 8, 16, 32].map(Duration::from_secs).to_vec(),
        }
    }
}

/// Policy of one gateway (phase1 + phase2), shared by its IKE SAs.
#[derive(Clone, Debug)]
pub struct IkeConfig {
    /// Phase1 proposals in preference order.
    pub ike_proposals: Vec<IkeAlgs>,
    /// Phase1 `dhgrp`, first one used for the initial KE.
    pub ike_groups: Vec<DhGroup>,
    /// Phase2 proposals.
    pub esp_proposals: Vec<EspAlgs>,
    /// Phase2 `dhgrp` when `pfs enable`; empty for no PFS.
    pub pfs_groups: Vec<DhGroup>,
    /// Pre-shared key.
    pub psk: Secret,
    /// Our identity (IDi or IDr).
    pub local_id: IdPayload,
    /// Required peer identity (`peertype one` + `peerid`); None = any.
    pub peer_id: Option<IdPayload>,
    /// Our side's selectors (`src-subnet`).
    pub local_ts: Vec<TrafficSelector>,
    /// The peer's side (`dst-subnet`).
    pub remote_ts: Vec<TrafficSelector>,
    /// IKE SA lifetime (`keylife`).
    pub ike_lifetime: Duration,
    /// CHILD SA lifetime (`keylifeseconds`).
    pub child_lifetime: Duration,
    /// Initiator retransmission schedule.
    pub retransmit: RetransmitPolicy,
    /// Rekey this long before the hard lifetime, minus up to `rekey_jitter`.
    pub rekey_margin: Duration,
    /// Random extra earliness of soft expiries, so peers do not collide.
    pub rekey_jitter: Duration,
    /// `nattraversal enable|disable|forced` (RFC 3948, §2.23).
    pub nat_traversal: NatTraversal,
    /// Further phase2s of the same phase1, each with its own CHILD SA (policy
    /// index 1, 2, … in [`ChildSaInfo::policy`]; the fields above are policy
    /// 0). As initiator of the IKE SA we create policy 0's CHILD SA with
    /// IKE_AUTH and one CREATE_CHILD_SA per further policy; as responder we
    /// answer each request with the first policy whose proposals and
    /// selectors fit (§2.9).
    pub more_children: Vec<ChildPolicy>,
    /// Certificate authentication (FortiOS `authmethod signature`): when
    /// set, we sign our AUTH with this certificate's key (sending CERT,
    /// CERTREQ and SIGNATURE_HASH_ALGORITHMS) and require the peer to sign
    /// with a certificate that chains to the trusted CAs and names its ID;
    /// `psk` is then unused. When None, both sides use the PSK.
    pub cert: Option<Arc<crate::cert::CertAuth>>,
    /// Policies (phase2 indexes) whose CHILD SAs this SA does not rekey at their soft
    /// lifetime by itself: the driver decides with [`IkeSa::rekey_child`] (FortiOS
    /// `keepalive disable`: only an SA that carried traffic is rekeyed). They are still
    /// deleted at their hard lifetime.
    pub driver_rekeys: Vec<usize>,
}

/// What one CHILD SA negotiates (one FortiOS phase2-interface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildPolicy {
    /// Phase2 proposals.
    pub esp_proposals: Vec<EspAlgs>,
    /// `dhgrp` when `pfs enable`; empty for no PFS.
    pub pfs_groups: Vec<DhGroup>,
    /// Our side's selectors (`src-subnet`).
    pub local_ts: Vec<TrafficSelector>,
    /// The peer's side (`dst-subnet`).
    pub remote_ts: Vec<TrafficSelector>,
    /// CHILD SA lifetime (`keylifeseconds`).
    pub lifetime: Duration,
}

/// NAT traversal mode (FortiOS `nattraversal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NatTraversal {
    /// Send NAT_DETECTION_* and float to 4500 when a NAT is detected.
    #[default]
    Enable,
    /// Send no NAT_DETECTION_* notifies; never float.
    Disable,
    /// Make the peer see a NAT in front of us (a NAT_DETECTION_SOURCE_IP
    /// that cannot match) and always float to 4500, like strongSwan's
    /// `encap = yes`.
    Forced,
}

/// UDP port of IKE and ESP after a NAT float (RFC 3948 §2.2).
pub const NAT_T_PORT: u16 = 4500;

impl IkeConfig {
    /// A PSK gateway with FortiOS' defaults (`aes128-sha256 aes256-sha256`,
    /// `dhgrp 14 5`, keylife 86400, keylifeseconds 43200, 0/0 selectors).
    pub fn psk(psk: &[u8], local_id: IdPayload) -> Self {
        let any = TrafficSelector::subnet(IpAddr::from([0, 0, 0, 0]), 0);
        IkeConfig {
            ike_proposals: crate::proposal::phase1_list("aes128-sha256 aes256-sha256")
                .unwrap_or_default(),
            ike_groups: vec![DhGroup::MODP2048, DhGroup::MODP1536],
            esp_proposals: crate::proposal::phase2_list("aes128-sha256 aes256-sha256")
                .unwrap_or_default(),
            pfs_groups: Vec::new(),
            psk: Secret::new(psk.to_vec()),
            local_id,
            peer_id: None,
            local_ts: vec![any.clone()],
            remote_ts: vec![any],
            ike_lifetime: Duration::from_secs(86400),
            child_lifetime: Duration::from_secs(43200),
            retransmit: RetransmitPolicy::default(),
            rekey_margin: Duration::from_secs(30),
            rekey_jitter: Duration::from_secs(10),
            nat_traversal: NatTraversal::Enable,
            more_children: Vec::new(),
            cert: None,
            driver_rekeys: Vec::new(),
        }
    }

    /// How many CHILD SA policies (phase2s) this gateway has: 1 + `more_children`.
    pub fn policy_count(&self) -> usize {
        1 + self.more_children.len()
    }

    /// CHILD SA policy `i` (0 is the first phase2, held in the fields above).
    pub fn policy(&self, i: usize) -> Option<ChildPolicy> {
        if i == 0 {
            return Some(ChildPolicy {
                esp_proposals: self.esp_proposals.clone(),
                pfs_groups: self.pfs_groups.clone(),
                local_ts: self.local_ts.clone(),
                remote_ts: self.remote_ts.clone(),
                lifetime: self.child_lifetime,
            });
        }
        self.more_children.get(i - 1).cloned()
    }
}

/// Local and remote transport addresses of the IKE SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// Our address and port.
    pub local: SocketAddr,
    /// The peer's.
    pub remote: SocketAddr,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// From.
    pub source: SocketAddr,
    /// To.
    pub destination: SocketAddr,
    /// IKE message bytes.
    pub payload: Vec<u8>,
}

/// Keys of one CHILD SA, resolved to our directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSaKeys {
    /// Decryption key (+4-octet salt for AEAD) for inbound ESP.
    pub encr_in: Secret,
    /// Integrity key for inbound ESP (empty for AEAD).
    pub integ_in: Secret,
    /// Encryption key (+salt) for outbound ESP.
    pub encr_out: Secret,
    /// Integrity key for outbound ESP.
    pub integ_out: Secret,
}

/// Everything the datapath needs to install a CHILD SA pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSaInfo {
    /// IKE SA initiator SPI at creation.
    pub ike_spi_i: u64,
    /// IKE SA responder SPI at creation.
    pub ike_spi_r: u64,
    /// SPI the peer puts in ESP packets to us.
    pub inbound_spi: u32,
    /// SPI we put in ESP packets to the peer.
    pub outbound_spi: u32,
    /// ESP encryption.
    pub encr: Encr,
    /// ESP integrity (None for AEAD).
    pub integ: Option<Integ>,
    /// Extended sequence numbers (always false here).
    pub esn: bool,
    /// PFS group used for this SA's keys, if any.
    pub pfs_group: Option<DhGroup>,
    /// Keys.
    pub keys: ChildSaKeys,
    /// Our selectors.
    pub local_ts: Vec<TrafficSelector>,
    /// The peer's selectors.
    pub remote_ts: Vec<TrafficSelector>,
    /// Hard lifetime.
    pub lifetime: Duration,
    /// When we will start a rekey (from creation).
    pub soft_lifetime: Duration,
    /// The CHILD SA (by inbound SPI) this one replaces.
    pub rekey_of: Option<u32>,
    /// True when we sent the request that created it.
    pub initiator: bool,
    /// The CHILD SA policy (phase2) it was negotiated for, see
    /// [`IkeConfig::more_children`].
    pub policy: usize,
}

/// IKE SA summary for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkeSaInfo {
    /// Initiator SPI.
    pub spi_i: u64,
    /// Responder SPI.
    pub spi_r: u64,
    /// True when we are the (original or rekey) initiator of this SA.
    pub initiator: bool,
    /// Negotiated algorithms.
    pub suite: IkeSuite,
    /// Our identity.
    pub local_id: IdPayload,
    /// The peer's authenticated identity.
    pub remote_id: IdPayload,
    /// NAT detected in front of us (§2.23).
    pub local_behind_nat: bool,
    /// NAT detected in front of the peer.
    pub remote_behind_nat: bool,
    /// Hard lifetime.
    pub lifetime: Duration,
}

/// An established IKE SA with its CHILD SAs, for HA replication
/// (DESIGN §6): enough for a standby to continue without renegotiation.
/// Times are relative (`*_expires_in`) so the snapshot can cross processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkeSaSnapshot {
    /// SPIs, role, algorithms, identities and NAT state.
    pub info: IkeSaInfo,
    /// The seven IKE SA secrets.
    pub keys: IkeKeys,
    /// ID of our next request.
    pub next_send: u32,
    /// ID expected on the peer's next request.
    pub next_recv: u32,
    /// Transport addresses.
    pub addresses: Addresses,
    /// Time left until the IKE SA's hard expiry.
    pub expires_in: Duration,
    /// CHILD SAs with the time left until each one's hard expiry.
    pub children: Vec<(ChildSaInfo, Duration)>,
    /// The peer announced RFC 6311 message ID synchronisation in IKE_AUTH.
    pub mid_sync: bool,
    /// An RFC 6311 synchronisation was started on this SA (by any member): on an AEAD SA
    /// no other may follow ([`IkeSa::sync_message_ids`]).
    pub mid_sync_spent: bool,
}

/// Why an SA went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// We asked for it.
    Local,
    /// The peer sent a Delete.
    Peer,
    /// Replaced by a rekey.
    Rekeyed,
    /// A redundant SA from a simultaneous rekey (§2.8.1).
    Redundant,
    /// Hard lifetime reached.
    Expired,
    /// The peer stopped answering (retransmissions exhausted).
    Timeout,
    /// Authentication failed.
    AuthFailed,
    /// The peer answered with an error notify, or negotiation failed.
    Failed(NotifyType),
}

/// What [`IkeSa::probe_liveness`] put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessProbe {
    /// A new empty INFORMATIONAL request with this message ID.
    Sent(u32),
    /// The unanswered liveness request with this message ID, again.
    Retransmitted(u32),
    /// Nothing yet: another exchange holds the window; the check follows it.
    Queued,
}

/// Outputs for the driver, from [`IkeSa::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Authentication succeeded; the IKE SA is up.
    IkeSaEstablished(IkeSaInfo),
    /// A CHILD SA is up: install inbound, then outbound.
    ChildSaEstablished(Box<ChildSaInfo>),
    /// A CHILD SA is gone: remove both directions.
    ChildSaDeleted {
        /// Its inbound SPI.
        inbound_spi: u32,
        /// Its outbound SPI.
        outbound_spi: u32,
        /// Why.
        reason: DeleteReason,
    },
    /// Creating a CHILD SA failed (the IKE SA stays).
    ChildSaFailed {
        /// Error notify from the peer, or ours.
        notify: NotifyType,
    },
    /// The IKE SA was rekeyed: route the new SPIs here too. The old ones
    /// stay routable until `IkeSaDeleted` with `reason: Rekeyed` names them.
    IkeSaRekeyed {
        /// The new SA.
        new: IkeSaInfo,
        /// Old initiator SPI.
        old_spi_i: u64,
        /// Old responder SPI.
        old_spi_r: u64,
    },
    /// The IKE SA with these SPIs is gone.
    IkeSaDeleted {
        /// Initiator SPI.
        spi_i: u64,
        /// Responder SPI.
        spi_r: u64,
        /// Why.
        reason: DeleteReason,
    },
    /// Authentication failed (either side's check).
    AuthFailed {
        /// What failed.
        reason: &'static str,
    },
    /// Our liveness check was answered.
    LivenessReply,
    /// Our liveness check got no answer within the retransmit schedule.
    LivenessTimeout,
    /// RFC 6311 message ID synchronisation completed: as the member that asked
    /// (`initiated`) or as the peer that answered; the IDs now in force.
    MessageIdsSynced {
        /// We sent the request.
        initiated: bool,
        /// ID of our next request.
        next_send: u32,
        /// ID we expect on the peer's next request.
        next_recv: u32,
    },
    /// Our RFC 6311 synchronisation request on an AEAD IKE SA got no answer in time: it is
    /// not sent again (a peer that got it could not encrypt a second response with message
    /// ID 0), and the SA continues with the IDs it proposed, taking the peer's next
    /// request within the catch-up window.
    MessageIdSyncUnanswered {
        /// ID of our next request (the M1 sent).
        next_send: u32,
        /// ID we expect on the peer's next request (the P1 sent).
        next_recv: u32,
    },
    /// A restored SA took the peer's request `got` where its copy expected `expected`
    /// (the previous owner answered the ones between; see [`IkeSa::restore`]).
    MessageIdsCaughtUp {
        /// ID the copy expected.
        expected: u32,
        /// ID of the authenticated request taken.
        got: u32,
    },
    /// Message IDs of the current IKE SA changed (for HA sync).
    MessageIdUpdate {
        /// Initiator SPI.
        spi_i: u64,
        /// Responder SPI.
        spi_r: u64,
        /// ID of our next request.
        next_send: u32,
        /// ID we expect on the peer's next request.
        next_recv: u32,
    },
}

/// Proof that the peer's AUTH payload was verified; only [`verify_auth`]
/// and [`verify_cert_auth`] make one, and installing the first CHILD SA requires it.
#[derive(Clone, Copy)]
struct AuthVerified(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InitSent,
    AuthSent,
    InitReplied,
    Established,
    Closed,
}

struct Keys {
    suite: IkeSuite,
    sk: IkeKeys,
    out: SkCipher,
    inb: SkCipher,
}

impl Keys {
    /// Boxed: a `Channel` is inline in the SA up to five times (current, old, rekey swap,
    /// collision, redundant), mostly without keys.
    fn new(suite: IkeSuite, sk: IkeKeys, initiator: bool) -> Box<Keys> {
        let (oe, oa, ie, ia) = if initiator {
            (&sk.sk_ei, &sk.sk_ai, &sk.sk_er, &sk.sk_ar)
        } else {
            (&sk.sk_er, &sk.sk_ar, &sk.sk_ei, &sk.sk_ai)
        };
        let out = SkCipher::new(suite.encr, suite.integ, oe.clone(), oa.clone());
        let inb = SkCipher::new(suite.encr, suite.integ, ie.clone(), ia.clone());
        Box::new(Keys {
            suite,
            sk,
            out,
            inb,
        })
    }
}

enum Task {
    Init,
    Auth,
    Liveness,
    DeleteChild,
    DeleteIke,
    CreateChild {
        spi: u32,
        ni: Vec<u8>,
        kex: Option<KeyExchange>,
        rekey_of: Option<u32>,
        policy: usize,
    },
    RekeyIke {
        spi: u64,
        ni: Vec<u8>,
        kex: KeyExchange,
    },
}

struct Outstanding {
    mid: u32,
    bytes: Vec<u8>,
    task: Task,
    tries: usize,
    deadline: Instant,
    /// What was sealed, for a request of an established SA: it can go again under another
    /// message ID ([`IkeSa::adopt_copy_message_ids`]).
    reseal: Option<(ExchangeType, Vec<Payload>)>,
}

/// Message-ID engine and keys of one SPI pair.
struct Channel {
    spi_i: u64,
    spi_r: u64,
    initiator: bool,
    keys: Option<Box<Keys>>,
    next_send: u32,
    next_recv: u32,
    /// Boxed for the same reason as [`Keys`]: most channels have no request outstanding.
    outstanding: Option<Box<Outstanding>>,
    last_response: Option<(u32, Vec<u8>)>,
    /// An RFC 6311 synchronisation was started on these keys, here or by the cluster
    /// member this SA was copied from ([`mid_sync`]'s rule: at most one on an AEAD SA).
    mid_sync_spent: bool,
    /// Restored from a copy that may be behind on the peer's requests: the first
    /// authenticated request with an ID up to [`mid_sync::MID_CATCH_UP`] above the one
    /// expected is taken (the previous owner answered the ones between).
    catch_up: bool,
}

impl Channel {
    fn new(spi_i: u64, spi_r: u64, initiator: bool) -> Channel {
        Channel {
            spi_i,
            spi_r,
            initiator,
            keys: None,
            next_send: 0,
            next_recv: 0,
            outstanding: None,
            last_response: None,
            mid_sync_spent: false,
            catch_up: false,
        }
    }
    fn local_spi(&self) -> u64 {
        if self.initiator {
            self.spi_i
        } else {
            self.spi_r
        }
    }
}

/// Transient data of IKE_SA_INIT and IKE_AUTH.
struct Handshake {
    ni: Vec<u8>,
    nr: Vec<u8>,
    kex: Option<KeyExchange>,
    request: Vec<u8>,
    response: Vec<u8>,
    cookie: Option<Vec<u8>>,
    cookie_rounds: u8,
    ke_rounds: u8,
    child_spi: u32,
    /// Hash algorithms the peer announced (RFC 7427 §4).
    peer_hashes: Vec<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Liveness,
    DeleteChild(u32, DeleteReason),
    DeleteIke,
    /// A new CHILD SA for policy (phase2) index.
    CreateChild(usize),
    RekeyChild(u32),
    RekeyIke,
}

struct Collision {
    /// Nonces of the peer's rekey exchange we answered.
    nonces: [Vec<u8>; 2],
}

struct ChildSa {
    info: ChildSaInfo,
    soft: Instant,
    hard: Instant,
    rekeying: bool,
    replaced: bool,
    collision: Option<Collision>,
}

/// Result of [`IkeSa::accept`].
pub enum Accepted {
    /// A new half-open IKE SA; its response is in `poll_transmit`.
    Sa(Box<IkeSa>),
    /// A stateless reply (INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN): send it
    /// and keep no state.
    Reply(Transmit),
}

/// Nonce length we send (§2.10: at least half the PRF key size, 16..256).
pub const NONCE_LEN: usize = 32;
const NONCE_MIN: usize = 16;
const NONCE_MAX: usize = 256;
const KEY_PAD: &[u8] = b"Key Pad for IKEv2";
const MAX_COOKIE_ROUNDS: u8 = 3;
const MAX_KE_ROUNDS: u8 = 2;

/// One IKE SA (and, during an IKE rekey, its predecessor) with its CHILD SAs.
pub struct IkeSa {
    cfg: Arc<IkeConfig>,
    addrs: Addresses,
    entropy: Box<dyn Entropy>,
    state: State,
    chan: Channel,
    old: Option<Channel>,
    hs: Option<Handshake>,
    children: Vec<ChildSa>,
    pending: VecDeque<Request>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    remote_id: Option<IdPayload>,
    nat: (bool, bool),
    ike_soft: Option<Instant>,
    ike_hard: Option<Instant>,
    ike_rekeying: bool,
    last_peer_activity: Option<Instant>,
    auth: Option<AuthVerified>,
    /// New SA from an IKE rekey we answered; swapped in after the response.
    pending_swap: Option<Channel>,
    /// The peer's new IKE SA from a rekey we answered while our own IKE
    /// rekey was outstanding (§2.8.2), with that exchange's nonces.
    ike_collision: Option<(Channel, [Vec<u8>; 2])>,
    /// A redundant new IKE SA of a simultaneous rekey (§2.8.2), kept until
    /// its Delete exchange is over (ours to send, or the peer's to answer).
    redundant: Option<Channel>,
    /// When a redundant SA the peer should delete is dropped without its
    /// Delete (the peer may never have seen its own rekey complete).
    redundant_until: Option<Instant>,
    /// The peer deleted the current SA in the request being answered while
    /// its successor waits in `pending_swap`: drop it after the swap.
    drop_old_after_swap: bool,
    /// The peer deleted the old (rekeyed) SA in the request being answered.
    old_deleted: bool,
    /// The peer deleted this IKE SA in the request being answered.
    peer_deleted_ike: bool,
    /// PFS group the responder asked for with INVALID_KE_PAYLOAD.
    pfs_retry: Option<DhGroup>,
    /// Set by [`IkeSa::probe_liveness`]: liveness checks are retransmitted only by the
    /// caller and abandoned when this long passes without a call.
    liveness_hold: Option<Duration>,
    /// The peer announced `IKEV2_MESSAGE_ID_SYNC_SUPPORTED` (RFC 6311, [`mid_sync`]).
    peer_mid_sync: bool,
    /// Our outstanding RFC 6311 synchronisation request.
    mid_sync: Option<mid_sync::MidSyncOut>,
    /// A synchronisation is reserved ([`IkeSa::reserve_mid_sync`]) with this M1 and waits
    /// for the cluster to record it: no request of ours starts meanwhile.
    mid_sync_hold: Option<u32>,
}

impl core::fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IkeSa")
            .field("spi_i", &format_args!("{:016x}", self.chan.spi_i))
            .field("spi_r", &format_args!("{:016x}", self.chan.spi_r))
            .field("state", &self.state)
            .field("children", &self.children.len())
            .finish()
    }
}

fn find_notify(p: &[Payload], ty: NotifyType) -> Option<&NotifyPayload> {
    p.iter().find_map(|x| match x {
        Payload::Notify(n) if n.ty == ty => Some(n),
        _ => None,
    })
}

fn first_error_notify(p: &[Payload]) -> Option<NotifyType> {
    p.iter().find_map(|x| match x {
        Payload::Notify(n) if n.ty.is_error() => Some(n.ty),
        _ => None,
    })
}

fn nonce_of(p: &[Payload]) -> Result<Vec<u8>> {
    let n = p
        .iter()
        .find_map(|x| match x {
            Payload::Nonce(n) => Some(n.clone()),
            _ => None,
        })
        .ok_or(IkeError::Unexpected("missing Nonce"))?;
    if !(NONCE_MIN..=NONCE_MAX).contains(&n.len()) {
        return Err(IkeError::Unexpected("nonce length"));
    }
    Ok(n)
}

fn ke_of(p: &[Payload]) -> Option<&KePayload> {
    p.iter().find_map(|x| match x {
        Payload::Ke(k) => Some(k),
        _ => None,
    })
}

fn sa_of(p: &[Payload]) -> Option<&[crate::wire::Proposal]> {
    p.iter().find_map(|x| match x {
        Payload::Sa(s) => Some(s.as_slice()),
        _ => None,
    })
}

fn ts_of(p: &[Payload]) -> (Option<&[TrafficSelector]>, Option<&[TrafficSelector]>) {
    let i = p.iter().find_map(|x| match x {
        Payload::TsI(t) => Some(t.as_slice()),
        _ => None,
    });
    let r = p.iter().find_map(|x| match x {
        Payload::TsR(t) => Some(t.as_slice()),
        _ => None,
    });
    (i, r)
}

fn unknown_critical(p: &[Payload]) -> Option<PayloadType> {
    p.iter().find_map(|x| match x {
        Payload::Unknown {
            ty, critical: true, ..
        } => Some(*ty),
        _ => None,
    })
}

fn nat_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> Result<Vec<u8>> {
    let ip = match addr.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    Ok(sha1(&[
        &spi_i.to_be_bytes(),
        &spi_r.to_be_bytes(),
        &ip,
        &addr.port().to_be_bytes(),
    ])?)
}

/// AUTH for PSK (§2.15): prf(prf(PSK, "Key Pad for IKEv2"),
/// RealMessage | PeerNonce | prf(SK_p, IDPayloadBody)).
fn psk_auth(
    suite: &IkeSuite,
    psk: &[u8],
    real_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id: &IdPayload,
) -> Result<Vec<u8>> {
    let maced_id = suite.prf.prf(sk_p, &id.body())?;
    let key = suite.prf.prf(psk, KEY_PAD)?;
    Ok(suite
        .prf
        .prf_parts(&key, &[real_message, peer_nonce, &maced_id])?)
}

/// Signed octets of §2.15 for signature authentication:
/// RealMessage | PeerNonce | prf(SK_p, IDPayloadBody).
fn signed_octets(
    suite: &IkeSuite,
    real_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id: &IdPayload,
) -> Result<Vec<u8>> {
    let maced_id = suite.prf.prf(sk_p, &id.body())?;
    Ok([real_message, peer_nonce, &maced_id].concat())
}

/// Verifies a peer's certificate authentication: CERT payloads (end-entity
/// first) chain to a trusted CA, the certificate names the peer's `id`,
/// and the AUTH signature over `octets` verifies with its key.
fn verify_cert_auth(
    cert: &crate::cert::CertAuth,
    now: Instant,
    p: &[Payload],
    id: &IdPayload,
    auth: &AuthPayload,
    octets: &[u8],
) -> std::result::Result<AuthVerified, &'static str> {
    let ders: Vec<Vec<u8>> = p
        .iter()
        .filter_map(|x| match x {
            Payload::Cert(enc, d) if *enc == crate::wire::CertEncoding::X509_SIG => Some(d.clone()),
            _ => None,
        })
        .collect();
    let (leaf, intermediates) = ders.split_first().ok_or("peer sent no X.509 certificate")?;
    let key = cert
        .trust
        .verify_chain(leaf, intermediates, now)
        .map_err(|_| "peer certificate does not chain to a trusted CA")?;
    crate::cert::id_in_cert(id, leaf).map_err(|_| "peer identity is not in its certificate")?;
    crate::cert::verify_signature(&key, auth, octets)
        .map_err(|_| "peer AUTH signature does not verify")?;
    Ok(AuthVerified(()))
}

fn verify_auth(expected: &[u8], got: &AuthPayload) -> Option<AuthVerified> {
    (got.method == AuthMethod::SHARED_KEY_MIC
        && got.data.len() == expected.len()
        && openssl::memcmp::eq(expected, &got.data))
    .then_some(AuthVerified(()))
}

fn lowest_nonce<'a>(a: &'a [Vec<u8>; 2], b: &'a [Vec<u8>; 2]) -> bool {
    // True when exchange `a` holds the lowest of the four nonces (§2.8.1).
    let min_a = a.iter().min();
    let min_b = b.iter().min();
    min_a < min_b
}

impl IkeSa {
    fn blank(cfg: Arc<IkeConfig>, addrs: Addresses, entropy: Box<dyn Entropy>) -> IkeSa {
        IkeSa {
            cfg,
            addrs,
            entropy,
            state: State::InitSent,
            chan: Channel::new(0, 0, true),
            old: None,
            hs: None,
            children: Vec::new(),
            pending: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            remote_id: None,
            nat: (false, false),
            ike_soft: None,
            ike_hard: None,
            ike_rekeying: false,
            last_peer_activity: None,
            auth: None,
            pending_swap: None,
            ike_collision: None,
            redundant: None,
            redundant_until: None,
            drop_old_after_swap: false,
            old_deleted: false,
            peer_deleted_ike: false,
            pfs_retry: None,
            liveness_hold: None,
            peer_mid_sync: false,
            mid_sync: None,
            mid_sync_hold: None,
        }
    }

    fn random(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.entropy.fill(&mut v)?;
        Ok(v)
    }
    fn random_u64(&mut self) -> Result<u64> {
        for _ in 0..64 {
            let mut b = [0u8; 8];
            self.entropy.fill(&mut b)?;
            let v = u64::from_be_bytes(b);
            if v != 0 {
                return Ok(v);
            }
        }
        Err(IkeError::Internal("entropy source returns only zeros"))
    }
    fn random_spi32(&mut self) -> Result<u32> {
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.entropy.fill(&mut b)?;
            let v = u32::from_be_bytes(b);
            // SPIs 1..255 are reserved (RFC 4303 §2.1).
            if v > 255 && self.children.iter().all(|c| c.info.inbound_spi != v) {
                return Ok(v);
            }
        }
        Err(IkeError::Internal(
            "entropy source returns only reserved SPIs",
        ))
    }

    // ------------------------------------------------------------------
    // Construction
    // ------------------------------------------------------------------

    /// Starts an IKE SA as initiator: the IKE_SA_INIT request is queued.
    pub fn initiate(
        now: Instant,
        cfg: Arc<IkeConfig>,
        addrs: Addresses,
        entropy: Box<dyn Entropy>,
    ) -> Result<IkeSa> {
        let mut sa = IkeSa::blank(cfg, addrs, entropy);
        let spi_i = sa.random_u64()?;
        sa.chan = Channel::new(spi_i, 0, true);
        let group = *sa
            .cfg
            .ike_groups
            .first()
            .ok_or(IkeError::NoProposalChosen)?;
        let ni = sa.random(NONCE_LEN)?;
        sa.hs = Some(Handshake {
            ni,
            nr: Vec::new(),
            kex: Some(KeyExchange::generate(group)?),
            request: Vec::new(),
            response: Vec::new(),
            cookie: None,
            cookie_rounds: 0,
            ke_rounds: 0,
            child_spi: 0,
            peer_hashes: Vec::new(),
        });
        sa.send_init(now)?;
        Ok(sa)
    }

    fn send_init(&mut self, now: Instant) -> Result<()> {
        let spi_i = self.chan.spi_i;
        let nat = self.nat_payloads(spi_i, 0)?;
        let header = self.header(ExchangeType::IKE_SA_INIT, 0, false, false);
        let hs = self
            .hs
            .as_mut()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        let kex = hs.kex.as_ref().ok_or(IkeError::Unexpected("no KE"))?;
        let mut payloads = Vec::new();
        if let Some(c) = &hs.cookie {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::COOKIE,
                c.clone(),
            )));
        }
        payloads.push(Payload::Sa(ike_proposals(
            &self.cfg.ike_proposals,
            &self.cfg.ike_groups,
            &[],
        )));
        payloads.push(Payload::Ke(KePayload {
            group: kex.group(),
            data: kex.public_value().to_vec(),
        }));
        payloads.push(Payload::Nonce(hs.ni.clone()));
        payloads.extend(nat);
        if self.cfg.cert.is_some() {
            // RFC 7427 §4: the hashes we accept in signatures.
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::SIGNATURE_HASH_ALGORITHMS,
                crate::cert::our_hash_algs(),
            )));
        }
        let msg = Message {
            header,
            payloads,
            sk_offset: None,
        };
        let bytes = msg.encode();
        hs.request = bytes.clone();
        self.chan.next_send = 1;
        self.send_request(now, false, 0, bytes, Task::Init);
        Ok(())
    }

    /// Handles a first IKE_SA_INIT request as responder. Call only after
    /// the cookie/half-open checks of [`crate::cookie::CookieGuard`].
    pub fn accept(
        now: Instant,
        cfg: Arc<IkeConfig>,
        addrs: Addresses,
        entropy: Box<dyn Entropy>,
        datagram: &[u8],
    ) -> Result<Accepted> {
        let msg = Message::decode(datagram)?;
        let h = &msg.header;
        if h.exchange != ExchangeType::IKE_SA_INIT
            || h.flags.response()
            || !h.flags.initiator()
            || h.message_id != 0
            || h.spi_r != 0
            || h.spi_i == 0
        {
            return Err(IkeError::Unexpected("not an initial IKE_SA_INIT request"));
        }
        // §3.14, RFC 7383 §2.5: IKE_SA_INIT is never encrypted or fragmented.
        if msg.sk_offset.is_some()
            || msg
                .payloads
                .iter()
                .any(|p| matches!(p, Payload::Sk { .. } | Payload::Skf { .. }))
        {
            return Err(IkeError::Unexpected("encrypted payload in IKE_SA_INIT"));
        }
        let mut sa = IkeSa::blank(cfg, addrs, entropy);
        sa.chan = Channel::new(h.spi_i, 0, false);
        if let Some(t) = unknown_critical(&msg.payloads) {
            let _ = t;
            return Ok(Accepted::Reply(sa.stateless_reply(
                h,
                NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
                vec![t.0],
            )));
        }
        let offered = sa_of(&msg.payloads).ok_or(IkeError::Unexpected("missing SA"))?;
        let ke = ke_of(&msg.payloads).ok_or(IkeError::Unexpected("missing KE"))?;
        let ni = nonce_of(&msg.payloads)?;
        let Some((reply, suite)) = select_ike(
            offered,
            &sa.cfg.ike_proposals,
            &sa.cfg.ike_groups,
            Some(ke.group),
        ) else {
            return Ok(Accepted::Reply(sa.stateless_reply(
                h,
                NotifyType::NO_PROPOSAL_CHOSEN,
                Vec::new(),
            )));
        };
        if ke.group != suite.dh {
            // §1.2: tell the initiator which group we want.
            return Ok(Accepted::Reply(sa.stateless_reply(
                h,
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.0.to_be_bytes().to_vec(),
            )));
        }
        let kex = KeyExchange::generate(suite.dh)?;
        let shared = kex.compute_shared(&ke.data)?;
        sa.nat = sa.check_nat(&msg.payloads, h.spi_i, 0)?;
        let spi_r = sa.random_u64()?;
        sa.chan.spi_r = spi_r;
        let nr = sa.random(NONCE_LEN)?;
        let seed = skeyseed(suite.prf, &ni, &nr, shared.as_bytes())?;
        let sk = derive_ike_keys(
            suite.prf,
            suite.encr,
            suite.integ,
            &seed,
            &ni,
            &nr,
            h.spi_i,
            spi_r,
        )?;
        sa.chan.keys = Some(Keys::new(suite, sk, false));
        let payloads = vec![
            Payload::Sa(vec![reply]),
            Payload::Ke(KePayload {
                group: suite.dh,
                data: kex.public_value().to_vec(),
            }),
            Payload::Nonce(nr.clone()),
        ];
        let mut payloads = payloads;
        if find_notify(&msg.payloads, NotifyType::NAT_DETECTION_SOURCE_IP).is_some() {
            payloads.extend(sa.nat_payloads(h.spi_i, spi_r)?);
        }
        if let Some(cert) = &sa.cfg.cert {
            // §3.7: CERTREQ naming the CAs we trust; RFC 7427 §4 hashes.
            if !cert.trust.is_empty() {
                payloads.push(Payload::CertReq(
                    crate::wire::CertEncoding::X509_SIG,
                    cert.trust.certreq(),
                ));
            }
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::SIGNATURE_HASH_ALGORITHMS,
                crate::cert::our_hash_algs(),
            )));
        }
        let peer_hashes = find_notify(&msg.payloads, NotifyType::SIGNATURE_HASH_ALGORITHMS)
            .map(|n| crate::cert::parse_hash_algs(&n.data))
            .unwrap_or_default();
        let resp = Message {
            header: sa.header(ExchangeType::IKE_SA_INIT, 0, true, false),
            payloads,
            sk_offset: None,
        }
        .encode();
        sa.hs = Some(Handshake {
            ni,
            nr,
            kex: None,
            request: datagram.to_vec(),
            response: resp.clone(),
            cookie: None,
            cookie_rounds: 0,
            ke_rounds: 0,
            child_spi: 0,
            peer_hashes,
        });
        sa.state = State::InitReplied;
        sa.chan.next_recv = 1;
        sa.chan.last_response = Some((0, resp.clone()));
        sa.push_transmit(resp);
        sa.last_peer_activity = Some(now);
        // The half-open SA gives up if IKE_AUTH never comes.
        sa.ike_hard = Some(now + sa.half_open_timeout());
        Ok(Accepted::Sa(Box::new(sa)))
    }

    fn half_open_timeout(&self) -> Duration {
        self.cfg.retransmit.timeouts.iter().sum::<Duration>() + Duration::from_secs(1)
    }

    fn stateless_reply(&self, req: &Header, ty: NotifyType, data: Vec<u8>) -> Transmit {
        let msg = Message {
            header: Header {
                spi_i: req.spi_i,
                spi_r: 0,
                next_payload: PayloadType::NONE,
                version: IKEV2_VERSION,
                exchange: req.exchange,
                flags: Flags::new(false, true),
                message_id: req.message_id,
                length: 0,
            },
            payloads: vec![Payload::Notify(NotifyPayload::new(ty, data))],
            sk_offset: None,
        };
        Transmit {
            source: self.addrs.local,
            destination: self.addrs.remote,
            payload: msg.encode(),
        }
    }

    /// NAT_DETECTION_SOURCE_IP and _DESTINATION_IP (§2.23), or none.
    fn nat_payloads(&self, spi_i: u64, spi_r: u64) -> Result<Vec<Payload>> {
        let src = match self.cfg.nat_traversal {
            NatTraversal::Disable => return Ok(Vec::new()),
            NatTraversal::Enable => nat_hash(spi_i, spi_r, self.addrs.local)?,
            // A hash over an address we do not have: the peer sees a NAT.
            NatTraversal::Forced => nat_hash(spi_i, spi_r, SocketAddr::from(([0, 0, 0, 0], 0)))?,
        };
        Ok(vec![
            Payload::Notify(NotifyPayload::new(NotifyType::NAT_DETECTION_SOURCE_IP, src)),
            Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_DESTINATION_IP,
                nat_hash(spi_i, spi_r, self.addrs.remote)?,
            )),
        ])
    }

    fn check_nat(&self, p: &[Payload], spi_i: u64, spi_r: u64) -> Result<(bool, bool)> {
        if self.cfg.nat_traversal == NatTraversal::Disable {
            return Ok((false, false));
        }
        // Peer's SOURCE hash covers the peer's address as it sent it; if it
        // does not match the address we see, the peer is behind a NAT.
        let srcs: Vec<&NotifyPayload> = p
            .iter()
            .filter_map(|x| match x {
                Payload::Notify(n) if n.ty == NotifyType::NAT_DETECTION_SOURCE_IP => Some(n),
                _ => None,
            })
            .collect();
        let dst = find_notify(p, NotifyType::NAT_DETECTION_DESTINATION_IP);
        if srcs.is_empty() || dst.is_none() {
            return Ok((false, false));
        }
        let remote = nat_hash(spi_i, spi_r, self.addrs.remote)?;
        let local = nat_hash(spi_i, spi_r, self.addrs.local)?;
        let remote_nat = !srcs.iter().any(|n| n.data == remote);
        let local_nat =
            dst.is_some_and(|d| d.data != local) || self.cfg.nat_traversal == NatTraversal::Forced;
        Ok((local_nat, remote_nat))
    }

    fn header(&self, exchange: ExchangeType, mid: u32, response: bool, old: bool) -> Header {
        let c = if old {
            self.old.as_ref().unwrap_or(&self.chan)
        } else {
            &self.chan
        };
        Header {
            spi_i: c.spi_i,
            spi_r: c.spi_r,
            next_payload: PayloadType::NONE,
            version: IKEV2_VERSION,
            exchange,
            flags: Flags::new(c.initiator, response),
            message_id: mid,
            length: 0,
        }
    }

    /// Follows the peer to a new address after an authenticated message
    /// when NAT traversal is in use (§2.23).
    fn note_path(&mut self, path: Addresses) {
        if path != self.addrs
            && self.cfg.nat_traversal != NatTraversal::Disable
            && (self.nat.0 || self.nat.1 || path.local.port() == NAT_T_PORT)
        {
            self.addrs = path;
        }
    }

    fn push_transmit(&mut self, payload: Vec<u8>) {
        self.transmits.push_back(Transmit {
            source: self.addrs.local,
            destination: self.addrs.remote,
            payload,
        });
    }

    fn send_request(&mut self, now: Instant, old: bool, mid: u32, bytes: Vec<u8>, task: Task) {
        let first = match (&task, self.liveness_hold) {
            // A caller-driven liveness check waits for the caller (probe_liveness).
            (Task::Liveness, Some(hold)) => hold,
            _ => self
                .cfg
                .retransmit
                .timeouts
                .first()
                .copied()
                .unwrap_or(Duration::from_secs(2)),
        };
        let ch = if old {
            match self.old.as_mut() {
                Some(c) => c,
                None => return,
            }
        } else {
            &mut self.chan
        };
        ch.outstanding = Some(Box::new(Outstanding {
            mid,
            bytes: bytes.clone(),
            task,
            tries: 0,
            deadline: now + first,
            reseal: None,
        }));
        self.push_transmit(bytes);
    }

    /// Encrypts `payloads` for the channel (current or old).
    fn seal(
        &mut self,
        old: bool,
        exchange: ExchangeType,
        mid: u32,
        response: bool,
        payloads: &[Payload],
    ) -> Result<Vec<u8>> {
        let header = self.header(exchange, mid, response, old);
        let ch = if old {
            self.old.as_ref().ok_or(IkeError::NotEstablished)?
        } else {
            &self.chan
        };
        let keys = ch.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let iv_len = keys.suite.encr.iv_len();
        let mut iv = vec![0u8; iv_len];
        self.entropy.fill(&mut iv)?;
        let mut inner = Vec::new();
        let first = encode_chain(payloads, &mut inner);
        let ch = if old {
            self.old.as_ref().ok_or(IkeError::NotEstablished)?
        } else {
            &self.chan
        };
        let keys = ch.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        Ok(keys.out.seal(&header, first, &inner, &iv)?)
    }

    fn emit_mid(&mut self) {
        self.events.push_back(Event::MessageIdUpdate {
            spi_i: self.chan.spi_i,
            spi_r: self.chan.spi_r,
            next_send: self.chan.next_send,
            next_recv: self.chan.next_recv,
        });
    }

    /// Snapshot of an established SA for HA sync; None otherwise.
    pub fn snapshot(&self, now: Instant) -> Option<IkeSaSnapshot> {
        if self.state != State::Established {
            return None;
        }
        let keys = self.chan.keys.as_ref()?;
        Some(IkeSaSnapshot {
            info: self.ike_info_current()?,
            keys: keys.sk.clone(),
            next_send: self.chan.next_send,
            next_recv: self.chan.next_recv,
            addresses: self.addrs,
            expires_in: self
                .ike_hard
                .map_or(self.cfg.ike_lifetime, |t| t.saturating_duration_since(now)),
            children: self
                .children
                .iter()
                .filter(|c| !c.replaced)
                .map(|c| (c.info.clone(), c.hard.saturating_duration_since(now)))
                .collect(),
            mid_sync: self.peer_mid_sync,
            mid_sync_spent: self.chan.mid_sync_spent,
        })
    }

    /// Rebuilds an established SA from a snapshot (standby takeover). The
    /// SA has no request outstanding and no cached response; message IDs
    /// are those of the snapshot: when the copy may be behind, follow with
    /// [`IkeSa::sync_message_ids`] (RFC 6311).
    pub fn restore(
        now: Instant,
        cfg: Arc<IkeConfig>,
        entropy: Box<dyn Entropy>,
        snap: IkeSaSnapshot,
    ) -> IkeSa {
        let mut sa = IkeSa::blank(cfg, snap.addresses, entropy);
        let i = &snap.info;
        let mut ch = Channel::new(i.spi_i, i.spi_r, i.initiator);
        ch.keys = Some(Keys::new(i.suite, snap.keys, i.initiator));
        ch.next_send = snap.next_send;
        ch.next_recv = snap.next_recv;
        ch.mid_sync_spent = snap.mid_sync_spent;
        ch.catch_up = true;
        sa.chan = ch;
        sa.state = State::Established;
        sa.auth = Some(AuthVerified(()));
        sa.remote_id = Some(i.remote_id.clone());
        sa.peer_mid_sync = snap.mid_sync;
        sa.nat = (i.local_behind_nat, i.remote_behind_nat);
        sa.ike_hard = Some(now + snap.expires_in);
        let soft = sa.cfg.rekey_margin;
        sa.ike_soft = Some(now + snap.expires_in.saturating_sub(soft));
        for (info, left) in snap.children {
            let soft_left = left.saturating_sub(info.lifetime.saturating_sub(info.soft_lifetime));
            sa.children.push(ChildSa {
                info,
                soft: now + soft_left,
                hard: now + left,
                rekeying: false,
                replaced: false,
                collision: None,
            });
        }
        sa
    }

    // ------------------------------------------------------------------
    // Getters
    // ------------------------------------------------------------------

    /// Current initiator and responder SPIs.
    pub fn spis(&self) -> (u64, u64) {
        (self.chan.spi_i, self.chan.spi_r)
    }

    /// Our SPIs that route to this object (current, and the rekeyed
    /// predecessor while it is being deleted).
    pub fn local_spis(&self) -> Vec<u64> {
        let mut v = vec![self.chan.local_spi()];
        if let Some(o) = &self.old {
            v.push(o.local_spi());
        }
        if let Some((c, _)) = &self.ike_collision {
            v.push(c.local_spi());
        }
        if let Some(r) = &self.redundant {
            v.push(r.local_spi());
        }
        v
    }

    /// True once IKE_AUTH completed and until the SA is deleted.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True after deletion, failure or timeout: the driver may drop it.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// (next_send, next_recv) message IDs of the current SA.
    pub fn message_ids(&self) -> (u32, u32) {
        (self.chan.next_send, self.chan.next_recv)
    }

    /// This member carries the SA again after another cluster member carried it from a
    /// copy while the SA stayed established here (an FGCP primary whose hasyncd restarted
    /// takes the tunnel back from its partner): the other member may have answered the
    /// peer's requests and sent its own meanwhile. The message IDs move up to the copy's
    /// (`next_send`, `next_recv`; never down), the cached response goes when the peer is
    /// known to have moved past it, and, as after a restore, the peer's next authenticated
    /// request is taken up to [`MID_CATCH_UP`] above the one expected (the copy may lag what
    /// the other member answered last). Our own request still unanswered under an ID below
    /// the copy's goes again under the copy's `next_send`: the peer has answered that ID's
    /// request from the other member already, and takes a retransmission of it for the
    /// other member's (it resends its cached response) and anything lower as old. A DPD
    /// probe in flight while the other member's copy arrived kept going under its old ID
    /// until DPD declared the peer dead. True when an ID moved.
    pub fn adopt_copy_message_ids(&mut self, next_send: u32, next_recv: u32) -> bool {
        let ch = &mut self.chan;
        let mut moved = false;
        if next_recv > ch.next_recv {
            ch.next_recv = next_recv;
            ch.last_response = None;
            moved = true;
        }
        let mut reissue = None;
        if next_send > ch.next_send {
            match ch.outstanding.as_deref() {
                None => {
                    ch.next_send = next_send;
                    moved = true;
                }
                Some(o) if o.mid < next_send => {
                    if let Some((exchange, payloads)) = o.reseal.clone() {
                        reissue = Some((exchange, payloads));
                    }
                }
                Some(_) => {}
            }
        }
        ch.catch_up = true;
        if let Some((exchange, payloads)) = reissue {
            if let Ok(bytes) = self.seal(false, exchange, next_send, false, &payloads) {
                let ch = &mut self.chan;
                if let Some(o) = ch.outstanding.as_mut() {
                    o.mid = next_send;
                    o.bytes = bytes.clone();
                }
                ch.next_send = next_send.wrapping_add(1);
                moved = true;
                self.push_transmit(bytes);
            }
        }
        if moved {
            self.emit_mid();
        }
        moved
    }

    /// This member carries the SA again (see [`IkeSa::adopt_copy_message_ids`]) and the
    /// other member's later copy has the peer at `path`: the peer's NAT mapping changed
    /// while the other member carried the SA, and that member followed it (§2.23). The SA
    /// follows as well, under the same rule as for an authenticated message from there:
    /// only when NAT traversal is in use. True when the addresses moved.
    pub fn adopt_copy_path(&mut self, path: Addresses) -> bool {
        let before = self.addrs;
        self.note_path(path);
        self.addrs != before
    }

    /// Inbound SPIs of the CHILD SAs.
    pub fn child_spis(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.info.inbound_spi).collect()
    }

    /// Inbound SPIs of the CHILD SAs that are current: not replaced by a rekey the peer
    /// started (such an SA lives on only until the peer's Delete for it arrives, and a
    /// rekey of it would be refused).
    pub fn current_child_spis(&self) -> Vec<u32> {
        self.children
            .iter()
            .filter(|c| !c.replaced)
            .map(|c| c.info.inbound_spi)
            .collect()
    }

    /// Current local and remote addresses (port 4500 after a NAT float).
    pub fn addresses(&self) -> Addresses {
        self.addrs
    }

    /// Last time an authenticated message from the peer arrived.
    pub fn last_peer_activity(&self) -> Option<Instant> {
        self.last_peer_activity
    }

    /// The negotiated IKE suite, once keys exist.
    pub fn suite(&self) -> Option<IkeSuite> {
        self.chan.keys.as_ref().map(|k| k.suite)
    }

    // ------------------------------------------------------------------
    // Outputs
    // ------------------------------------------------------------------

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front();
        if t.is_none() {
            // Drained: give the queue's room back (an idle SA would keep it for ever).
            self.transmits = VecDeque::new();
        }
        t
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front();
        if e.is_none() {
            // As in `poll_transmit`.
            self.events = VecDeque::new();
        }
        e
    }

    /// When [`IkeSa::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut add = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |y| y.min(x)));
            }
        };
        add(self.chan.outstanding.as_ref().map(|o| o.deadline));
        add(self.mid_sync_deadline());
        add(self
            .old
            .as_ref()
            .and_then(|o| o.outstanding.as_ref())
            .map(|o| o.deadline));
        add(self
            .redundant
            .as_ref()
            .and_then(|o| o.outstanding.as_ref())
            .map(|o| o.deadline));
        add(self.redundant.as_ref().and(self.redundant_until));
        add(self.ike_hard);
        if self.state == State::Established {
            if !self.ike_rekeying {
                add(self.ike_soft);
            }
            for c in &self.children {
                if !c.rekeying && !c.replaced && !self.cfg.driver_rekeys.contains(&c.info.policy) {
                    add(Some(c.soft));
                }
                add(Some(c.hard));
            }
        }
        t
    }

    // ------------------------------------------------------------------
    // Mutators
    // ------------------------------------------------------------------

    fn queue(&mut self, now: Instant, r: Request) -> Result<()> {
        if self.state == State::Closed {
            return Err(IkeError::NotEstablished);
        }
        if !self.pending.contains(&r) {
            self.pending.push_back(r);
        }
        self.kick(now)
    }

    /// Sends an empty INFORMATIONAL request (liveness check, §1.4).
    pub fn start_liveness_check(&mut self, now: Instant) -> Result<()> {
        self.queue(now, Request::Liveness)
    }

    /// A liveness check (§1.4) whose transmissions the caller schedules, as a DPD
    /// daemon does (seed 000: every retry of one probe carries the same message ID).
    ///
    /// The first call sends an empty INFORMATIONAL request; each later call while that
    /// request is unanswered sends the very same message again (same message ID, same
    /// bytes: a retransmission in the sense of §2.1). The SA never retransmits it on its
    /// own; when `hold` passes without another call it abandons the request
    /// ([`Event::LivenessTimeout`]) and frees the window. If another exchange holds the
    /// window, the check is queued behind it ([`LivenessProbe::Queued`]). From the first
    /// call on, every liveness check of this SA is driven this way.
    pub fn probe_liveness(&mut self, now: Instant, hold: Duration) -> Result<LivenessProbe> {
        if self.state != State::Established {
            return Err(IkeError::NotEstablished);
        }
        self.liveness_hold = Some(hold);
        if let Some(o) = self.chan.outstanding.as_mut() {
            if matches!(o.task, Task::Liveness) {
                o.deadline = now + hold;
                let (mid, bytes) = (o.mid, o.bytes.clone());
                self.push_transmit(bytes);
                return Ok(LivenessProbe::Retransmitted(mid));
            }
        }
        let mid = self.chan.next_send;
        self.queue(now, Request::Liveness)?;
        match self.chan.outstanding.as_ref() {
            Some(o) if matches!(o.task, Task::Liveness) && o.mid == mid => {
                Ok(LivenessProbe::Sent(mid))
            }
            _ => Ok(LivenessProbe::Queued),
        }
    }

    /// Deletes a CHILD SA (by inbound SPI).
    pub fn delete_child(&mut self, now: Instant, inbound_spi: u32) -> Result<()> {
        if !self
            .children
            .iter()
            .any(|c| c.info.inbound_spi == inbound_spi)
        {
            return Err(IkeError::UnknownChild(inbound_spi));
        }
        self.queue(now, Request::DeleteChild(inbound_spi, DeleteReason::Local))
    }

    /// Deletes the IKE SA and all its CHILD SAs.
    pub fn delete(&mut self, now: Instant) -> Result<()> {
        self.queue(now, Request::DeleteIke)
    }

    /// Creates an additional CHILD SA with the configured selectors.
    pub fn create_child(&mut self, now: Instant) -> Result<()> {
        self.queue(now, Request::CreateChild(0))
    }

    /// Creates a CHILD SA for policy (phase2) `policy` of
    /// [`IkeConfig::more_children`] (0 is the first phase2).
    pub fn create_child_for(&mut self, now: Instant, policy: usize) -> Result<()> {
        if policy >= self.cfg.policy_count() {
            return Err(IkeError::Internal("no such CHILD SA policy"));
        }
        self.queue(now, Request::CreateChild(policy))
    }

    /// Policies (phase2 indexes) with a CHILD SA that is current (not
    /// replaced by a rekey).
    pub fn child_policies(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .children
            .iter()
            .filter(|c| !c.replaced)
            .map(|c| c.info.policy)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Rekeys a CHILD SA (by inbound SPI), with PFS when configured.
    pub fn rekey_child(&mut self, now: Instant, inbound_spi: u32) -> Result<()> {
        if !self
            .children
            .iter()
            .any(|c| c.info.inbound_spi == inbound_spi)
        {
            return Err(IkeError::UnknownChild(inbound_spi));
        }
        if let Some(c) = self
            .children
            .iter_mut()
            .find(|c| c.info.inbound_spi == inbound_spi)
        {
            c.rekeying = true;
        }
        self.queue(now, Request::RekeyChild(inbound_spi))
    }

    /// Rekeys the IKE SA.
    pub fn rekey_ike(&mut self, now: Instant) -> Result<()> {
        self.queue(now, Request::RekeyIke)
    }

    /// Starts the next queued request if the window (size 1) is free.
    fn kick(&mut self, now: Instant) -> Result<()> {
        while self.state == State::Established
            && self.chan.outstanding.is_none()
            && self.mid_sync.is_none()
            && self.mid_sync_hold.is_none()
        {
            let Some(r) = self.pending.pop_front() else {
                break;
            };
            match self.start_request(now, r) {
                Ok(()) => {}
                Err(IkeError::UnknownChild(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn start_request(&mut self, now: Instant, r: Request) -> Result<()> {
        let mid = self.chan.next_send;
        let (exchange, payloads, task) = match r {
            Request::Liveness => (ExchangeType::INFORMATIONAL, Vec::new(), Task::Liveness),
            Request::DeleteChild(spi, reason) => {
                let idx = self
                    .children
                    .iter()
                    .position(|c| c.info.inbound_spi == spi)
                    .ok_or(IkeError::UnknownChild(spi))?;
                let c = self.children.remove(idx);
                self.events.push_back(Event::ChildSaDeleted {
                    inbound_spi: c.info.inbound_spi,
                    outbound_spi: c.info.outbound_spi,
                    reason,
                });
                (
                    ExchangeType::INFORMATIONAL,
                    vec![Payload::Delete(DeletePayload {
                        protocol: ProtocolId::ESP,
                        spi_size: 4,
                        spis: vec![spi.to_be_bytes().to_vec()],
                    })],
                    Task::DeleteChild,
                )
            }
            Request::DeleteIke => {
                self.drop_all_children(DeleteReason::Local);
                (
                    ExchangeType::INFORMATIONAL,
                    vec![Payload::Delete(DeletePayload {
                        protocol: ProtocolId::IKE,
                        spi_size: 0,
                        spis: Vec::new(),
                    })],
                    Task::DeleteIke,
                )
            }
            Request::CreateChild(_) | Request::RekeyChild(_) => {
                let (rekey_of, mut policy) = match r {
                    Request::RekeyChild(s) => (Some(s), 0),
                    Request::CreateChild(p) => (None, p),
                    _ => (None, 0),
                };
                let mut notify = None;
                let mut ts_of_child = None;
                if let Some(old) = rekey_of {
                    let c = self
                        .children
                        .iter_mut()
                        .find(|c| c.info.inbound_spi == old && !c.replaced)
                        .ok_or(IkeError::UnknownChild(old))?;
                    c.rekeying = true;
                    policy = c.info.policy;
                    ts_of_child = Some((c.info.local_ts.clone(), c.info.remote_ts.clone()));
                    notify = Some(Payload::Notify(NotifyPayload {
                        protocol: ProtocolId::ESP,
                        spi: old.to_be_bytes().to_vec(),
                        ty: NotifyType::REKEY_SA,
                        data: Vec::new(),
                    }));
                }
                let pol = self
                    .cfg
                    .policy(policy)
                    .ok_or(IkeError::Internal("no such CHILD SA policy"))?;
                let (tsi, tsr) =
                    ts_of_child.unwrap_or_else(|| (pol.local_ts.clone(), pol.remote_ts.clone()));
                let spi = self.random_spi32()?;
                let ni = self.random(NONCE_LEN)?;
                // The responder's choice from an INVALID_KE_PAYLOAD, else our first.
                let group = self
                    .pfs_retry
                    .take()
                    .or_else(|| pol.pfs_groups.first().copied());
                let kex = match group {
                    Some(g) => Some(KeyExchange::generate(g)?),
                    None => None,
                };
                let mut p = Vec::new();
                p.extend(notify);
                p.push(Payload::Sa(esp_proposals(
                    &pol.esp_proposals,
                    &pol.pfs_groups,
                    spi,
                )));
                p.push(Payload::Nonce(ni.clone()));
                if let Some(k) = &kex {
                    p.push(Payload::Ke(KePayload {
                        group: k.group(),
                        data: k.public_value().to_vec(),
                    }));
                }
                p.push(Payload::TsI(tsi));
                p.push(Payload::TsR(tsr));
                (
                    ExchangeType::CREATE_CHILD_SA,
                    p,
                    Task::CreateChild {
                        spi,
                        ni,
                        kex,
                        rekey_of,
                        policy,
                    },
                )
            }
            Request::RekeyIke => {
                let spi = self.random_u64()?;
                let ni = self.random(NONCE_LEN)?;
                let group = self
                    .chan
                    .keys
                    .as_ref()
                    .map(|k| k.suite.dh)
                    .ok_or(IkeError::NotEstablished)?;
                let kex = KeyExchange::generate(group)?;
                // Offer the current group first so the KE matches.
                let mut groups = vec![group];
                groups.extend(self.cfg.ike_groups.iter().filter(|g| **g != group));
                self.ike_rekeying = true;
                let p = vec![
                    Payload::Sa(ike_proposals(
                        &self.cfg.ike_proposals,
                        &groups,
                        &spi.to_be_bytes(),
                    )),
                    Payload::Nonce(ni.clone()),
                    Payload::Ke(KePayload {
                        group,
                        data: kex.public_value().to_vec(),
                    }),
                ];
                (
                    ExchangeType::CREATE_CHILD_SA,
                    p,
                    Task::RekeyIke { spi, ni, kex },
                )
            }
        };
        let bytes = self.seal(false, exchange, mid, false, &payloads)?;
        self.chan.next_send = mid.wrapping_add(1);
        self.send_request(now, false, mid, bytes, task);
        if let Some(o) = self.chan.outstanding.as_mut() {
            o.reseal = Some((exchange, payloads));
        }
        self.emit_mid();
        Ok(())
    }

    fn drop_all_children(&mut self, reason: DeleteReason) {
        for c in self.children.drain(..) {
            self.events.push_back(Event::ChildSaDeleted {
                inbound_spi: c.info.inbound_spi,
                outbound_spi: c.info.outbound_spi,
                reason,
            });
        }
    }

    fn close(&mut self, reason: DeleteReason) {
        if self.state == State::Closed {
            return;
        }
        self.drop_all_children(reason);
        if let Some(o) = self.old.take() {
            self.events.push_back(Event::IkeSaDeleted {
                spi_i: o.spi_i,
                spi_r: o.spi_r,
                reason: DeleteReason::Rekeyed,
            });
        }
        self.events.push_back(Event::IkeSaDeleted {
            spi_i: self.chan.spi_i,
            spi_r: self.chan.spi_r,
            reason,
        });
        self.state = State::Closed;
        self.ike_collision = None;
        self.redundant = None;
        self.chan.outstanding = None;
        self.pending.clear();
        self.hs = None;
    }

    // ------------------------------------------------------------------
    // Timers
    // ------------------------------------------------------------------

    /// Retransmits, gives up, and runs lifetime expiries due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let driven_liveness = self.liveness_hold.is_some();
        if self.mid_sync_timeout(now) {
            return;
        }
        self.redundant_timeout(now);
        for old in [true, false] {
            let timeouts = &self.cfg.retransmit.timeouts;
            let ch = if old {
                match self.old.as_mut() {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                &mut self.chan
            };
            let Some(o) = ch.outstanding.as_mut() else {
                continue;
            };
            if o.deadline > now {
                continue;
            }
            o.tries += 1;
            // A caller-driven liveness check is never retransmitted here: its hold ran out.
            let own_schedule = !(driven_liveness && matches!(o.task, Task::Liveness));
            if let Some(wait) = timeouts.get(o.tries).filter(|_| own_schedule) {
                o.deadline = now + *wait;
                let bytes = o.bytes.clone();
                self.push_transmit(bytes);
                continue;
            }
            // Schedule exhausted.
            let task = ch.outstanding.take().map(|o| o.task);
            if old {
                if let Some(o) = self.old.take() {
                    self.events.push_back(Event::IkeSaDeleted {
                        spi_i: o.spi_i,
                        spi_r: o.spi_r,
                        reason: DeleteReason::Rekeyed,
                    });
                }
                continue;
            }
            match task {
                Some(Task::Liveness) => {
                    self.events.push_back(Event::LivenessTimeout);
                    let _ = self.kick(now);
                }
                _ => {
                    self.close(DeleteReason::Timeout);
                    return;
                }
            }
        }
        if self.ike_hard.is_some_and(|t| t <= now) {
            let reason = if self.state == State::Established {
                // Tell the peer, once, if the window allows (§1.4.1).
                if self.chan.outstanding.is_none() {
                    let mid = self.chan.next_send;
                    let del = [Payload::Delete(DeletePayload {
                        protocol: ProtocolId::IKE,
                        spi_size: 0,
                        spis: Vec::new(),
                    })];
                    if let Ok(b) = self.seal(false, ExchangeType::INFORMATIONAL, mid, false, &del) {
                        self.chan.next_send = mid.wrapping_add(1);
                        self.push_transmit(b);
                    }
                }
                DeleteReason::Expired
            } else {
                DeleteReason::Timeout
            };
            self.close(reason);
            return;
        }
        if self.state != State::Established {
            return;
        }
        if !self.ike_rekeying && self.ike_soft.is_some_and(|t| t <= now) {
            self.ike_soft = None;
            let _ = self.queue(now, Request::RekeyIke);
        }
        let mut expired = Vec::new();
        for c in &mut self.children {
            if c.hard <= now {
                expired.push(c.info.inbound_spi);
            } else if c.soft <= now
                && !c.rekeying
                && !c.replaced
                && !self.cfg.driver_rekeys.contains(&c.info.policy)
            {
                c.rekeying = true;
                self.pending
                    .push_back(Request::RekeyChild(c.info.inbound_spi));
            }
        }
        for s in expired {
            self.pending.retain(|r| *r != Request::RekeyChild(s));
            let r = Request::DeleteChild(s, DeleteReason::Expired);
            if !self.pending.contains(&r) {
                self.pending.push_back(r);
            }
        }
        let _ = self.kick(now);
    }

    // ------------------------------------------------------------------
    // Input
    // ------------------------------------------------------------------

    /// Processes one datagram addressed to this SA. Errors mean the
    /// datagram was dropped (or answered with an error notify); the SA
    /// stays consistent either way.
    /// `path` is the datagram's local (destination) and remote (source)
    /// address; IKE on port 4500 comes without its non-ESP marker.
    pub fn handle_datagram(&mut self, now: Instant, path: Addresses, data: &[u8]) -> Result<()> {
        if self.state == State::Closed {
            return Err(IkeError::NotEstablished);
        }
        let msg = Message::decode(data)?;
        let h = &msg.header;
        if self.is_side_channel(h.spi_i, h.spi_r) {
            return self.handle_side(now, data, msg);
        }
        let on_old = match &self.old {
            Some(o) if h.spi_i == o.spi_i && h.spi_r == o.spi_r => true,
            _ => {
                let init_retx = h.exchange == ExchangeType::IKE_SA_INIT && h.spi_r == 0;
                if h.spi_i != self.chan.spi_i
                    || (h.spi_r != self.chan.spi_r && !init_retx && self.chan.spi_r != 0)
                {
                    return Err(IkeError::WrongSa);
                }
                false
            }
        };
        let ch = if on_old {
            self.old.as_ref().ok_or(IkeError::WrongSa)?
        } else {
            &self.chan
        };
        // The peer's I flag is the opposite of ours (§3.1).
        if h.flags.initiator() == ch.initiator {
            return Err(IkeError::Unexpected("initiator flag"));
        }
        if h.flags.response() {
            self.handle_response(now, path, on_old, data, msg)
        } else {
            self.handle_request(now, path, on_old, data, msg)
        }
    }

    /// Verifies and decrypts; the inner result is the decoded inner chain
    /// (an authenticated message that does not parse is INVALID_SYNTAX).
    fn decrypt(
        &self,
        old: bool,
        data: &[u8],
        msg: &Message,
    ) -> Result<std::result::Result<Vec<Payload>, DecodeError>> {
        let ch = if old {
            self.old.as_ref().ok_or(IkeError::WrongSa)?
        } else {
            &self.chan
        };
        let keys = ch.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let (first, off) = match (msg.payloads.last(), msg.sk_offset) {
            (Some(Payload::Sk { first_inner, .. }), Some(off)) => (*first_inner, off),
            (Some(Payload::Skf { .. }), _) => {
                return Err(IkeError::Unexpected("IKE fragments not negotiated"))
            }
            _ => return Err(IkeError::Unexpected("missing SK payload")),
        };
        let inner = keys.inb.open(data, off)?;
        Ok(match decode_chain(first, &inner) {
            Ok((_, Some(_))) => Err(DecodeError::InvalidSyntax("nested SK payload")),
            Ok((payloads, None)) => Ok(payloads),
            Err(e) => Err(e),
        })
    }

    fn handle_request(
        &mut self,
        now: Instant,
        path: Addresses,
        old: bool,
        data: &[u8],
        msg: Message,
    ) -> Result<()> {
        let mid = msg.header.message_id;
        // RFC 6311 §5: a synchronisation request has message ID 0 whatever we expect.
        if self.may_be_mid_sync(old, &msg) && self.mid_sync_request(now, path, data, &msg)? {
            return Ok(());
        }
        let ch = if old {
            self.old.as_ref().ok_or(IkeError::WrongSa)?
        } else {
            &self.chan
        };
        let expected = ch.next_recv;
        // A restored SA whose copy missed requests the previous owner answered: the next
        // authenticated one (decrypted below; a forgery changes nothing) is taken.
        let catch_up =
            !old && ch.catch_up && mid > expected && mid - expected <= mid_sync::MID_CATCH_UP;
        if mid != expected && !catch_up {
            // A retransmission of the last request gets the cached
            // response again (§2.1); anything else is dropped.
            if let Some((m, bytes)) = &ch.last_response {
                if *m == mid && mid.wrapping_add(1) == expected {
                    // Answer where the retransmission came from.
                    self.transmits.push_back(Transmit {
                        source: path.local,
                        destination: path.remote,
                        payload: bytes.clone(),
                    });
                    return Ok(());
                }
            }
            return Err(IkeError::InvalidMessageId { got: mid, expected });
        }
        if msg.header.exchange == ExchangeType::IKE_SA_INIT {
            return Err(IkeError::Unexpected("IKE_SA_INIT on an existing SA"));
        }
        let decoded = self.decrypt(old, data, &msg)?;
        self.last_peer_activity = Some(now);
        self.note_path(path);
        let exchange = msg.header.exchange;
        let payloads = decoded.as_deref().unwrap_or(&[]);
        let reply: Vec<Payload> = if decoded.is_err() {
            // Authenticated but unparsable (§3.10.1 INVALID_SYNTAX).
            vec![Payload::Notify(NotifyPayload::new(
                NotifyType::INVALID_SYNTAX,
                Vec::new(),
            ))]
        } else if let Some(t) = unknown_critical(payloads) {
            vec![Payload::Notify(NotifyPayload::new(
                NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
                vec![t.0],
            ))]
        } else if old {
            self.request_on_old(exchange, payloads)
        } else {
            match (self.state, exchange) {
                (State::InitReplied, ExchangeType::IKE_AUTH) => {
                    self.ike_auth_request(now, payloads)?
                }
                (State::Established, ExchangeType::INFORMATIONAL) => {
                    self.informational_request(payloads)
                }
                (State::Established, ExchangeType::CREATE_CHILD_SA) => {
                    self.create_child_request(now, payloads)?
                }
                (State::Established, ExchangeType::IKE_AUTH) => {
                    return Err(IkeError::Unexpected("IKE_AUTH after establishment"))
                }
                _ => vec![Payload::Notify(NotifyPayload::new(
                    NotifyType::INVALID_SYNTAX,
                    Vec::new(),
                ))],
            }
        };
        let bytes = self.seal(old, exchange, mid, true, &reply)?;
        {
            let ch = if old {
                self.old.as_mut().ok_or(IkeError::WrongSa)?
            } else {
                &mut self.chan
            };
            ch.next_recv = mid.wrapping_add(1);
            ch.catch_up = false;
            ch.last_response = Some((mid, bytes.clone()));
        }
        if catch_up {
            self.events
                .push_back(Event::MessageIdsCaughtUp { expected, got: mid });
        }
        self.push_transmit(bytes);
        if !old {
            self.emit_mid();
        }
        self.after_request(now, old, &reply);
        let _ = self.kick(now);
        Ok(())
    }

    fn after_request(&mut self, now: Instant, old: bool, reply: &[Payload]) {
        if let Some(new) = self.pending_swap.take() {
            self.swap_in(now, new);
            if std::mem::take(&mut self.drop_old_after_swap) {
                if let Some(o) = self.old.take() {
                    self.events.push_back(Event::IkeSaDeleted {
                        spi_i: o.spi_i,
                        spi_r: o.spi_r,
                        reason: DeleteReason::Rekeyed,
                    });
                }
            }
        }
        // Deletes of the IKE SA we answered take effect after the response.
        if old && self.old_deleted {
            self.old_deleted = false;
            if let Some(o) = self.old.take() {
                self.events.push_back(Event::IkeSaDeleted {
                    spi_i: o.spi_i,
                    spi_r: o.spi_r,
                    reason: DeleteReason::Rekeyed,
                });
            }
        }
        if !old && self.peer_deleted_ike {
            self.peer_deleted_ike = false;
            self.close(DeleteReason::Peer);
        }
        if !old
            && reply.iter().any(
                |p| matches!(p, Payload::Notify(n) if n.ty == NotifyType::AUTHENTICATION_FAILED),
            )
        {
            self.close(DeleteReason::AuthFailed);
        }
    }
}

#[cfg(test)]
mod attacks;
mod exchanges;
pub mod fuzz;
mod ike_rekey;
mod mid_sync;
pub use mid_sync::{MidSyncStart, MID_CATCH_UP};
#[cfg(test)]
mod tests;
