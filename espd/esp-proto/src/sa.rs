//! Outbound ([`EncryptSa`]) and inbound ([`DecryptSa`]) ESP SAs in tunnel mode (RFC 4303).

use crate::crypto::{Aead, Cbc, Hmac, AES_BLOCK, MAX_DIGEST};
use crate::error::{DropReason, EspError, Result};
use crate::inner::{next_header_for, validate_inner};
use crate::lifetime::{Counters, Lifetime, LifetimeConfig, LifetimeEvent};
use crate::replay::ReplayWindow;
use crate::seq::{OutboundSeq, SeqLease};
use crate::transform::{Transform, AEAD_ICV_LEN};
use crate::wire::{EspHeader, ESP_HEADER_LEN, ESP_TRAILER_LEN, MAX_PACKET_LEN, NEXT_HEADER_NONE};
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

enum SealCtx {
    Aead(Aead),
    // Boxed: the two SHA-512 states are large and SAs are stored in tables.
    Cbc { cbc: Cbc, hmac: Box<Hmac> },
}

fn check_config(cfg: &SaConfig, keys: &SaKeys<'_>) -> Result<()> {
    if cfg.spi == 0 {
        return Err(EspError::Config("SPI 0 is reserved"));
    }
    if keys.enc.len() != cfg.transform.enc_keymat_len() {
        return Err(EspError::Config("encryption key length"));
    }
    if keys.integ.len() != cfg.transform.integ_keymat_len() {
        return Err(EspError::Config("integrity key length"));
    }
    Ok(())
}

fn make_crypto(cfg: &SaConfig, keys: &SaKeys<'_>, encrypt: bool) -> Result<SealCtx> {
    let enc = cfg.transform.encryption();
    Ok(match cfg.transform.integrity() {
        None => SealCtx::Aead(Aead::new(enc, keys.enc, encrypt)?),
        Some(integ) => SealCtx::Cbc {
            cbc: Cbc::new(enc, keys.enc, encrypt)?,
            hmac: Box::new(Hmac::new(integ, keys.integ)?),
        },
    })
}

/// AEAD additional data: SPI || seq (RFC 4106 §5, RFC 7634 §2.1), or with ESN
/// SPI || seq high || seq low.
fn aead_aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        a[4..].copy_from_slice(&seq.to_be_bytes());
        (a, 12)
    } else {
        a[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 8)
    }
}

