//! The per-packet ESP transform of one SA direction, without sequence-number, replay or
//! lifetime state: [`EspCrypto`]. [`crate::EncryptSa`] and [`crate::DecryptSa`] wrap it for a
//! single thread; a datapath that spreads one SA over several worker threads gives each
//! thread its own `EspCrypto` (crypto contexts are per thread, RFC-wise nothing is shared)
//! and shares the sequence counter ([`crate::AtomicSeq`]) and the replay window
//! ([`crate::ReplayWindow`] behind a lock, held only for `check` and `accept`).

use crate::crypto::{Aead, Cbc, Hmac, AES_BLOCK, MAX_DIGEST};
use crate::error::{EspError, Result};
use crate::inner::{next_header_for, validate_inner};
use crate::sa::{SaConfig, SaKeys};
use crate::transform::{Transform, AEAD_ICV_LEN};
use crate::wire::{EspHeader, ESP_HEADER_LEN, ESP_TRAILER_LEN, MAX_PACKET_LEN, NEXT_HEADER_NONE};

enum SealCtx {
    Aead(Aead),
    // Boxed: the two SHA-512 states are large and SAs are stored in tables.
    Cbc { cbc: Cbc, hmac: Box<Hmac> },
}

/// Crypto contexts of one SA in one direction, keyed once.
pub struct EspCrypto {
    spi: u32,
    transform: Transform,
    esn: bool,
    encrypt: bool,
    ctx: SealCtx,
}

impl std::fmt::Debug for EspCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspCrypto")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("transform", &self.transform.name())
            .field("esn", &self.esn)
            .field("encrypt", &self.encrypt)
            .finish()
    }
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

impl EspCrypto {
    /// Contexts for sending (`encrypt`) or receiving.
    pub fn new(cfg: &SaConfig, keys: SaKeys<'_>, encrypt: bool) -> Result<Self> {
        if cfg.spi == 0 {
            return Err(EspError::Config("SPI 0 is reserved"));
        }
        if keys.enc.len() != cfg.transform.enc_keymat_len() {
            return Err(EspError::Config("encryption key length"));
        }
        if keys.integ.len() != cfg.transform.integ_keymat_len() {
            return Err(EspError::Config("integrity key length"));
        }
        let enc = cfg.transform.encryption();
        let ctx = match cfg.transform.integrity() {
            None => SealCtx::Aead(Aead::new(enc, keys.enc, encrypt)?),
            Some(integ) => SealCtx::Cbc {
                cbc: Cbc::new(enc, keys.enc, encrypt)?,
                hmac: Box::new(Hmac::new(integ, keys.integ)?),
            },
        };
        Ok(EspCrypto {
            spi: cfg.spi,
            transform: cfg.transform,
            esn: cfg.esn,
            encrypt,
            ctx,
        })
    }

    /// SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Transform.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// Whether ESN is in use.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// Encrypt the IPv4/IPv6 packet `inner` as ESP packet number `seq` into `out` (header to
    /// ICV): padding 1, 2, 3, ... (RFC 4303 §2.4), Next Header 4 or 41. Returns the length,
    /// `transform().esp_len(inner.len())`. `seq` must come from a counter that never repeats
    /// it ([`crate::AtomicSeq`] or [`crate::EncryptSa`]'s): the AEAD IVs are derived from it.
    pub fn seal(&mut self, seq: u64, inner: &[u8], out: &mut [u8]) -> Result<usize> {
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

        // Payload, then padding 1, 2, 3, ..., Pad Length, Next Header.
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
        if t.encryption().is_aead() {
            // RFC 4106 §3.1 / RFC 7634 §2: the IV must never repeat under one key; the
            // sequence number never does.
            iv[..8].copy_from_slice(&seq.to_be_bytes());
        } else {
            // RFC 3602 §2.1: CBC IVs must be unpredictable.
            openssl::rand::rand_bytes(&mut iv).map_err(|_| EspError::Crypto)?;
        }
        self.seal_in_place(seq, &iv[..t.iv_len()], out, body)
    }

