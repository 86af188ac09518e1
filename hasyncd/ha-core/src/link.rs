//! HA link protection: key derivation, AES-256-GCM sealing, and per-sender replay checks.
//!
//! # Keys
//! 1. **Master key** = PBKDF2-HMAC-SHA256(secret, salt, iterations, 32 bytes) (RFC 8018
//!    §5.2), where `secret` is the FGCP `password` or the FGSP `psksecret` and
//!    `salt = "haven ha link v1" || kind || group (u16 BE)`. PBKDF2 rather than HKDF alone
//!    because the input is an operator-chosen password, not a uniformly random key: HKDF
//!    (RFC 5869 §4) makes no attempt to slow a dictionary search over a captured message,
//!    while PBKDF2's iteration count multiplies its cost. It runs once per start, so its
//!    cost is paid once. The group in the salt means two clusters with the same password
//!    still have unrelated keys.
//! 2. **Sender key** = HKDF-SHA256(IKM = master, salt = the same group salt,
//!    info = "haven ha link v1 sender" || member id (u32 BE) || epoch (u64 BE)) (RFC 5869
//!    §2), one per (sender, epoch).
//!
//! # Nonces
//! AES-256-GCM (RFC 5116 §5.2) with the 96-bit nonce `0x00000000 || counter (u64 BE)`: a
//! fixed field plus a counter, the construction of RFC 5116 §3.2. Because the key is
//! private to one (sender, epoch) and the counter strictly increases within it, a nonce
//! is never used twice under a key, as long as two starts of one member never share an
//! epoch: the daemon must pick each start's epoch strictly larger than the last (for
//! example `max(stored epoch + 1, wall-clock ms)`, stored before the first send), and
//! member ids must be unique within a group.
//!
//! The link is always encrypted and authenticated: FGSP's `encryption disable` does not
//! turn this off (it only matters to FortiOS session sync), and there is no clear mode.
//!
//! # Replay
//! A receiver keeps, per sender, the newest authenticated epoch and a [`WINDOW`]-message
//! window below the highest counter. Older epochs, counters seen before or left of the
//! window are dropped before decryption; the window moves only after a message
//! authenticated and decoded. A message with a newer epoch is tried with that epoch's key,
//! and replaces the sender's state only if it authenticates (a forged epoch changes
//! nothing).

use std::collections::BTreeMap;

use openssl::md::Md;
use openssl::pkey::Id;
use openssl::pkey_ctx::PkeyCtx;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};

use crate::error::{DropReason, HaError, Result};
use crate::msg::Message;
use crate::replay::ReplayWindow;
pub use crate::replay::WINDOW;
use crate::wire::{Header, MemberId, MsgType, FOR_ONE, HEADER_LEN, MAX_BODY_LEN, TAG_LEN, VERSION};

/// PBKDF2 iterations when the configuration says nothing else. All members of a group
/// must use the same value.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 200_000;
/// Senders a receiver tracks at most (FGCP has up to 4 members, FGSP up to 16).
pub const MAX_SENDERS: usize = 64;

const LABEL: &[u8] = b"haven ha link v1";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// Which kind of cluster a link serves; part of the key derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// `config system ha` (`password`, `group-id`).
    Fgcp,
    /// `config system standalone-cluster` (`psksecret`, `standalone-group-id`).
    Fgsp,
}

impl ClusterKind {
    fn code(self) -> u8 {
        match self {
            ClusterKind::Fgcp => 1,
            ClusterKind::Fgsp => 2,
        }
    }
}

/// A 32-byte key, zeroed on drop, never printed.
#[derive(Clone)]
struct Key([u8; KEY_LEN]);

impl Drop for Key {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// The group's master key, derived from the cluster secret.
#[derive(Clone)]
pub struct LinkKey {
    kind: ClusterKind,
    group: u16,
    salt: Vec<u8>,
    master: Key,
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkKey")
            .field("kind", &self.kind)
            .field("group", &self.group)
            .field("master", &"<redacted>")
            .finish()
    }
}