/// An outbound SA: encrypts inner packets into ESP packets.
pub struct EncryptSa {
    spi: u32,
    transform: Transform,
    esn: bool,
    crypto: SealCtx,
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
        check_config(cfg, &keys)?;
        Ok(EncryptSa {
            spi: cfg.spi,
            transform: cfg.transform,
            esn: cfg.esn,
            crypto: make_crypto(cfg, &keys, true)?,
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
        let next_header = next_header_for(inner)?;
        if inner.len() > MAX_PACKET_LEN {
            return Err(EspError::NotIp);
        }
        let t = self.transform;
        let align = t.encryption().align();
        let body = (inner.len() + ESP_TRAILER_LEN).div_ceil(align) * align;
        let hdr_iv = ESP_HEADER_LEN + t.iv_len();
        let total = hdr_iv + body + t.icv_len();
        let out = out.get_mut(..total).ok_or(EspError::BufferTooSmall)?;
        if !self.lifetime.volume_ok(&self.counters) {
            return Err(EspError::Expired);
        }
        let seq = self.seq.take()?;

        // Payload, then padding 1, 2, 3, ... (RFC 4303 §2.4), Pad Length, Next Header.
        // Indexing: out.len() == total == hdr_iv + body + icv and body >= inner.len() + 2.
        let pad_len = body - inner.len() - ESP_TRAILER_LEN;
        let payload = &mut out[hdr_iv..hdr_iv + body];
        let (data, trailer) = payload.split_at_mut(inner.len());
        data.copy_from_slice(inner);
        for (i, b) in trailer[..pad_len].iter_mut().enumerate() {
            *b = (i + 1) as u8;
        }
        trailer[pad_len] = pad_len as u8;
        trailer[pad_len + 1] = next_header;

        let mut iv = [0u8; AES_BLOCK];
        let iv_len = t.iv_len();
        if t.encryption().is_aead() {
            // RFC 4106 §3.1 / RFC 7634 §2: the IV must never repeat under one key; the
            // sequence number never does (OutboundSeq does not cycle).
            iv[..8].copy_from_slice(&seq.to_be_bytes());
        } else {
            // RFC 3602 §2.1: CBC IVs must be unpredictable.
            openssl::rand::rand_bytes(&mut iv).map_err(|_| EspError::Crypto)?;
        }
        self.seal_in_place(seq, &iv[..iv_len], out, body)?;
        self.counters.packets += 1;
        self.counters.bytes += inner.len() as u64;
        Ok(total)
    }

    /// Write header and IV, encrypt `out[hdr_iv..hdr_iv + body]` in place and append the ICV.
    fn seal_in_place(&mut self, seq: u64, iv: &[u8], out: &mut [u8], body: usize) -> Result<usize> {
        let t = self.transform;
        let hdr_iv = ESP_HEADER_LEN + t.iv_len();
        let total = hdr_iv + body + t.icv_len();
        if iv.len() != t.iv_len() {
            return Err(EspError::Config("IV length"));
        }
        let out = out.get_mut(..total).ok_or(EspError::BufferTooSmall)?;
        let (head, rest) = out.split_at_mut(hdr_iv);
        let (payload, icv) = rest.split_at_mut(body);
        head[..4].copy_from_slice(&self.spi.to_be_bytes());
        head[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        head[8..].copy_from_slice(iv);
        match &mut self.crypto {
            SealCtx::Aead(aead) => {
                let mut iv8 = [0u8; 8];
                iv8.copy_from_slice(iv);
                let (aad, aad_len) = aead_aad(self.spi, seq, self.esn);
                let tag = aead.seal(&iv8, &aad[..aad_len], payload)?;
                icv.copy_from_slice(&tag);
            }
            SealCtx::Cbc { cbc, hmac } => {
                if body % AES_BLOCK != 0 {
                    return Err(EspError::Config("CBC payload not block aligned"));
                }
                let mut iv16 = [0u8; AES_BLOCK];
                iv16.copy_from_slice(iv);
                cbc.encrypt(&iv16, payload)?;
                // ICV over SPI, Sequence Number, IV and ciphertext; with ESN the high 32 bits
                // are appended for the computation only (RFC 4303 §2.2.1, §3.3.2.1).
                let hi = ((seq >> 32) as u32).to_be_bytes();
                let esn_part: &[u8] = if self.esn { &hi } else { &[] };
                let mut d = [0u8; MAX_DIGEST];
                hmac.mac(&[head, payload, esn_part], &mut d);
                icv.copy_from_slice(&d[..hmac.icv_len()]);
            }
        }
        Ok(total)
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
        let hdr_iv = ESP_HEADER_LEN + self.transform.iv_len();
        let dst = out
            .get_mut(hdr_iv..hdr_iv + payload.len())
            .ok_or(EspError::BufferTooSmall)?;
        dst.copy_from_slice(payload);
        self.seal_in_place(seq, iv, out, payload.len())
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
    crypto: SealCtx,
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
        check_config(cfg, &keys)?;
        Ok(DecryptSa {
            spi: cfg.spi,
            transform: cfg.transform,
            esn: cfg.esn,
            crypto: make_crypto(cfg, &keys, false)?,
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
        // Trailer (RFC 4303 §2.4-2.6): ... padding, Pad Length, Next Header.
        let (&next_header, rest) = payload.split_last().ok_or(EspError::Truncated)?;
        let (&pad_len, rest) = rest.split_last().ok_or(EspError::Truncated)?;
        let pad_len = usize::from(pad_len);
        let data_len = rest.len().checked_sub(pad_len).ok_or(EspError::Padding)?;
        let (data, pad) = rest.split_at(data_len);
        // RFC 4303 §2.4: padding bytes are 1, 2, 3, ...; the receiver checks them.
        if !pad
            .iter()
            .enumerate()
            .all(|(i, &b)| usize::from(b) == i + 1)
        {
            return Err(EspError::Padding);
        }
        if next_header == NEXT_HEADER_NONE {
            self.counters.packets += 1;
            return Ok(Decapsulated {
                len: 0,
                next_header,
                seq,
            });
        }
        validate_inner(next_header, data)?;
        self.counters.packets += 1;
        self.counters.bytes += data_len as u64;
        Ok(Decapsulated {
            len: data_len,
            next_header,
            seq,
        })
    }

    /// Header, replay and ICV checks and decryption, without the trailer and inner checks:
    /// returns the decrypted payload length (data, padding, Pad Length, Next Header) at
    /// `out[..len]` and the full sequence number. For known-answer tests and fuzzing.
    #[doc(hidden)]
    pub fn open_raw(&mut self, esp: &[u8], out: &mut [u8]) -> Result<(usize, u64)> {
        let t = self.transform;
        let iv_len = t.iv_len();
        let icv_len = t.icv_len();
        let hdr = EspHeader::peek(esp).ok_or(EspError::Truncated)?;
        if esp.len() > MAX_PACKET_LEN {
            return Err(EspError::Truncated); // malformed: no IP packet carries this much
        }
        if hdr.spi != self.spi {
            return Err(EspError::SpiMismatch);
        }
        let hdr_iv = ESP_HEADER_LEN + iv_len;
        let min_payload = if t.encryption().is_aead() {
            ESP_TRAILER_LEN
        } else {
            AES_BLOCK
        };
        if esp.len() < hdr_iv + min_payload + icv_len {
            return Err(EspError::Truncated);
        }
        let ct_len = esp.len() - hdr_iv - icv_len;
        if !t.encryption().is_aead() && ct_len % AES_BLOCK != 0 {
            return Err(EspError::Truncated);
        }
        if !self.lifetime.volume_ok(&self.counters) {
            return Err(EspError::Expired);
        }
        // RFC 4303 §3.4.3: the replay check comes before the ICV check.
        let seq = self.window.check(hdr.seq)?;
        let out = out.get_mut(..ct_len).ok_or(EspError::BufferTooSmall)?;
        // Indexing: esp.len() == hdr_iv + ct_len + icv_len, checked above.
        let (authenticated, icv) = esp.split_at(hdr_iv + ct_len);
        let iv = &authenticated[ESP_HEADER_LEN..hdr_iv];
        let ct = &authenticated[hdr_iv..];
        match &mut self.crypto {
            SealCtx::Aead(aead) => {
                let mut iv8 = [0u8; 8];
                iv8.copy_from_slice(iv);
                let mut tag = [0u8; AEAD_ICV_LEN];
                tag.copy_from_slice(icv);
                let (aad, aad_len) = aead_aad(self.spi, seq, self.esn);
                aead.open(&iv8, &aad[..aad_len], ct, &tag, out)?;
            }
            SealCtx::Cbc { cbc, hmac } => {
                let hi = ((seq >> 32) as u32).to_be_bytes();
                let esn_part: &[u8] = if self.esn { &hi } else { &[] };
                let mut d = [0u8; MAX_DIGEST];
                hmac.mac(&[authenticated, esn_part], &mut d);
                // Constant time; both sides are icv_len bytes.
                if !openssl::memcmp::eq(&d[..icv_len], icv) {
                    return Err(EspError::Auth);
                }
                let mut iv16 = [0u8; AES_BLOCK];
                iv16.copy_from_slice(iv);
                cbc.decrypt(&iv16, ct, out)?;
            }
        }
        // RFC 4303 §3.4.3: the window moves only for authenticated packets.
        if !self.window.accept(seq) {
            return Err(EspError::Replay);
        }
        Ok((ct_len, seq))
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
