//! FGCP configuration sync over the HA link: checksums, the messages, and the transfer
//! a secondary pulls from its primary (sans-IO, driven by `now_ms`).
//!
//! Every FGCP member announces its configuration checksums ([`ConfigStatus`], every
//! [`STATUS_INTERVAL_MS`] and at once after a reload). A secondary whose running checksum
//! differs from its primary's asks the primary for the text ([`ConfigRequest`]) and gets
//! it in chunks of at most [`CHUNK_LEN`] bytes ([`ConfigChunk`]), one request per chunk,
//! asked again after [`RETRY_MS`] without an answer, given up after [`GIVE_UP_MS`] without
//! progress. The text is identified by `text_id`, the first 16 bytes of its SHA-256: the
//! secondary checks the assembled text against it, so chunks of two versions can never
//! mix. Only the member this one takes for primary is ever asked, and only while this
//! member is secondary: nothing flows from a secondary to its primary.
//!
//! What the daemon does with a complete text (merge with its per-member keys, checks,
//! write, reload) is not here. A text it refused, or applied without reaching the
//! primary's checksum, is not asked for again for [`BACKOFF_MS`] ([`ConfigPull::refuse`]).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::msg::KeyBytes;
use crate::wire::MemberId;

/// Bytes of configuration text per chunk (one UDP datagram, IP-fragmented on the link
/// like snapshot chunks).
pub const CHUNK_LEN: usize = 32 * 1024;
/// Largest configuration text accepted (haven-config's `MAX_FILE_BYTES`).
pub const MAX_TEXT_LEN: u64 = 16 * 1024 * 1024;
/// How often every member announces its checksums.
pub const STATUS_INTERVAL_MS: u64 = 1_000;
/// A request without an answer is sent again after this long.
pub const RETRY_MS: u64 = 500;
/// A transfer that made no progress for this long is abandoned.
pub const GIVE_UP_MS: u64 = 10_000;
/// A text refused (or applied without reaching the primary's checksum) is not asked for
/// again for this long.
pub const BACKOFF_MS: u64 = 30_000;

/// A 128-bit digest: the first 16 bytes of a SHA-256. Serialized as a MessagePack `bin`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest16(pub [u8; 16]);

impl Digest16 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest16 {
        let h = openssl::sha::sha256(bytes);
        let mut d = [0u8; 16];
        // A SHA-256 is 32 bytes: the constant range is within it.
        d.copy_from_slice(&h[..16]);
        Digest16(d)
    }

    /// FortiOS's layout: 16 bytes in hex separated by spaces (`a0 7f a7 ...`).
    pub fn spaced_hex(&self) -> String {
        let v: Vec<String> = self.0.iter().map(|b| format!("{b:02x}")).collect();
        v.join(" ")
    }

    /// Plain hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Serialize for Digest16 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest16 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = KeyBytes::deserialize(d)?;
        let a: [u8; 16] = k
            .expose()
            .try_into()
            .map_err(|_| serde::de::Error::custom("a digest is 16 bytes"))?;
        Ok(Digest16(a))
    }
}

/// A member's configuration checksums, as FortiOS's `diagnose sys ha checksum show`:
/// `global` (the `config system ...` blocks), `root` (everything else: VPN, routes) and
/// `all`, each over haven-config's canonical synced text (per-member keys, comments and
/// layout left out), so members that are in sync show the same three values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSums {
    /// `config system ...` blocks.
    pub global: Digest16,
    /// Every other block.
    pub root: Digest16,
    /// Both.
    pub all: Digest16,
}

impl ConfigSums {
    /// The checksums of the canonical texts of the two parts.
    pub fn compute(global: &str, root: &str) -> ConfigSums {
        let mut both = Vec::with_capacity(global.len() + root.len() + 16);
        both.extend_from_slice(b"global\n");
        both.extend_from_slice(global.as_bytes());
        both.extend_from_slice(b"root\n");
        both.extend_from_slice(root.as_bytes());
        ConfigSums {
            global: Digest16::of(global.as_bytes()),
            root: Digest16::of(root.as_bytes()),
            all: Digest16::of(&both),
        }
    }
}