impl LinkKey {
    /// Derive the master key. `secret` is the clear-text FGCP `password` / FGSP
    /// `psksecret`; `None` or empty refuses (the link is never run unprotected). Pass
    /// `None` for a secret the configuration holds only in masked (`********`) or FortiOS
    /// `ENC` form (`haven_config::Secret::is_usable` false): those bytes are not the key.
    pub fn derive(
        kind: ClusterKind,
        group: u16,
        secret: Option<&[u8]>,
        iterations: u32,
    ) -> Result<LinkKey> {
        let secret = match secret {
            Some(s) if !s.is_empty() => s,
            _ => {
                return Err(HaError::NoSecret(match kind {
                    ClusterKind::Fgcp => {
                        "`config system ha` has no `password`; the HA link keys derive from it"
                    }
                    ClusterKind::Fgsp => {
                        "`config system standalone-cluster` has no `psksecret`; the FGSP link \
                         keys derive from it"
                    }
                }))
            }
        };
        if iterations == 0 {
            return Err(HaError::Config("PBKDF2 iterations must be at least 1"));
        }
        let mut salt = LABEL.to_vec();
        salt.push(kind.code());
        salt.extend_from_slice(&group.to_be_bytes());
        let mut master = Key([0; KEY_LEN]);
        openssl::pkcs5::pbkdf2_hmac(
            secret,
            &salt,
            usize::try_from(iterations).unwrap_or(usize::MAX),
            openssl::hash::MessageDigest::sha256(),
            &mut master.0,
        )?;
        Ok(LinkKey {
            kind,
            group,
            salt,
            master,
        })
    }

    /// Cluster kind.
    pub fn kind(&self) -> ClusterKind {
        self.kind
    }

    /// Group id.
    pub fn group(&self) -> u16 {
        self.group
    }

    fn sender_key(&self, sender: MemberId, epoch: u64) -> Result<Key> {
        let mut info = LABEL.to_vec();
        info.extend_from_slice(b" sender");
        info.extend_from_slice(&sender.0.to_be_bytes());
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut out = Key([0; KEY_LEN]);
        hkdf_sha256(&self.master.0, &self.salt, &info, &mut out.0)?;
        Ok(out)
    }
}

/// The epoch for a new start of a member: above the last one stored (`stored`) and at least
/// the wall clock in ms, so that it still grows if the stored value was lost. The daemon
/// stores the result durably before sealing its first message. Fails only when the stored
/// epoch is `u64::MAX` (no larger epoch exists).
pub fn next_epoch(stored: Option<u64>, unix_ms: u64) -> Result<u64> {
    let after = match stored {
        Some(s) => s.checked_add(1).ok_or(HaError::CounterExhausted)?,
        None => 0,
    };
    Ok(after.max(unix_ms))
}

/// HKDF-SHA256 extract-then-expand (RFC 5869 §2.2, §2.3) through OpenSSL.
fn hkdf_sha256(
    ikm: &[u8],
    salt: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), openssl::error::ErrorStack> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_md(Md::sha256())?;
    ctx.set_hkdf_key(ikm)?;
    ctx.set_hkdf_salt(salt)?;
    ctx.add_hkdf_info(info)?;
    ctx.derive(Some(out))?;
    Ok(())
}

fn nonce(counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

struct PeerState {
    epoch: u64,
    key: Key,
    window: ReplayWindow,
}

/// Plain counters of one link (the daemon exports them as Prometheus metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages sealed.
    pub sent: u64,
    /// Bytes sealed (whole datagrams).
    pub sent_bytes: u64,
    /// Messages accepted.
    pub received: u64,
    /// Bytes accepted.
    pub received_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl LinkStats {
    /// Messages dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// All messages dropped.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// An accepted message.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    /// Authenticated sender.
    pub sender: MemberId,
    /// The sender's epoch.
    pub epoch: u64,
    /// The message counter (compare with [`crate::msg::SnapshotChunk::as_of`]).
    pub counter: u64,
    /// This datagram's position among the sender's datagrams to every member or, when it
    /// was sealed for one member ([`HaLink::seal_for_one`], `to_all` false), the position of
    /// the last one sent to all before it (0: none).
    pub stream: u64,
    /// Whether it was sealed for every member of the link.
    pub to_all: bool,
    /// True for the first message of a sender epoch not seen before: the sender (re)started.
    pub new_epoch: bool,
    /// The body.
    pub message: Message,
}

/// One member's end of the HA link: seals what it sends, opens what it receives.
pub struct HaLink {
    key: LinkKey,
    me: MemberId,
    epoch: u64,
    next_counter: u64,
    next_stream: u64,
    tx_key: Key,
    peers: BTreeMap<MemberId, PeerState>,
    stats: LinkStats,
}

impl std::fmt::Debug for HaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaLink")
            .field("key", &self.key)
            .field("me", &self.me)
            .field("epoch", &self.epoch)
            .field("next_counter", &self.next_counter)
            .field("next_stream", &self.next_stream)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("stats", &self.stats)
            .finish()
    }
}

