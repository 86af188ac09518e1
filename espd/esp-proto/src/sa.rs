//! Outbound ([`EncryptSa`]) and inbound ([`DecryptSa`]) ESP SAs in tunnel mode (RFC 4303).

use crate::error::{DropReason, EspError, Result};
use crate::esp::{decode_payload, EspCrypto};
use crate::inner::next_header_for;
use crate::lifetime::{Counters, Lifetime, LifetimeConfig, LifetimeEvent};
use crate::replay::ReplayWindow;
use crate::seq::{OutboundSeq, SeqLease};
use crate::transform::Transform;
use crate::wire::{MAX_PACKET_LEN, NEXT_HEADER_NONE};
use std::time::Instant;

/// What both directions of an SA are made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaConfig {
    /// SPI of this SA (the one in the packets' headers). 0 is reserved (RFC 4303 §2.1).
    pub spi: u32,
    /// Negotiated transform.
    pub transform: Transform,
    /// Extended (64-bit) sequence numbers negotiated (RFC 4304).
    pub esn: bool,
    /// Soft and hard lifetimes.
    pub lifetime: LifetimeConfig,
}

/// Key material of one direction, split as RFC 7296 §2.17 orders it.
#[derive(Clone, Copy)]
pub struct SaKeys<'a> {
    /// Encryption key; for AEAD transforms followed by the 4-byte salt.
    pub enc: &'a [u8],
    /// Integrity key (empty for AEAD transforms).
    pub integ: &'a [u8],
}

impl<'a> SaKeys<'a> {
    /// Split one direction's KEYMAT (RFC 7296 §2.17: encryption key, then integrity key;
    /// the AEAD salt is the last 4 bytes of the encryption part, RFC 4106 §8.1, RFC 7634 §2).
    /// A CHILD SA's KEYMAT holds the initiator-to-responder direction first, then the other;
    /// each is `transform.keymat_len()` bytes.
    pub fn split(transform: Transform, keymat: &'a [u8]) -> Result<Self> {
        if keymat.len() != transform.keymat_len() {
            return Err(EspError::Config("KEYMAT length"));
        }
        let (enc, integ) = keymat.split_at(transform.enc_keymat_len());
        Ok(SaKeys { enc, integ })
    }
}

impl std::fmt::Debug for SaKeys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SaKeys {{ enc: {} bytes, integ: {} bytes }}",
            self.enc.len(),
            self.integ.len()
        )
    }
}

/// Outbound options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundOptions {
    /// First sequence number to send: 1 for a new SA; the persisted high-water mark (plus
    /// any HA jump) for an SA recovered after a restart or takeover.
    pub first_seq: u64,
    /// Sequence-number lease, if numbers must be persisted before use.
    pub lease: Option<SeqLease>,
}

impl Default for OutboundOptions {
    fn default() -> Self {
        OutboundOptions {
            first_seq: 1,
            lease: None,
        }
    }
}

/// An outbound SA: encrypts inner packets into ESP packets.
pub struct EncryptSa {
    spi: u32,
    transform: Transform,
    esn: bool,
    crypto: EspCrypto,
    seq: OutboundSeq,
    lifetime: Lifetime,
    counters: Counters,
}

impl std::fmt::Debug for EncryptSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptSa")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("transform", &self.transform.name())
            .field("esn", &self.esn)
            .field("next_seq", &self.seq.next())
            .field("counters", &self.counters)
            .finish()
    }
}

impl EncryptSa {
    /// Prepare the crypto contexts; `now` starts the time lifetimes.
    pub fn new(
        cfg: &SaConfig,
        keys: SaKeys<'_>,
        opts: OutboundOptions,
        now: Instant,
    ) -> Result<Self> {
        Ok(EncryptSa {
            spi: cfg.spi,
            transform: cfg.transform,
            esn: cfg.esn,
            crypto: EspCrypto::new(cfg, keys, true)?,
            seq: OutboundSeq::new(opts.first_seq, cfg.esn, opts.lease)?,
            lifetime: Lifetime::new(cfg.lifetime, now),
            counters: Counters::default(),
        })
    }