/// A member's configuration state, announced to every FGCP member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// `sync-config` of the sender: a primary offers its text, a secondary takes one.
    pub sync_config: bool,
    /// Checksums of the configuration the sender runs (its last successful load).
    pub running: ConfigSums,
    /// Checksums of its file as it is on disk now (`None`: it does not load).
    pub file: Option<ConfigSums>,
    /// [`Digest16`] of the running text's bytes: what a [`ConfigRequest`] names.
    pub text_id: Digest16,
    /// Length of the running text in bytes.
    pub text_len: u64,
}

/// A secondary asks its primary for the text `text_id` from byte `offset` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRequest {
    /// The text asked for.
    pub text_id: Digest16,
    /// First byte wanted.
    pub offset: u64,
}

/// Part of a configuration text, unicast to the member that asked. The text holds
/// secrets (`psksecret`, `password`): [`KeyBytes`] clears it on drop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChunk {
    /// The text this is part of.
    pub text_id: Digest16,
    /// Its whole length.
    pub total: u64,
    /// Where `data` starts.
    pub offset: u64,
    /// The bytes.
    pub data: KeyBytes,
}

/// The primary's answer to `req` from its running text `text` (`None` when the request
/// names another text or an offset past its end).
pub fn serve(text: &[u8], req: &ConfigRequest) -> Option<ConfigChunk> {
    if Digest16::of(text) != req.text_id {
        return None;
    }
    let start = usize::try_from(req.offset).ok()?;
    let rest = text.get(start..)?;
    if rest.is_empty() && !text.is_empty() {
        return None;
    }
    let data = rest.get(..CHUNK_LEN.min(rest.len()))?.to_vec();
    Some(ConfigChunk {
        text_id: req.text_id,
        total: text.len() as u64,
        offset: req.offset,
        data: KeyBytes(data),
    })
}

/// Why a transfer ended without a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullFailure {
    /// The announced length is above [`MAX_TEXT_LEN`].
    TooLarge,
    /// The assembled text does not have the announced `text_id`.
    Corrupt,
    /// No progress for [`GIVE_UP_MS`].
    Timeout,
}

impl PullFailure {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            PullFailure::TooLarge => "too_large",
            PullFailure::Corrupt => "corrupt",
            PullFailure::Timeout => "timeout",
        }
    }
}

/// What a transfer produced.
#[derive(Debug, PartialEq, Eq)]
pub enum PullEvent {
    /// The whole text arrived and matches its `text_id`.
    Complete {
        /// The primary it came from.
        from: MemberId,
        /// Its id.
        text_id: Digest16,
        /// The text.
        text: KeyBytes,
    },
    /// The transfer was abandoned.
    Failed {
        /// The primary.
        from: MemberId,
        /// The text.
        text_id: Digest16,
        /// Why.
        reason: PullFailure,
    },
}

#[derive(Debug)]
struct Transfer {
    from: MemberId,
    text_id: Digest16,
    total: u64,
    data: Vec<u8>,
    /// When the current request is due (again).
    request_at: u64,
    /// When the transfer is abandoned unless it progresses.
    give_up_at: u64,
}

/// Counters of a [`ConfigPull`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Transfers started.
    pub started: u64,
    /// Requests sent (first and repeated).
    pub requests: u64,
    /// Chunks that were not the next expected one (duplicates, another text, another
    /// sender, no transfer).
    pub chunks_ignored: u64,
}

/// The secondary's side of the transfer.
#[derive(Debug, Default)]
pub struct ConfigPull {
    transfer: Option<Transfer>,
    /// Texts not to ask for again before the given time.
    refused: BTreeMap<Digest16, u64>,
    events: VecDeque<PullEvent>,
    stats: PullStats,
    /// The next status from the primary starts a transfer even when the checksums agree
    /// or the text was refused (`execute ha synchronize start`).
    forced: bool,
}

impl ConfigPull {
    /// A puller with nothing under way.
    pub fn new() -> Self {
        Self::default()
    }