impl HaLink {
    /// A link end for member `me` starting epoch `epoch` (strictly larger than any epoch
    /// this member used before; see the module documentation).
    pub fn new(key: LinkKey, me: MemberId, epoch: u64) -> Result<HaLink> {
        let tx_key = key.sender_key(me, epoch)?;
        Ok(HaLink {
            key,
            me,
            epoch,
            next_counter: 0,
            next_stream: 1,
            tx_key,
            peers: BTreeMap::new(),
            stats: LinkStats::default(),
        })
    }

    /// This member.
    pub fn me(&self) -> MemberId {
        self.me
    }

    /// This start's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The counter the next sealed message will carry (a snapshot's `as_of`).
    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    /// Counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Seal a message into a datagram for every member of the link (the next stream
    /// position).
    pub fn seal(&mut self, msg: &Message) -> Result<Vec<u8>> {
        let body = msg.encode_body()?;
        self.seal_with(msg.msg_type(), &body, true)
    }

    /// Seal a message into a datagram for one member only (no stream position of its own:
    /// the others never see it, so it must leave no gap in what they count; it tells its
    /// receiver the position of the last datagram sent to all).
    pub fn seal_for_one(&mut self, msg: &Message) -> Result<Vec<u8>> {
        let body = msg.encode_body()?;
        self.seal_with(msg.msg_type(), &body, false)
    }

    /// Seal an already encoded body of type `ty` for every member (tests and fuzzing use
    /// it to produce authentic messages with arbitrary bodies).
    pub fn seal_raw(&mut self, ty: MsgType, body: &[u8]) -> Result<Vec<u8>> {
        self.seal_with(ty, body, true)
    }