    /// Encrypt the IPv4 or IPv6 packet `inner` into `out` as an ESP packet (header to ICV,
    /// no outer IP or UDP header); returns its length, `transform().esp_len(inner.len())`.
    ///
    /// Nothing is consumed on [`EspError::BufferTooSmall`] or [`EspError::NotIp`]; on
    /// [`EspError::SeqExhausted`], [`EspError::LeaseExhausted`] and [`EspError::Expired`] the
    /// packet must be dropped (and, for the lease, the pending mark persisted).
    pub fn encapsulate(&mut self, inner: &[u8], out: &mut [u8]) -> Result<usize> {
        // Checks that consume nothing come first.
        next_header_for(inner)?;
        if inner.len() > MAX_PACKET_LEN {
            return Err(EspError::NotIp);
        }
        if out.len() < self.transform.esp_len(inner.len()) {
            return Err(EspError::BufferTooSmall);
        }
        if !self.lifetime.volume_ok(&self.counters) {
            return Err(EspError::Expired);
        }
        let seq = self.seq.take()?;
        let n = self.crypto.seal(seq, inner, out)?;
        self.counters.packets += 1;
        self.counters.bytes += inner.len() as u64;
        Ok(n)
    }

    /// Seal an already padded payload (data, padding, Pad Length, Next Header) with a given
    /// sequence number and IV, bypassing the counter: for known-answer tests and fuzzing.
    #[doc(hidden)]
    pub fn seal_payload(
        &mut self,
        seq: u64,
        iv: &[u8],
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize> {
        self.crypto.seal_payload(seq, iv, payload, out)
    }

    /// This SA's SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// This SA's transform.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// Whether ESN is in use.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// Next sequence number to be sent (what HA syncs and `diagnose` prints as `seqno`).
    pub fn next_seq(&self) -> u64 {
        self.seq.next()
    }

    /// Packets and inner bytes sent.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// When this SA was installed (the `now` given to [`EncryptSa::new`]).
    pub fn created(&self) -> Instant {
        self.lifetime.created()
    }

    /// Its lifetime limits.
    pub fn lifetime_config(&self) -> &LifetimeConfig {
        self.lifetime.config()
    }

    /// Lifetime events (each reported once): soft = rekey now, hard = remove the SA. Also
    /// reports `Soft(SeqSpace)` well before the sequence space runs out and `Hard(SeqSpace)`
    /// when it has. Call after each batch and when [`EncryptSa::next_timeout`] passes.
    pub fn poll_event(&mut self, now: Instant) -> Option<LifetimeEvent> {
        self.lifetime.poll(&self.counters, now, self.seq.state())
    }

    /// When the next time-based lifetime event is due.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.lifetime.next_deadline()
    }

    /// With a lease: the high-water mark to persist (or sync) now, if one is due. Keep
    /// returning it until [`EncryptSa::seq_lease_persisted`] confirms it.
    pub fn poll_seq_lease(&mut self) -> Option<u64> {
        let next = self.seq.next();
        self.seq.lease_mut().and_then(|l| l.poll_persist(next))
    }

    /// With a lease: `hw` has been stored durably.
    pub fn seq_lease_persisted(&mut self, hw: u64) {
        if let Some(l) = self.seq.lease_mut() {
            l.persisted(hw);
        }
    }

    /// The lease, if any.
    pub fn seq_lease(&self) -> Option<&SeqLease> {
        self.seq.lease()
    }
}

/// The result of a successful [`DecryptSa::decapsulate`]: the inner packet is `out[..len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decapsulated {
    /// Length of the inner packet at the start of the output buffer (0 for a dummy packet).
    pub len: usize,
    /// 4 (IPv4), 41 (IPv6) or 59 (dummy packet: discard, RFC 4303 §2.6).
    pub next_header: u8,
    /// Full (ESN-inferred) sequence number.
    pub seq: u64,
}

impl Decapsulated {
    /// A TFC dummy packet (Next Header 59): authenticated, counted, not to be forwarded.
    pub fn is_dummy(&self) -> bool {
        self.next_header == NEXT_HEADER_NONE
    }
}

/// An inbound SA: checks, decrypts and validates ESP packets.
pub struct DecryptSa {
    spi: u32,
    transform: Transform,
    esn: bool,
    crypto: EspCrypto,
    window: ReplayWindow,
    lifetime: Lifetime,
    counters: Counters,
    drops: [u64; DropReason::ALL.len()],
}