    /// A status from `from`. `primary` is the member this one takes for primary (`None`
    /// unless this member is secondary), `mine` this member's running checksums, `takes`
    /// its own `sync-config`. Starts a transfer when the primary offers a configuration
    /// whose checksum differs from this member's.
    pub fn handle_status(
        &mut self,
        from: MemberId,
        st: &ConfigStatus,
        primary: Option<MemberId>,
        mine: &ConfigSums,
        takes: bool,
        now_ms: u64,
    ) {
        self.refused.retain(|_, until| *until > now_ms);
        if primary != Some(from) || !takes || !st.sync_config {
            return;
        }
        let forced = std::mem::take(&mut self.forced);
        if !forced && (st.running.all == mine.all || self.refused.contains_key(&st.text_id)) {
            return;
        }
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| t.from == from && t.text_id == st.text_id)
        {
            return;
        }
        if st.text_len > MAX_TEXT_LEN {
            self.transfer = None;
            self.refuse(st.text_id, now_ms);
            self.events.push_back(PullEvent::Failed {
                from,
                text_id: st.text_id,
                reason: PullFailure::TooLarge,
            });
            return;
        }
        self.stats.started += 1;
        self.transfer = Some(Transfer {
            from,
            text_id: st.text_id,
            total: st.text_len,
            data: Vec::new(),
            request_at: now_ms,
            give_up_at: now_ms.saturating_add(GIVE_UP_MS),
        });
    }

    /// A chunk from `from`: kept when it is the next part of the text under way.
    pub fn handle_chunk(&mut self, from: MemberId, c: ConfigChunk, now_ms: u64) {
        let Some(t) = self.transfer.as_mut() else {
            self.stats.chunks_ignored += 1;
            return;
        };
        if t.from != from
            || t.text_id != c.text_id
            || c.offset != t.data.len() as u64
            || c.total != t.total
            || c.data.expose().is_empty() && t.total != 0
        {
            self.stats.chunks_ignored += 1;
            return;
        }
        if (t.data.len() as u64).saturating_add(c.data.expose().len() as u64) > t.total {
            self.stats.chunks_ignored += 1;
            return;
        }
        t.data.extend_from_slice(c.data.expose());
        t.request_at = now_ms;
        t.give_up_at = now_ms.saturating_add(GIVE_UP_MS);
        if t.data.len() as u64 == t.total {
            if let Some(t) = self.transfer.take() {
                let ev = if Digest16::of(&t.data) == t.text_id {
                    PullEvent::Complete {
                        from: t.from,
                        text_id: t.text_id,
                        text: KeyBytes(t.data),
                    }
                } else {
                    self.refused
                        .insert(t.text_id, now_ms.saturating_add(BACKOFF_MS));
                    PullEvent::Failed {
                        from: t.from,
                        text_id: t.text_id,
                        reason: PullFailure::Corrupt,
                    }
                };
                self.events.push_back(ev);
            }
        }
    }

    /// The request to send now, if any (and abandons a transfer that made no progress).
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<(MemberId, ConfigRequest)> {
        let t = self.transfer.as_mut()?;
        if now_ms >= t.give_up_at {
            let (from, text_id) = (t.from, t.text_id);
            self.transfer = None;
            self.refuse(text_id, now_ms);
            self.events.push_back(PullEvent::Failed {
                from,
                text_id,
                reason: PullFailure::Timeout,
            });
            return None;
        }
        if now_ms < t.request_at {
            return None;
        }
        t.request_at = now_ms.saturating_add(RETRY_MS);
        self.stats.requests += 1;
        Some((
            t.from,
            ConfigRequest {
                text_id: t.text_id,
                offset: t.data.len() as u64,
            },
        ))
    }

    /// When [`ConfigPull::poll_transmit`] has something to do next.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.transfer
            .as_ref()
            .map(|t| t.request_at.min(t.give_up_at))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PullEvent> {
        self.events.pop_front()
    }

    /// Do not ask for `text_id` again for [`BACKOFF_MS`].
    pub fn refuse(&mut self, text_id: Digest16, now_ms: u64) {
        self.refused
            .insert(text_id, now_ms.saturating_add(BACKOFF_MS));
    }

    /// Takes the primary's text at its next status whatever the checksums say (FortiOS's
    /// `execute ha synchronize start`).
    pub fn force(&mut self) {
        self.forced = true;
        self.transfer = None;
    }

    /// Forgets every refusal: texts refused or applied may be asked for again (this
    /// member's configuration changed by other means, e.g. a local edit and reload).
    pub fn forget_refusals(&mut self) {
        self.refused.clear();
    }

    /// Drops the transfer under way (this member is no longer secondary, or its primary
    /// changed) and forgets refusals (a new primary's texts are judged afresh).
    pub fn cancel(&mut self) {
        self.transfer = None;
        self.refused.clear();
    }

    /// Whether a transfer is under way: (from, text_id, bytes so far, total).
    pub fn under_way(&self) -> Option<(MemberId, Digest16, u64, u64)> {
        self.transfer
            .as_ref()
            .map(|t| (t.from, t.text_id, t.data.len() as u64, t.total))
    }

    /// Counters.
    pub fn stats(&self) -> PullStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(text: &[u8], sums: ConfigSums) -> ConfigStatus {
        ConfigStatus {
            sync_config: true,
            running: sums,
            file: Some(sums),
            text_id: Digest16::of(text),
            text_len: text.len() as u64,
        }
    }

    fn sums(s: &str) -> ConfigSums {
        ConfigSums::compute(s, "")
    }

    /// Runs a transfer through a channel that loses every `lose`-th datagram each way.
    fn transfer(text: &[u8], lose: usize) -> (Vec<PullEvent>, u64) {
        let p = MemberId(1);
        let mut pull = ConfigPull::new();
        let mut now = 1_000u64;
        pull.handle_status(p, &status(text, sums("a")), Some(p), &sums("b"), true, now);
        let mut n = 0usize;
        let mut events = Vec::new();
        for _ in 0..10_000 {
            while let Some(e) = pull.poll_event() {
                events.push(e);
            }
            if pull.under_way().is_none() && !events.is_empty() {
                break;
            }
            if let Some((to, req)) = pull.poll_transmit(now) {
                assert_eq!(to, p);
                n += 1;
                if lose == 0 || n % lose != 0 {
                    if let Some(c) = serve(text, &req) {
                        n += 1;
                        if lose == 0 || n % lose != 0 {
                            pull.handle_chunk(p, c, now);
                        }
                    }
                }
            }
            now = pull.poll_timeout().unwrap_or(now + 20).max(now + 1);
        }
        (events, now)
    }

    #[test]
    fn a_text_arrives_whole_over_a_lossy_link() {
        let text: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for lose in [0, 3, 5] {
            let (ev, _) = transfer(&text, lose);
            match ev.as_slice() {
                [PullEvent::Complete { text: t, from, .. }] => {
                    assert_eq!(t.expose(), &text[..], "lose {lose}");
                    assert_eq!(*from, MemberId(1));
                }
                other => panic!("lose {lose}: {other:?}"),
            }
        }
        // An empty file too.
        let (ev, _) = transfer(b"", 0);
        assert!(
            matches!(ev.as_slice(), [PullEvent::Complete { text, .. }] if text.expose().is_empty())
        );
    }

    #[test]
    fn a_dead_link_gives_up_and_backs_off() {
        let (ev, now) = transfer(b"config", 1);
        assert!(
            matches!(
                ev.as_slice(),
                [PullEvent::Failed {
                    reason: PullFailure::Timeout,
                    ..
                }]
            ),
            "{ev:?}"
        );
        assert!(now >= 1_000 + GIVE_UP_MS);
    }

    #[test]
    fn only_the_primary_is_asked_and_only_when_checksums_differ() {
        let text = b"text";
        let st = status(text, sums("a"));
        let p = MemberId(1);
        let mut pull = ConfigPull::new();
        // Not from the primary, primary unknown (this member is primary), same checksum,
        // sync-config disable on either side: nothing.
        pull.handle_status(MemberId(2), &st, Some(p), &sums("b"), true, 0);
        pull.handle_status(p, &st, None, &sums("b"), true, 0);
        pull.handle_status(p, &st, Some(p), &sums("a"), true, 0);
        pull.handle_status(p, &st, Some(p), &sums("b"), false, 0);
        let off = ConfigStatus {
            sync_config: false,
            ..st.clone()
        };
        pull.handle_status(p, &off, Some(p), &sums("b"), true, 0);
        assert_eq!(pull.poll_transmit(0), None);
        pull.handle_status(p, &st, Some(p), &sums("b"), true, 0);
        assert!(pull.poll_transmit(0).is_some());
        // A refused text is not asked for again until the back-off ends.
        pull.cancel();
        pull.refuse(st.text_id, 0);
        pull.handle_status(p, &st, Some(p), &sums("b"), true, 10);
        assert_eq!(pull.poll_transmit(10), None);
        pull.handle_status(p, &st, Some(p), &sums("b"), true, BACKOFF_MS + 1);
        assert!(pull.poll_transmit(BACKOFF_MS + 1).is_some());
        // Forced: once, even with equal checksums.
        pull.cancel();
        pull.force();
        pull.handle_status(p, &st, Some(p), &sums("a"), true, 0);
        assert!(pull.poll_transmit(0).is_some());
        pull.cancel();
        pull.handle_status(p, &st, Some(p), &sums("a"), true, 0);
        assert_eq!(pull.poll_transmit(0), None);
    }

    #[test]
    fn forged_sizes_and_stray_chunks_change_nothing() {
        let p = MemberId(1);
        let mut pull = ConfigPull::new();
        let mut st = status(b"abc", sums("a"));
        st.text_len = MAX_TEXT_LEN + 1;
        pull.handle_status(p, &st, Some(p), &sums("b"), true, 0);
        assert!(matches!(
            pull.poll_event(),
            Some(PullEvent::Failed {
                reason: PullFailure::TooLarge,
                ..
            })
        ));
        assert!(pull.under_way().is_none());
        // A chunk with no transfer, then one with the wrong id, offset or length.
        let text = b"config system ha\nend\n";
        let st = status(text, sums("a"));
        let c = serve(
            text,
            &ConfigRequest {
                text_id: st.text_id,
                offset: 0,
            },
        )
        .unwrap();
        pull.handle_chunk(p, c.clone(), 0);
        pull.handle_status(p, &st, Some(p), &sums("b"), true, 0);
        let mut wrong = c.clone();
        wrong.offset = 1;
        pull.handle_chunk(p, wrong, 0);
        let mut wrong = c.clone();
        wrong.total += 1;
        pull.handle_chunk(p, wrong, 0);
        pull.handle_chunk(MemberId(9), c.clone(), 0);
        assert_eq!(pull.stats().chunks_ignored, 4);
        assert_eq!(pull.poll_event(), None);
        // Same id and length, other bytes (a forged id cannot pass the digest check).
        let mut bad = c.clone();
        bad.data = KeyBytes(b"config system ha\nEND\n".to_vec());
        pull.handle_chunk(p, bad, 0);
        assert!(matches!(
            pull.poll_event(),
            Some(PullEvent::Failed {
                reason: PullFailure::Corrupt,
                ..
            })
        ));
        // The primary answers nothing for another text or past the end.
        let other = ConfigRequest {
            text_id: Digest16::of(b"x"),
            offset: 0,
        };
        assert_eq!(serve(text, &other), None);
        let past = ConfigRequest {
            text_id: st.text_id,
            offset: 1 << 40,
        };
        assert_eq!(serve(text, &past), None);
    }

    #[test]
    fn checksums_follow_the_text_and_print_like_fortios() {
        let a = ConfigSums::compute("g", "r");
        assert_eq!(a, ConfigSums::compute("g", "r"));
        let b = ConfigSums::compute("g", "r2");
        assert_eq!(a.global, b.global);
        assert_ne!(a.root, b.root);
        assert_ne!(a.all, b.all);
        // The parts are delimited: moving text between them changes `all`.
        assert_ne!(
            ConfigSums::compute("gr", "").all,
            ConfigSums::compute("g", "r").all
        );
        // SHA-256("abc") starts ba 78 16 bf (FIPS 180-2, appendix B.1).
        assert!(Digest16::of(b"abc")
            .spaced_hex()
            .starts_with("ba 78 16 bf 8f 01"));
        assert_eq!(Digest16::of(b"abc").hex().len(), 32);
    }
}