    fn seal_with(&mut self, ty: MsgType, body: &[u8], to_all: bool) -> Result<Vec<u8>> {
        if body.len() > MAX_BODY_LEN {
            return Err(HaError::TooLarge(HEADER_LEN + body.len() + TAG_LEN));
        }
        let counter = self.next_counter;
        let next = counter.checked_add(1).ok_or(HaError::CounterExhausted)?;
        let stream = if to_all {
            self.next_stream
        } else {
            FOR_ONE | (self.next_stream - 1)
        };
        let next_stream = if to_all {
            stream.checked_add(1).ok_or(HaError::CounterExhausted)?
        } else {
            self.next_stream
        };
        let header = Header {
            version: VERSION,
            msg_type: ty,
            group: self.key.group,
            sender: self.me,
            epoch: self.epoch,
            counter,
            stream,
        };
        let aad = header.encode();
        let mut tag = [0u8; TAG_LEN];
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.tx_key.0,
            Some(&nonce(counter)),
            &aad,
            body,
            &mut tag,
        )?;
        self.next_counter = next;
        self.next_stream = next_stream;
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len() + TAG_LEN);
        out.extend_from_slice(&aad);
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        self.stats.sent += 1;
        self.stats.sent_bytes += out.len() as u64;
        Ok(out)
    }

    /// Open a datagram. On `Err` nothing changed except the drop counter for the reason.
    pub fn open(&mut self, datagram: &[u8]) -> std::result::Result<Received, DropReason> {
        let r = self.open_inner(datagram);
        match &r {
            Ok(_) => {
                self.stats.received += 1;
                self.stats.received_bytes += datagram.len() as u64;
            }
            Err(reason) => {
                if let Some(c) = self.stats.drops.get_mut(reason.index()) {
                    *c += 1;
                }
            }
        }
        r
    }

    fn open_inner(&mut self, datagram: &[u8]) -> std::result::Result<Received, DropReason> {
        let (h, sealed) = Header::parse(datagram)?;
        if h.group != self.key.group {
            return Err(DropReason::WrongGroup);
        }
        if h.sender == self.me {
            return Err(DropReason::Reflected);
        }
        if !h.msg_type.is_known() {
            return Err(DropReason::UnknownType);
        }
        // Choose the key, checking replay before any crypto.
        let mut fresh_key = None;
        let new_epoch = match self.peers.get(&h.sender) {
            Some(p) if h.epoch < p.epoch => return Err(DropReason::StaleEpoch),
            Some(p) if h.epoch == p.epoch => {
                if !p.window.check(h.counter) {
                    return Err(DropReason::Replayed);
                }
                false
            }
            _ => {
                // A sender or epoch not seen yet: derive its key (cheap, HKDF) and try.
                fresh_key = Some(
                    self.key
                        .sender_key(h.sender, h.epoch)
                        .map_err(|_| DropReason::AuthFailed)?,
                );
                true
            }
        };
        let key = match (&fresh_key, self.peers.get(&h.sender)) {
            (Some(k), _) => k,
            (None, Some(p)) => &p.key,
            // Unreachable: without a fresh key the sender is known. Fail closed anyway.
            (None, None) => return Err(DropReason::AuthFailed),
        };
        // Header::parse guaranteed datagram.len() >= HEADER_LEN + TAG_LEN and
        // sealed.len() >= TAG_LEN, so neither split can panic.
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let aad = &datagram[..HEADER_LEN];
        let body = decrypt_aead(
            Cipher::aes_256_gcm(),
            &key.0,
            Some(&nonce(h.counter)),
            aad,
            ct,
            tag,
        )
        .map_err(|_| DropReason::AuthFailed)?;
        let message = Message::decode_body(h.msg_type, &body)?;
        // Authenticated and decoded: now, and only now, update the sender's state.
        match fresh_key {
            Some(key) => {
                if !self.peers.contains_key(&h.sender) && self.peers.len() >= MAX_SENDERS {
                    return Err(DropReason::TooManySenders);
                }
                let mut window = ReplayWindow::default();
                window.mark(h.counter);
                self.peers.insert(
                    h.sender,
                    PeerState {
                        epoch: h.epoch,
                        key,
                        window,
                    },
                );
            }
            None => {
                if let Some(p) = self.peers.get_mut(&h.sender) {
                    p.window.mark(h.counter);
                }
            }
        }
        Ok(Received {
            sender: h.sender,
            epoch: h.epoch,
            counter: h.counter,
            stream: h.stream & !FOR_ONE,
            to_all: h.stream & FOR_ONE == 0,
            new_epoch,
            message,
        })
    }

    /// Senders heard from, with their current epoch (for the peers view).
    pub fn peer_epochs(&self) -> impl Iterator<Item = (MemberId, u64)> + '_ {
        self.peers.iter().map(|(m, p)| (*m, p.epoch))
    }

    /// Forget a sender (removed from the configuration). Its next message is treated as a
    /// first contact.
    pub fn forget(&mut self, member: MemberId) {
        self.peers.remove(&member);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::tests::all_samples;
    use crate::msg::{SeqLease, SnapshotRequest};

    /// Low iteration count: the tests exercise the construction, not its cost.
    pub(crate) const TEST_ITERS: u32 = 10;

    fn key(kind: ClusterKind, group: u16, pw: &[u8]) -> LinkKey {
        LinkKey::derive(kind, group, Some(pw), TEST_ITERS).unwrap()
    }

    fn pair() -> (HaLink, HaLink) {
        let k = key(ClusterKind::Fgcp, 1, b"cluster-pw");
        (
            HaLink::new(k.clone(), MemberId(1), 100).unwrap(),
            HaLink::new(k, MemberId(2), 200).unwrap(),
        )
    }

    fn lease(n: u64) -> Message {
        Message::SeqLease(SeqLease {
            tunnel: "vpn1_1".into(),
            spi_out: 0x10aa45b0,
            seq_hw: n,
        })
    }

    #[test]
    fn hkdf_rfc5869_test_case_1() {
        // RFC 5869 Appendix A.1.
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf_sha256(&ikm, &salt, &info, &mut okm).unwrap();
        let want = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf\
                    34007208d5b887185865";
        let got: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pbkdf2_rfc7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256 (P="passwd", S="salt", c=1, dkLen=64), first 32.
        let mut out = [0u8; 32];
        openssl::pkcs5::pbkdf2_hmac(
            b"passwd",
            b"salt",
            1,
            openssl::hash::MessageDigest::sha256(),
            &mut out,
        )
        .unwrap();
        let got: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            got,
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn no_secret_no_link() {
        for kind in [ClusterKind::Fgcp, ClusterKind::Fgsp] {
            for s in [None, Some(&b""[..])] {
                let e = LinkKey::derive(kind, 1, s, TEST_ITERS).unwrap_err();
                let text = e.to_string();
                assert!(matches!(e, HaError::NoSecret(_)));
                let word = if kind == ClusterKind::Fgcp {
                    "password"
                } else {
                    "psksecret"
                };
                assert!(text.contains(word), "{text}");
            }
        }
        assert!(matches!(
            LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"x"), 0),
            Err(HaError::Config(_))
        ));
    }

    #[test]
    fn every_message_round_trips_and_counts() {
        let (mut a, mut b) = pair();
        for m in all_samples() {
            let d = a.seal(&m).unwrap();
            let r = b.open(&d).unwrap();
            assert_eq!(r.message, m);
            assert_eq!(r.sender, MemberId(1));
            assert_eq!(r.epoch, 100);
        }
        assert_eq!(b.stats().received, all_samples().len() as u64);
        assert_eq!(a.stats().sent, all_samples().len() as u64);
        assert_eq!(b.stats().drops_total(), 0);
    }

    #[test]
    fn the_body_is_not_in_clear() {
        let (mut a, _) = pair();
        let d = a
            .seal(&Message::SnapshotRequest(SnapshotRequest {
                request_id: 0x4141_4141_4141_4141,
                next: 0,
            }))
            .unwrap();
        assert!(!d.windows(8).any(|w| w == [0x41; 8]));
        assert!(!d.windows(10).any(|w| w == b"request_id"));
    }

    #[test]
    fn replay_is_dropped_and_changes_nothing() {
        let (mut a, mut b) = pair();
        let d1 = a.seal(&lease(1)).unwrap();
        let d2 = a.seal(&lease(2)).unwrap();
        assert!(b.open(&d2).unwrap().new_epoch);
        assert!(
            !b.open(&d1).unwrap().new_epoch,
            "reordered within the window is fine"
        );
        assert_eq!(b.open(&d1).err(), Some(DropReason::Replayed));
        assert_eq!(b.open(&d2).err(), Some(DropReason::Replayed));
        assert_eq!(b.stats().drops(DropReason::Replayed), 2);
        // Far behind the window.
        let old = a.seal(&lease(3)).unwrap();
        for _ in 0..WINDOW + 1 {
            let d = a.seal(&lease(4)).unwrap();
            b.open(&d).unwrap();
        }
        assert_eq!(b.open(&old).err(), Some(DropReason::Replayed));
    }

    #[test]
    fn forged_and_tampered_are_dropped() {
        let (mut a, mut b) = pair();
        let good = a.seal(&lease(7)).unwrap();
        // Every single-bit flip anywhere (header included: it is the AAD) fails.
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut d = good.clone();
                d[i] ^= bit;
                let e = b.open(&d).unwrap_err();
                assert!(
                    matches!(
                        e,
                        DropReason::AuthFailed
                            | DropReason::BadVersion
                            | DropReason::WrongGroup
                            | DropReason::UnknownType
                            | DropReason::Reflected
                    ),
                    "byte {i}: {e:?}"
                );
            }
        }
        // None of that created sender state: the genuine message is still the first.
        let r = b.open(&good).unwrap();
        assert!(r.new_epoch);
        // Another password, same group: forged.
        let mut other = HaLink::new(key(ClusterKind::Fgcp, 1, b"guess"), MemberId(1), 101).unwrap();
        let forged = other.seal(&lease(8)).unwrap();
        assert_eq!(b.open(&forged).err(), Some(DropReason::AuthFailed));
        // Same password, FGSP instead of FGCP: other keys.
        let mut fgsp =
            HaLink::new(key(ClusterKind::Fgsp, 1, b"cluster-pw"), MemberId(1), 102).unwrap();
        assert_eq!(
            b.open(&fgsp.seal(&lease(8)).unwrap()).err(),
            Some(DropReason::AuthFailed)
        );
        // The forged higher epoch did not displace the real one.
        let d = a.seal(&lease(9)).unwrap();
        assert!(!b.open(&d).unwrap().new_epoch);
    }

    #[test]
    fn truncated_oversized_wrong_group_reflected_unknown() {
        let (mut a, mut b) = pair();
        let good = a.seal(&lease(1)).unwrap();
        for n in 0..HEADER_LEN + TAG_LEN {
            assert_eq!(b.open(&good[..n]).err(), Some(DropReason::Truncated));
        }
        for n in HEADER_LEN + TAG_LEN..good.len() {
            assert_eq!(b.open(&good[..n]).err(), Some(DropReason::AuthFailed));
        }
        let mut big = good.clone();
        big.resize(crate::wire::MAX_MESSAGE_LEN + 1, 0);
        assert_eq!(b.open(&big).err(), Some(DropReason::Oversized));
        assert!(matches!(
            a.seal_raw(MsgType::SEQ_LEASE, &vec![0; MAX_BODY_LEN + 1]),
            Err(HaError::TooLarge(_))
        ));
        let mut g2 =
            HaLink::new(key(ClusterKind::Fgcp, 2, b"cluster-pw"), MemberId(1), 100).unwrap();
        assert_eq!(
            b.open(&g2.seal(&lease(1)).unwrap()).err(),
            Some(DropReason::WrongGroup)
        );
        let mut me = HaLink::new(key(ClusterKind::Fgcp, 1, b"cluster-pw"), MemberId(2), 5).unwrap();
        assert_eq!(
            b.open(&me.seal(&lease(1)).unwrap()).err(),
            Some(DropReason::Reflected)
        );
        let unk = a.seal_raw(MsgType(200), &[0xc0]).unwrap();
        assert_eq!(b.open(&unk).err(), Some(DropReason::UnknownType));
        let bad = a.seal_raw(MsgType::SEQ_LEASE, &[0xc0]).unwrap();
        assert_eq!(b.open(&bad).err(), Some(DropReason::BadPayload));
        // Every prefix shorter than the datagram (truncated or failing the tag), the oversized
        // one, and the five single cases above.
        assert_eq!(b.stats().drops_total(), good.len() as u64 + 5);
        // After all that, the real message is still accepted.
        assert!(b.open(&good).is_ok());
    }

    #[test]
    fn restart_with_new_epoch_then_old_epoch_is_stale() {
        let (mut a, mut b) = pair();
        let old = a.seal(&lease(1)).unwrap();
        b.open(&a.seal(&lease(2)).unwrap()).unwrap();
        let k = key(ClusterKind::Fgcp, 1, b"cluster-pw");
        let mut a2 = HaLink::new(k, MemberId(1), 101).unwrap();
        let r = b.open(&a2.seal(&lease(3)).unwrap()).unwrap();
        assert!(r.new_epoch);
        assert_eq!(
            b.peer_epochs().collect::<Vec<_>>(),
            vec![(MemberId(1), 101)]
        );
        assert_eq!(r.counter, 0, "the new epoch starts its counter again");
        assert_eq!(b.open(&old).err(), Some(DropReason::StaleEpoch));
    }

    #[test]
    fn too_many_senders() {
        let k = key(ClusterKind::Fgsp, 3, b"psk");
        let mut rx = HaLink::new(k.clone(), MemberId(0), 1).unwrap();
        for id in 1..=MAX_SENDERS as u32 {
            let mut tx = HaLink::new(k.clone(), MemberId(id), 1).unwrap();
            rx.open(&tx.seal(&lease(1)).unwrap()).unwrap();
        }
        let mut tx = HaLink::new(k, MemberId(1000), 1).unwrap();
        assert_eq!(
            rx.open(&tx.seal(&lease(1)).unwrap()).err(),
            Some(DropReason::TooManySenders)
        );
        rx.forget(MemberId(1));
        assert!(rx.open(&tx.seal(&lease(1)).unwrap()).is_ok());
    }

    #[test]
    fn golden_datagram() {
        // Pins the wire format and key schedule: any change to either shows up here.
        let k = LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"pw"), 1).unwrap();
        let mut a = HaLink::new(k, MemberId(1), 1).unwrap();
        let d = a
            .seal(&Message::SnapshotRequest(SnapshotRequest {
                request_id: 1,
                next: 0,
            }))
            .unwrap();
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN);
        // Body: msgpack map {"request_id": 1}, 13 bytes, plus header and tag.
        assert_eq!(d.len(), HEADER_LEN + 13 + TAG_LEN);
    }

    /// Computed independently by `scripts/golden_datagram.py` (Python hashlib/hmac and the
    /// `cryptography` package's AES-GCM).
    const GOLDEN: &str = "020800010000000100000000000000010000000000000000000000000000000181\
                          e4bb49b6a481247cb79813b5ffcba497b5022100226298ccffe036e1";

    #[test]
    fn epochs_grow_across_restarts() {
        assert_eq!(
            next_epoch(None, 1_700_000_000_000).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            next_epoch(Some(1_800_000_000_000), 1_700_000_000_000).unwrap(),
            1_800_000_000_001
        );
        assert_eq!(next_epoch(Some(5), 3).unwrap(), 6);
        assert!(next_epoch(Some(u64::MAX), 0).is_err());
    }

    #[test]
    fn nonces_differ_per_message() {
        let (mut a, _) = pair();
        let d1 = a.seal(&lease(1)).unwrap();
        let d2 = a.seal(&lease(1)).unwrap();
        assert_ne!(d1[HEADER_LEN..], d2[HEADER_LEN..]);
        assert_eq!(Header::parse(&d2).unwrap().0.counter, 1);
    }

    #[test]
    fn only_datagrams_to_every_member_take_a_stream_position() {
        let (mut a, mut b) = pair();
        let all1 = a.seal(&lease(1)).unwrap();
        let one = a.seal_for_one(&lease(2)).unwrap();
        let all2 = a.seal(&lease(3)).unwrap();
        let heads: Vec<(u64, u64)> = [&all1, &one, &all2]
            .iter()
            .map(|d| {
                let h = Header::parse(d).unwrap().0;
                (h.counter, h.stream)
            })
            .collect();
        // Counters (the nonces) number every datagram; stream positions skip the one for
        // one member, so a member that never saw it finds no gap, and that one carries the
        // position of the last datagram to all.
        assert_eq!(heads, vec![(0, 1), (1, FOR_ONE | 1), (2, 2)]);
        let got: Vec<(u64, u64, bool)> = [&all1, &all2, &one]
            .iter()
            .map(|d| {
                let r = b.open(d).unwrap();
                (r.counter, r.stream, r.to_all)
            })
            .collect();
        assert_eq!(got, vec![(0, 1, true), (2, 2, true), (1, 1, false)]);
        // Before anything went to all, a datagram for one says position 0.
        let (mut c, mut d) = pair();
        let r = d.open(&c.seal_for_one(&lease(5)).unwrap()).unwrap();
        assert_eq!((r.stream, r.to_all), (0, false));
        // The stream position is authenticated like the rest of the header.
        let mut forged = a.seal(&lease(4)).unwrap();
        forged[HEADER_LEN - 1] ^= 1;
        assert_eq!(b.open(&forged).err(), Some(DropReason::AuthFailed));
    }
}