impl std::fmt::Debug for DecryptSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptSa")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("transform", &self.transform.name())
            .field("esn", &self.esn)
            .field("replay_top", &self.window.top())
            .field("counters", &self.counters)
            .finish()
    }
}

impl DecryptSa {
    /// Prepare the crypto contexts and a replay window of `replay_window` packets
    /// ([`crate::DEFAULT_WINDOW`] = 2048; 0 disables replay checking).
    pub fn new(cfg: &SaConfig, keys: SaKeys<'_>, replay_window: u32, now: Instant) -> Result<Self> {
        Ok(DecryptSa {
            spi: cfg.spi,
            transform: cfg.transform,
            esn: cfg.esn,
            crypto: EspCrypto::new(cfg, keys, false)?,
            window: ReplayWindow::new(replay_window, cfg.esn)?,
            lifetime: Lifetime::new(cfg.lifetime, now),
            counters: Counters::default(),
            drops: [0; DropReason::ALL.len()],
        })
    }

    /// Check, decrypt and validate the ESP packet `esp` (header to ICV) into `out`, which
    /// needs room for the ciphertext (`esp.len()` is always enough). The order is RFC 4303
    /// §3.4: length, replay check, ICV, window update, then padding, Next Header and the
    /// inner header. Every error is also counted in [`DecryptSa::drops`]. On error `out`
    /// holds garbage.
    pub fn decapsulate(&mut self, esp: &[u8], out: &mut [u8]) -> Result<Decapsulated> {
        let r = self.decapsulate_counted(esp, out);
        if let Err(e) = r {
            if let Some(d) = self.drops.get_mut(e.drop_reason().index()) {
                *d += 1;
            }
        }
        r
    }

    fn decapsulate_counted(&mut self, esp: &[u8], out: &mut [u8]) -> Result<Decapsulated> {
        let (len, seq) = self.open_raw(esp, out)?;
        let payload = out.get(..len).ok_or(EspError::Crypto)?;
        let (len, next_header) = decode_payload(payload)?;
        self.counters.packets += 1;
        self.counters.bytes += len as u64;
        Ok(Decapsulated {
            len,
            next_header,
            seq,
        })
    }

    /// Header, replay and ICV checks and decryption, without the trailer and inner checks:
    /// returns the decrypted payload length (data, padding, Pad Length, Next Header) at
    /// `out[..len]` and the full sequence number. For known-answer tests and fuzzing.
    #[doc(hidden)]
    pub fn open_raw(&mut self, esp: &[u8], out: &mut [u8]) -> Result<(usize, u64)> {
        let hdr = self.crypto.check_shape(esp)?;
        if !self.lifetime.volume_ok(&self.counters) {
            return Err(EspError::Expired);
        }
        // RFC 4303 §3.4.3: the replay check comes before the ICV check...
        let seq = self.window.check(hdr.seq)?;
        let len = self.crypto.open(esp, seq, out)?;
        // ... and the window moves only for authenticated packets.
        if !self.window.accept(seq) {
            return Err(EspError::Replay);
        }
        Ok((len, seq))
    }

    /// This SA's SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// This SA's transform.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// Whether ESN is in use.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// The replay window (size and highest sequence number received).
    pub fn replay_window(&self) -> &ReplayWindow {
        &self.window
    }

    /// After a restart or takeover: treat everything up to `top` as received.
    pub fn restore_replay(&mut self, top: u64) {
        self.window.restore(top);
    }

    /// Packets and inner bytes received and accepted (dummy packets count as packets).
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Packets dropped for `reason` by this SA.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// When this SA was installed.
    pub fn created(&self) -> Instant {
        self.lifetime.created()
    }

    /// Its lifetime limits.
    pub fn lifetime_config(&self) -> &LifetimeConfig {
        self.lifetime.config()
    }

    /// Lifetime events, each reported once (see [`EncryptSa::poll_event`]).
    pub fn poll_event(&mut self, now: Instant) -> Option<LifetimeEvent> {
        self.lifetime.poll(&self.counters, now, (false, false))
    }

    /// When the next time-based lifetime event is due.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.lifetime.next_deadline()
    }
}

#[cfg(test)]
#[path = "sa_tests.rs"]
mod tests;