    /// Seal an already padded payload (data, padding, Pad Length, Next Header) with a given
    /// sequence number and IV: for known-answer tests and fuzzing.
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

    /// Write header and IV, encrypt `out[hdr_iv..hdr_iv + body]` in place, append the ICV.
    fn seal_in_place(&mut self, seq: u64, iv: &[u8], out: &mut [u8], body: usize) -> Result<usize> {
        if !self.encrypt {
            return Err(EspError::Config("sealing with an inbound SA"));
        }
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
        match &mut self.ctx {
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

    /// The length checks that come before the replay check (RFC 4303 §3.4.1-3.4.2): SPI,
    /// minimal and maximal size, CBC block alignment. Returns the header.
    pub fn check_shape(&self, esp: &[u8]) -> Result<EspHeader> {
        let t = self.transform;
        let hdr = EspHeader::peek(esp).ok_or(EspError::Truncated)?;
        if esp.len() > MAX_PACKET_LEN {
            return Err(EspError::Truncated); // malformed: no IP packet carries this much
        }
        if hdr.spi != self.spi {
            return Err(EspError::SpiMismatch);
        }
        let hdr_iv = ESP_HEADER_LEN + t.iv_len();
        let min_payload = if t.encryption().is_aead() {
            ESP_TRAILER_LEN
        } else {
            AES_BLOCK
        };
        if esp.len() < hdr_iv + min_payload + t.icv_len() {
            return Err(EspError::Truncated);
        }
        let ct_len = esp.len() - hdr_iv - t.icv_len();
        if !t.encryption().is_aead() && ct_len % AES_BLOCK != 0 {
            return Err(EspError::Truncated);
        }
        Ok(hdr)
    }

    /// Verify the ICV of `esp` for the full sequence number `seq` (from
    /// [`crate::ReplayWindow::check`]) and decrypt its payload into `out`. Returns the
    /// payload length (data, padding, Pad Length, Next Header) at `out[..len]`; pass that to
    /// [`decode_payload`]. On error `out` holds garbage.
    pub fn open(&mut self, esp: &[u8], seq: u64, out: &mut [u8]) -> Result<usize> {
        if self.encrypt {
            return Err(EspError::Config("opening with an outbound SA"));
        }
        self.check_shape(esp)?;
        let t = self.transform;
        let icv_len = t.icv_len();
        let hdr_iv = ESP_HEADER_LEN + t.iv_len();
        let ct_len = esp.len() - hdr_iv - icv_len; // check_shape: esp.len() >= hdr_iv + icv_len
        let out = out.get_mut(..ct_len).ok_or(EspError::BufferTooSmall)?;
        let (authenticated, icv) = esp.split_at(hdr_iv + ct_len);
        // Indexing: authenticated.len() == hdr_iv + ct_len.
        let iv = &authenticated[ESP_HEADER_LEN..hdr_iv];
        let ct = &authenticated[hdr_iv..];
        match &mut self.ctx {
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
        Ok(ct_len)
    }
}

/// Check a decrypted payload: padding 1, 2, 3, ... (RFC 4303 §2.4), Next Header 4 / 41 /
/// 59 (§2.6) and the inner header (see [`crate::inner::validate_inner`]). Returns
/// (inner length, Next Header); the inner packet is `payload[..len]`, and a dummy packet
/// (59) has length 0.
pub fn decode_payload(payload: &[u8]) -> Result<(usize, u8)> {
    let (&next_header, rest) = payload.split_last().ok_or(EspError::Truncated)?;
    let (&pad_len, rest) = rest.split_last().ok_or(EspError::Truncated)?;
    let pad_len = usize::from(pad_len);
    let data_len = rest.len().checked_sub(pad_len).ok_or(EspError::Padding)?;
    let (data, pad) = rest.split_at(data_len);
    if !pad
        .iter()
        .enumerate()
        .all(|(i, &b)| usize::from(b) == i + 1)
    {
        return Err(EspError::Padding);
    }
    if next_header == NEXT_HEADER_NONE {
        return Ok((0, next_header));
    }
    validate_inner(next_header, data)?;
    Ok((data_len, next_header))
}
