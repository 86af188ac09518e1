//! Cryptographic primitives of IKEv2, all through openssl: PRFs and prf+
//! (RFC 7296 §2.13), SKEYSEED and the IKE SA keys (§2.14), CHILD SA keying
//! material (§2.17), Diffie-Hellman (MODP RFC 3526/2409, ECP RFC 5903,
//! Curve25519 RFC 8031) with peer public value validation, and protection
//! of the SK payload (§3.14 with AES-CBC + HMAC, RFC 5282 AES-GCM, RFC 7634
//! ChaCha20-Poly1305).

use crate::wire::{DhGroup, EncrId, Header, IntegId, PayloadType, PrfId, GENERIC_HEADER_LEN};
use openssl::bn::{BigNum, BigNumContext, MsbOption};
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcGroupRef, EcKey, EcPoint, PointConversionForm};
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::symm::{Cipher, Crypter, Mode};

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The peer's public value is malformed or weak.
    #[error("invalid peer public value: {0}")]
    InvalidPublicValue(&'static str),
    /// Integrity check (ICV or AEAD tag) failed.
    #[error("integrity check failed")]
    IntegrityCheckFailed,
    /// The encrypted payload has an impossible layout.
    #[error("malformed encrypted payload: {0}")]
    Malformed(&'static str),
    /// Algorithm not implemented.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// openssl failed (internal).
    #[error("openssl: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

type Result<T> = std::result::Result<T, CryptoError>;

/// Secret bytes: `Debug` prints only the length, dropping overwrites them.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps bytes.
    pub fn new(v: Vec<u8>) -> Self {
        Secret(v)
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Length in octets.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret(v)
    }
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Secret(<{} octets redacted>)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            *b = 0;
        }
        std::hint::black_box(&self.0);
    }
}

/// Pseudo-random function, RFC 7296 §3.3.2 type 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prf {
    /// PRF_HMAC_SHA1 (RFC 2104).
    HmacSha1,
    /// PRF_HMAC_SHA2_256 (RFC 4868).
    HmacSha256,
    /// PRF_HMAC_SHA2_384 (RFC 4868).
    HmacSha384,
    /// PRF_HMAC_SHA2_512 (RFC 4868).
    HmacSha512,
}

impl Prf {
    /// From a transform ID.
    pub fn from_id(id: PrfId) -> Option<Prf> {
        Some(match id {
            PrfId::HMAC_SHA1 => Prf::HmacSha1,
            PrfId::HMAC_SHA2_256 => Prf::HmacSha256,
            PrfId::HMAC_SHA2_384 => Prf::HmacSha384,
            PrfId::HMAC_SHA2_512 => Prf::HmacSha512,
            _ => return None,
        })
    }
    /// Transform ID.
    pub fn id(self) -> PrfId {
        match self {
            Prf::HmacSha1 => PrfId::HMAC_SHA1,
            Prf::HmacSha256 => PrfId::HMAC_SHA2_256,
            Prf::HmacSha384 => PrfId::HMAC_SHA2_384,
            Prf::HmacSha512 => PrfId::HMAC_SHA2_512,
        }
    }
    fn md(self) -> Md {
        match self {
            Prf::HmacSha1 => Md::Sha1,
            Prf::HmacSha256 => Md::Sha256,
            Prf::HmacSha384 => Md::Sha384,
            Prf::HmacSha512 => Md::Sha512,
        }
    }
    /// Output length, which is also the preferred key length (§2.14).
    pub fn output_len(self) -> usize {
        match self {
            Prf::HmacSha1 => 20,
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
            Prf::HmacSha512 => 64,
        }
    }
    /// prf(key, data).
    pub fn prf(self, key: &[u8], data: &[u8]) -> Result<Vec<u8>> {
        hmac(self.md(), key, &[data])
    }
    /// prf(key, a | b | ...), without building the concatenation.
    pub fn prf_parts(self, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
        hmac(self.md(), key, parts)
    }
    /// prf+ (§2.13): T1 | T2 | ... truncated to `len`, where
    /// Tn = prf(K, Tn-1 | S | n). At most 255 iterations.
    pub fn prf_plus(self, key: &[u8], seed: &[u8], len: usize) -> Result<Secret> {
        let mut out = Vec::with_capacity(len + self.output_len());
        let mut t: Vec<u8> = Vec::new();
        let mut n: u8 = 1;
        while out.len() < len {
            t = self.prf_parts(key, &[&t, seed, &[n]])?;
            out.extend_from_slice(&t);
            n = n.checked_add(1).ok_or(CryptoError::Unsupported(
                "prf+ output longer than 255 blocks",
            ))?;
        }
        out.truncate(len);
        Ok(Secret(out))
    }
}

/// The hash under an HMAC.
#[derive(Clone, Copy)]
enum Md {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

/// Largest hash block (SHA-384/512, FIPS 180-4 §1).
const MAX_BLOCK: usize = 128;

impl Md {
    /// Block length B of RFC 2104 §2.
    fn block_len(self) -> usize {
        match self {
            Md::Sha1 | Md::Sha256 => 64,
            Md::Sha384 | Md::Sha512 => MAX_BLOCK,
        }
    }
    fn hasher(self) -> Hash {
        match self {
            Md::Sha1 => Hash::Sha1(openssl::sha::Sha1::new()),
            Md::Sha256 => Hash::Sha256(openssl::sha::Sha256::new()),
            Md::Sha384 => Hash::Sha384(openssl::sha::Sha384::new()),
            Md::Sha512 => Hash::Sha512(openssl::sha::Sha512::new()),
        }
    }
}

/// openssl's direct SHA contexts: no algorithm fetch and no EVP_PKEY per use (an HMAC
/// through `PKey::hmac` + `Signer` cost more than the ECDH of a handshake).
enum Hash {
    Sha1(openssl::sha::Sha1),
    Sha256(openssl::sha::Sha256),
    Sha384(openssl::sha::Sha384),
    Sha512(openssl::sha::Sha512),
}

impl Hash {
    fn update(&mut self, d: &[u8]) {
        match self {
            Hash::Sha1(h) => h.update(d),
            Hash::Sha256(h) => h.update(d),
            Hash::Sha384(h) => h.update(d),
            Hash::Sha512(h) => h.update(d),
        }
    }
    fn finish(self) -> Vec<u8> {
        match self {
            Hash::Sha1(h) => h.finish().to_vec(),
            Hash::Sha256(h) => h.finish().to_vec(),
            Hash::Sha384(h) => h.finish().to_vec(),
            Hash::Sha512(h) => h.finish().to_vec(),
        }
    }
}

/// HMAC (RFC 2104 §2): H(K ^ opad | H(K ^ ipad | text)), with a key longer than the
/// block hashed first; `text` is the concatenation of `parts`.
fn hmac(md: Md, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
    let b = md.block_len();
    let mut k = [0u8; MAX_BLOCK];
    let hashed;
    let key = if key.len() > b {
        let mut h = md.hasher();
        h.update(key);
        hashed = Secret(h.finish());
        hashed.as_bytes()
    } else {
        key
    };
    // key.len() <= b <= MAX_BLOCK here; zip stops at the shorter side anyway.
    for (d, s) in k.iter_mut().zip(key) {
        *d = *s;
    }
    let pad = |x: u8| {
        let mut p = [0u8; MAX_BLOCK];
        for (d, s) in p.iter_mut().zip(k.iter()) {
            *d = s ^ x;
        }
        p
    };
    let (mut ipad, mut opad) = (pad(0x36), pad(0x5c));
    let mut inner = md.hasher();
    inner.update(ipad.get(..b).unwrap_or(&ipad));
    for p in parts {
        inner.update(p);
    }
    let inner = inner.finish();
    let mut outer = md.hasher();
    outer.update(opad.get(..b).unwrap_or(&opad));
    outer.update(&inner);
    for x in k.iter_mut().chain(ipad.iter_mut()).chain(opad.iter_mut()) {
        *x = 0;
    }
    std::hint::black_box((&k, &ipad, &opad));
    Ok(outer.finish())
}

/// Integrity algorithm, RFC 7296 §3.3.2 type 3 (truncated HMACs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Integ {
    /// AUTH_HMAC_SHA1_96 (RFC 2404).
    HmacSha1_96,
    /// AUTH_HMAC_SHA2_256_128 (RFC 4868).
    HmacSha256_128,
    /// AUTH_HMAC_SHA2_384_192 (RFC 4868).
    HmacSha384_192,
    /// AUTH_HMAC_SHA2_512_256 (RFC 4868).
    HmacSha512_256,
}

impl Integ {
    /// From a transform ID.
    pub fn from_id(id: IntegId) -> Option<Integ> {
        Some(match id {
            IntegId::HMAC_SHA1_96 => Integ::HmacSha1_96,
            IntegId::HMAC_SHA2_256_128 => Integ::HmacSha256_128,
            IntegId::HMAC_SHA2_384_192 => Integ::HmacSha384_192,
            IntegId::HMAC_SHA2_512_256 => Integ::HmacSha512_256,
            _ => return None,
        })
    }
    /// Transform ID.
    pub fn id(self) -> IntegId {
        match self {
            Integ::HmacSha1_96 => IntegId::HMAC_SHA1_96,
            Integ::HmacSha256_128 => IntegId::HMAC_SHA2_256_128,
            Integ::HmacSha384_192 => IntegId::HMAC_SHA2_384_192,
            Integ::HmacSha512_256 => IntegId::HMAC_SHA2_512_256,
        }
    }
    fn md(self) -> Md {
        match self {
            Integ::HmacSha1_96 => Md::Sha1,
            Integ::HmacSha256_128 => Md::Sha256,
            Integ::HmacSha384_192 => Md::Sha384,
            Integ::HmacSha512_256 => Md::Sha512,
        }
    }
    /// Key length in octets.
    pub fn key_len(self) -> usize {
        match self {
            Integ::HmacSha1_96 => 20,
            Integ::HmacSha256_128 => 32,
            Integ::HmacSha384_192 => 48,
            Integ::HmacSha512_256 => 64,
        }
    }
    /// ICV length in octets.
    pub fn icv_len(self) -> usize {
        match self {
            Integ::HmacSha1_96 => 12,
            Integ::HmacSha256_128 => 16,
            Integ::HmacSha384_192 => 24,
            Integ::HmacSha512_256 => 32,
        }
    }
    /// Truncated MAC over `data`.
    pub fn mac(self, key: &[u8], data: &[u8]) -> Result<Vec<u8>> {
        let mut m = hmac(self.md(), key, &[data])?;
        m.truncate(self.icv_len());
        Ok(m)
    }
}

/// Encryption algorithm, RFC 7296 §3.3.2 type 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encr {
    /// ENCR_AES_CBC with a 128- or 256-bit key (RFC 3602); key length in octets.
    AesCbc(usize),
    /// ENCR_AES_GCM_16 (RFC 5282/4106), 16-octet ICV; key length in octets without salt.
    AesGcm16(usize),
    /// ENCR_CHACHA20_POLY1305 (RFC 7634).
    ChaCha20Poly1305,
}

/// AEAD salt length for GCM (RFC 5282 §7.1) and ChaCha20-Poly1305 (RFC 7634 §2).
pub const AEAD_SALT_LEN: usize = 4;
/// AEAD ICV length (16 for both AEADs here).
pub const AEAD_ICV_LEN: usize = 16;

impl Encr {
    /// From a transform ID and its Key Length attribute (bits).
    pub fn from_id(id: EncrId, key_bits: Option<u16>) -> Option<Encr> {
        match (id, key_bits) {
            (EncrId::AES_CBC, Some(128)) => Some(Encr::AesCbc(16)),
            (EncrId::AES_CBC, Some(256)) => Some(Encr::AesCbc(32)),
            (EncrId::AES_GCM_16, Some(128)) => Some(Encr::AesGcm16(16)),
            (EncrId::AES_GCM_16, Some(256)) => Some(Encr::AesGcm16(32)),
            (EncrId::CHACHA20_POLY1305, None) => Some(Encr::ChaCha20Poly1305),
            _ => None,
        }
    }
    /// Transform ID and Key Length attribute (bits).
    pub fn id(self) -> (EncrId, Option<u16>) {
        match self {
            Encr::AesCbc(k) => (EncrId::AES_CBC, Some(bits(k))),
            Encr::AesGcm16(k) => (EncrId::AES_GCM_16, Some(bits(k))),
            Encr::ChaCha20Poly1305 => (EncrId::CHACHA20_POLY1305, None),
        }
    }
    /// AEAD algorithms need no INTEG transform.
    pub fn is_aead(self) -> bool {
        !matches!(self, Encr::AesCbc(_))
    }
    /// Octets of keying material: cipher key plus AEAD salt.
    pub fn keymat_len(self) -> usize {
        match self {
            Encr::AesCbc(k) => k,
            Encr::AesGcm16(k) => k + AEAD_SALT_LEN,
            Encr::ChaCha20Poly1305 => 32 + AEAD_SALT_LEN,
        }
    }
    /// Length of the IV carried in the SK payload.
    pub fn iv_len(self) -> usize {
        match self {
            Encr::AesCbc(_) => 16,
            Encr::AesGcm16(_) | Encr::ChaCha20Poly1305 => 8,
        }
    }
    fn block(self) -> usize {
        match self {
            Encr::AesCbc(_) => 16,
            _ => 1,
        }
    }
    fn cipher(self) -> Result<Cipher> {
        Ok(match self {
            Encr::AesCbc(16) => Cipher::aes_128_cbc(),
            Encr::AesCbc(32) => Cipher::aes_256_cbc(),
            Encr::AesGcm16(16) => Cipher::aes_128_gcm(),
            Encr::AesGcm16(32) => Cipher::aes_256_gcm(),
            Encr::ChaCha20Poly1305 => Cipher::chacha20_poly1305(),
            _ => return Err(CryptoError::Unsupported("key length")),
        })
    }
}

fn bits(octets: usize) -> u16 {
    u16::try_from(octets * 8).unwrap_or(u16::MAX)
}

/// The seven IKE SA secrets of §2.14.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkeKeys {
    /// Used to derive CHILD SA keys.
    pub sk_d: Secret,
    /// Integrity key, initiator to responder (empty with AEAD).
    pub sk_ai: Secret,
    /// Integrity key, responder to initiator.
    pub sk_ar: Secret,
    /// Encryption key (plus salt), initiator to responder.
    pub sk_ei: Secret,
    /// Encryption key (plus salt), responder to initiator.
    pub sk_er: Secret,
    /// Used for the initiator's AUTH payload.
    pub sk_pi: Secret,
    /// Used for the responder's AUTH payload.
    pub sk_pr: Secret,
}

/// SKEYSEED = prf(Ni | Nr, g^ir) for a new IKE SA (§2.14).
pub fn skeyseed(prf: Prf, ni: &[u8], nr: &[u8], shared: &[u8]) -> Result<Secret> {
    let mut key = Vec::with_capacity(ni.len() + nr.len());
    key.extend_from_slice(ni);
    key.extend_from_slice(nr);
    Ok(Secret(prf.prf(&key, shared)?))
}

/// SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) for an IKE SA rekey (§2.18).
pub fn skeyseed_rekey(
    old_prf: Prf,
    old_sk_d: &[u8],
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
) -> Result<Secret> {
    Ok(Secret(old_prf.prf_parts(old_sk_d, &[shared, ni, nr])?))
}

/// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} =
/// prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) (§2.14).
#[allow(clippy::too_many_arguments)]
pub fn derive_ike_keys(
    prf: Prf,
    encr: Encr,
    integ: Option<Integ>,
    skeyseed: &Secret,
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> Result<IkeKeys> {
    let p = prf.output_len();
    let a = integ.map(Integ::key_len).unwrap_or(0);
    let e = encr.keymat_len();
    let mut seed = Vec::with_capacity(ni.len() + nr.len() + 16);
    seed.extend_from_slice(ni);
    seed.extend_from_slice(nr);
    seed.extend_from_slice(&spi_i.to_be_bytes());
    seed.extend_from_slice(&spi_r.to_be_bytes());
    let km = prf.prf_plus(skeyseed.as_bytes(), &seed, 3 * p + 2 * a + 2 * e)?;
    let mut cut = Cutter(km.as_bytes(), 0);
    Ok(IkeKeys {
        sk_d: cut.next(p),
        sk_ai: cut.next(a),
        sk_ar: cut.next(a),
        sk_ei: cut.next(e),
        sk_er: cut.next(e),
        sk_pi: cut.next(p),
        sk_pr: cut.next(p),
    })
}

/// Splits keying material in order; lengths were computed by the caller so
/// the material is always long enough (a short read yields fewer octets).
struct Cutter<'a>(&'a [u8], usize);
impl Cutter<'_> {
    fn next(&mut self, n: usize) -> Secret {
        let end = (self.1 + n).min(self.0.len());
        let s = self.0.get(self.1..end).unwrap_or(&[]).to_vec();
        self.1 = end;
        Secret(s)
    }
}

/// Keys of one CHILD SA in both directions (§2.17: initiator-to-responder
/// encryption then integrity, then responder-to-initiator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildKeys {
    /// Encryption key (+ salt for AEAD), initiator to responder.
    pub encr_i: Secret,
    /// Integrity key, initiator to responder (empty for AEAD).
    pub integ_i: Secret,
    /// Encryption key (+ salt), responder to initiator.
    pub encr_r: Secret,
    /// Integrity key, responder to initiator.
    pub integ_r: Secret,
}

/// KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17).
pub fn derive_child_keys(
    prf: Prf,
    sk_d: &[u8],
    shared: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    encr: Encr,
    integ: Option<Integ>,
) -> Result<ChildKeys> {
    let e = encr.keymat_len();
    let a = integ.map(Integ::key_len).unwrap_or(0);
    let mut seed = Vec::new();
    if let Some(s) = shared {
        seed.extend_from_slice(s);
    }
    seed.extend_from_slice(ni);
    seed.extend_from_slice(nr);
    let km = prf.prf_plus(sk_d, &seed, 2 * (e + a))?;
    let mut cut = Cutter(km.as_bytes(), 0);
    Ok(ChildKeys {
        encr_i: cut.next(e),
        integ_i: cut.next(a),
        encr_r: cut.next(e),
        integ_r: cut.next(a),
    })
}

/// One side's Diffie-Hellman state for a key exchange.
pub struct KeyExchange {
    group: DhGroup,
    inner: KexInner,
    public: Vec<u8>,
}

enum KexInner {
    Modp {
        p: BigNum,
        x: BigNum,
    },
    Ecp {
        group: &'static EcGroupRef,
        key: EcKey<Private>,
        coord: usize,
    },
    X25519(PKey<Private>),
}

impl core::fmt::Debug for KeyExchange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "KeyExchange({:?}, <private redacted>)", self.group)
    }
}

fn modp_prime(g: DhGroup) -> Result<BigNum> {
    Ok(match g {
        DhGroup::MODP1024 => BigNum::get_rfc2409_prime_1024()?,
        DhGroup::MODP1536 => BigNum::get_rfc3526_prime_1536()?,
        DhGroup::MODP2048 => BigNum::get_rfc3526_prime_2048()?,
        DhGroup::MODP3072 => BigNum::get_rfc3526_prime_3072()?,
        DhGroup::MODP4096 => BigNum::get_rfc3526_prime_4096()?,
        _ => return Err(CryptoError::Unsupported("DH group")),
    })
}

/// Test helper: the prime of a MODP group, big-endian.
#[cfg(test)]
pub(crate) fn tests_modp_prime(g: DhGroup) -> Option<Vec<u8>> {
    modp_prime(g).ok().map(|p| p.to_vec())
}

/// The curve of `nid`, built once per process (building an EC_GROUP cost about a tenth
/// of a handshake's CPU).
fn curve(nid: Nid) -> Result<&'static EcGroupRef> {
    use std::sync::OnceLock;
    static P256: OnceLock<EcGroup> = OnceLock::new();
    static P384: OnceLock<EcGroup> = OnceLock::new();
    static P521: OnceLock<EcGroup> = OnceLock::new();
    let cell = match nid {
        Nid::X9_62_PRIME256V1 => &P256,
        Nid::SECP384R1 => &P384,
        Nid::SECP521R1 => &P521,
        _ => return Err(CryptoError::Unsupported("curve")),
    };
    if let Some(g) = cell.get() {
        return Ok(g);
    }
    let g = EcGroup::from_curve_name(nid)?;
    Ok(cell.get_or_init(|| g))
}

fn ec_curve(g: DhGroup) -> Option<(Nid, usize)> {
    match g {
        DhGroup::ECP256 => Some((Nid::X9_62_PRIME256V1, 32)),
        DhGroup::ECP384 => Some((Nid::SECP384R1, 48)),
        DhGroup::ECP521 => Some((Nid::SECP521R1, 66)),
        _ => None,
    }
}

/// Groups this crate implements.
pub const SUPPORTED_GROUPS: [DhGroup; 9] = [
    DhGroup::MODP1024,
    DhGroup::MODP1536,
    DhGroup::MODP2048,
    DhGroup::MODP3072,
    DhGroup::MODP4096,
    DhGroup::ECP256,
    DhGroup::ECP384,
    DhGroup::ECP521,
    DhGroup::CURVE25519,
];

/// Length of the KE payload's public value for `group` (§3.4 and the group RFCs).
pub fn public_len(group: DhGroup) -> Option<usize> {
    Some(match group {
        DhGroup::MODP1024 => 128,
        DhGroup::MODP1536 => 192,
        DhGroup::MODP2048 => 256,
        DhGroup::MODP3072 => 384,
        DhGroup::MODP4096 => 512,
        DhGroup::ECP256 => 64,
        DhGroup::ECP384 => 96,
        DhGroup::ECP521 => 132,
        DhGroup::CURVE25519 => 32,
        _ => return None,
    })
}

impl KeyExchange {
    /// Generates a fresh key pair.
    pub fn generate(group: DhGroup) -> Result<KeyExchange> {
        if group == DhGroup::CURVE25519 {
            let k = PKey::generate_x25519()?;
            return Self::from_x25519(k);
        }
        if let Some((nid, coord)) = ec_curve(group) {
            let g = curve(nid)?;
            let key = EcKey::generate(g)?;
            return Self::from_ec(group, g, key, coord);
        }
        let p = modp_prime(group)?;
        let mut x = BigNum::new()?;
        // 512-bit exponents exceed twice the strength of every group here.
        x.rand(512, MsbOption::MAYBE_ZERO, false)?;
        Self::from_modp(group, p, x)
    }

    /// Builds a key pair from a known private value (for known-answer tests
    /// and for callers that bring their own randomness).
    pub fn from_private(group: DhGroup, private: &[u8]) -> Result<KeyExchange> {
        if group == DhGroup::CURVE25519 {
            let k = PKey::private_key_from_raw_bytes(private, Id::X25519)?;
            return Self::from_x25519(k);
        }
        if let Some((nid, coord)) = ec_curve(group) {
            let g = curve(nid)?;
            let d = BigNum::from_slice(private)?;
            let mut ctx = BigNumContext::new()?;
            let mut q = EcPoint::new(g)?;
            q.mul_generator2(g, &d, &mut ctx)?;
            let key = EcKey::from_private_components(g, &d, &q)?;
            return Self::from_ec(group, g, key, coord);
        }
        let p = modp_prime(group)?;
        Self::from_modp(group, p, BigNum::from_slice(private)?)
    }

    fn from_x25519(k: PKey<Private>) -> Result<KeyExchange> {
        let public = k.raw_public_key()?;
        Ok(KeyExchange {
            group: DhGroup::CURVE25519,
            inner: KexInner::X25519(k),
            public,
        })
    }

    fn from_ec(
        group: DhGroup,
        g: &'static EcGroupRef,
        key: EcKey<Private>,
        coord: usize,
    ) -> Result<Self> {
        let mut ctx = BigNumContext::new()?;
        let mut x = BigNum::new()?;
        let mut y = BigNum::new()?;
        key.public_key()
            .affine_coordinates(g, &mut x, &mut y, &mut ctx)?;
        let c = i32::try_from(coord).map_err(|_| CryptoError::Unsupported("curve"))?;
        let mut public = x.to_vec_padded(c)?;
        public.extend_from_slice(&y.to_vec_padded(c)?);
        Ok(KeyExchange {
            group,
            inner: KexInner::Ecp {
                group: g,
                key,
                coord,
            },
            public,
        })
    }

    fn from_modp(group: DhGroup, p: BigNum, x: BigNum) -> Result<Self> {
        let mut ctx = BigNumContext::new()?;
        let g = BigNum::from_u32(2)?;
        let mut y = BigNum::new()?;
        y.mod_exp(&g, &x, &p, &mut ctx)?;
        let plen = p.num_bytes();
        let public = y.to_vec_padded(plen)?;
        Ok(KeyExchange {
            group,
            inner: KexInner::Modp { p, x },
            public,
        })
    }

    /// The group.
    pub fn group(&self) -> DhGroup {
        self.group
    }

    /// Our public value as it goes in the KE payload.
    pub fn public_value(&self) -> &[u8] {
        &self.public
    }

    /// Validates the peer's public value and computes the shared secret g^ir.
    pub fn compute_shared(&self, peer: &[u8]) -> Result<Secret> {
        match &self.inner {
            KexInner::Modp { p, x } => {
                if peer.len() != p.num_bytes() as usize {
                    return Err(CryptoError::InvalidPublicValue("wrong length"));
                }
                let mut ctx = BigNumContext::new()?;
                let y = BigNum::from_slice(peer)?;
                let one = BigNum::from_u32(1)?;
                let mut pm1 = BigNum::new()?;
                pm1.checked_sub(p, &one)?;
                // RFC 6989 §2.1: 1 < y < p-1.
                if y <= one || y >= pm1 {
                    return Err(CryptoError::InvalidPublicValue(
                        "out of range (0, 1, p-1 or >= p)",
                    ));
                }
                // The primes are safe primes: y must lie in the subgroup of
                // order q = (p-1)/2, i.e. y^q = 1 mod p.
                let mut q = BigNum::new()?;
                q.rshift1(&pm1)?;
                let mut t = BigNum::new()?;
                t.mod_exp(&y, &q, p, &mut ctx)?;
                if t != one {
                    return Err(CryptoError::InvalidPublicValue(
                        "not in the prime-order subgroup",
                    ));
                }
                let mut z = BigNum::new()?;
                z.mod_exp(&y, x, p, &mut ctx)?;
                let plen = p.num_bytes();
                Ok(Secret(z.to_vec_padded(plen)?))
            }
            KexInner::Ecp { group, key, coord } => {
                if peer.len() != 2 * coord {
                    return Err(CryptoError::InvalidPublicValue("wrong length"));
                }
                let mut ctx = BigNumContext::new()?;
                let mut enc = Vec::with_capacity(1 + peer.len());
                enc.push(0x04);
                enc.extend_from_slice(peer);
                let pt = EcPoint::from_bytes(group, &enc, &mut ctx)
                    .map_err(|_| CryptoError::InvalidPublicValue("not on the curve"))?;
                if pt.is_infinity(group) || !pt.is_on_curve(group, &mut ctx)? {
                    return Err(CryptoError::InvalidPublicValue("not on the curve"));
                }
                let mut z = EcPoint::new(group)?;
                z.mul2(group, &pt, key.private_key(), &mut ctx)?;
                if z.is_infinity(group) {
                    return Err(CryptoError::InvalidPublicValue("shared point at infinity"));
                }
                // RFC 5903 §9: the shared secret is the x coordinate only.
                let bytes = z.to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)?;
                let x = bytes
                    .get(1..1 + coord)
                    .ok_or(CryptoError::Malformed("ec point"))?;
                Ok(Secret(x.to_vec()))
            }
            KexInner::X25519(k) => {
                if peer.len() != 32 {
                    return Err(CryptoError::InvalidPublicValue("wrong length"));
                }
                let pk = PKey::public_key_from_raw_bytes(peer, Id::X25519)?;
                let mut d = Deriver::new(k)?;
                d.set_peer(&pk)?;
                let z = d
                    .derive_to_vec()
                    .map_err(|_| CryptoError::InvalidPublicValue("low-order point"))?;
                // RFC 8031 §2.3: an all-zero result means a low-order point.
                if z.iter().all(|&b| b == 0) {
                    return Err(CryptoError::InvalidPublicValue("low-order point"));
                }
                Ok(Secret(z))
            }
        }
    }
}

/// Protection of the SK payload for one direction (§3.14).
#[derive(Clone, Debug)]
pub struct SkCipher {
    encr: Encr,
    integ: Option<Integ>,
    encr_key: Secret,
    integ_key: Secret,
}

impl SkCipher {
    /// Keys for one direction (e.g. SK_ei + SK_ai for messages the initiator sends).
    pub fn new(encr: Encr, integ: Option<Integ>, encr_key: Secret, integ_key: Secret) -> Self {
        SkCipher {
            encr,
            integ,
            encr_key,
            integ_key,
        }
    }

    fn icv_len(&self) -> usize {
        if self.encr.is_aead() {
            AEAD_ICV_LEN
        } else {
            self.integ.map(Integ::icv_len).unwrap_or(0)
        }
    }

    /// Builds a whole encrypted message: `header` (its length and
    /// next-payload are filled in), then an SK payload whose content is the
    /// encoded inner chain `inner` starting with `first_inner`. `iv` must be
    /// `encr.iv_len()` fresh random octets.
    pub fn seal(
        &self,
        header: &Header,
        first_inner: PayloadType,
        inner: &[u8],
        iv: &[u8],
    ) -> Result<Vec<u8>> {
        if iv.len() != self.encr.iv_len() {
            return Err(CryptoError::Malformed("iv length"));
        }
        let block = self.encr.block();
        // Plaintext is payloads | padding | pad length (§3.14).
        let pad = (block - (inner.len() + 1) % block) % block;
        let pt_len = inner.len() + pad + 1;
        let body_len = iv.len() + pt_len + self.icv_len();
        let total = crate::wire::HEADER_LEN + GENERIC_HEADER_LEN + body_len;
        let mut h = header.clone();
        h.next_payload = PayloadType::SK;
        h.length = u32::try_from(total).map_err(|_| CryptoError::Malformed("too long"))?;
        let mut out = Vec::with_capacity(total);
        h.encode(&mut out);
        out.push(first_inner.0);
        out.push(0);
        let sk_len = u16::try_from(GENERIC_HEADER_LEN + body_len)
            .map_err(|_| CryptoError::Malformed("too long"))?;
        out.extend_from_slice(&sk_len.to_be_bytes());
        let aad_len = out.len();
        out.extend_from_slice(iv);
        let mut pt = Vec::with_capacity(pt_len);
        pt.extend_from_slice(inner);
        pt.resize(inner.len() + pad, 0);
        pt.push(u8::try_from(pad).unwrap_or(0));
        match self.encr {
            Encr::AesCbc(_) => {
                let ct = cbc(
                    self.encr.cipher()?,
                    Mode::Encrypt,
                    self.encr_key.as_bytes(),
                    iv,
                    &pt,
                )?;
                out.extend_from_slice(&ct);
                let integ = self
                    .integ
                    .ok_or(CryptoError::Unsupported("CBC without INTEG"))?;
                let icv = integ.mac(self.integ_key.as_bytes(), &out)?;
                out.extend_from_slice(&icv);
            }
            _ => {
                let nonce = self.aead_nonce(iv)?;
                let key = self.aead_key()?;
                let mut tag = [0u8; AEAD_ICV_LEN];
                let aad = out
                    .get(..aad_len)
                    .ok_or(CryptoError::Malformed("aad"))?
                    .to_vec();
                let ct = openssl::symm::encrypt_aead(
                    self.encr.cipher()?,
                    key,
                    Some(&nonce),
                    &aad,
                    &pt,
                    &mut tag,
                )?;
                out.extend_from_slice(&ct);
                out.extend_from_slice(&tag);
            }
        }
        Ok(out)
    }

    fn aead_key(&self) -> Result<&[u8]> {
        let k = self.encr_key.as_bytes();
        k.get(..k.len().saturating_sub(AEAD_SALT_LEN))
            .ok_or(CryptoError::Malformed("key"))
    }

    fn aead_nonce(&self, iv: &[u8]) -> Result<Vec<u8>> {
        let k = self.encr_key.as_bytes();
        let salt = k
            .get(k.len().saturating_sub(AEAD_SALT_LEN)..)
            .ok_or(CryptoError::Malformed("salt"))?;
        let mut n = salt.to_vec();
        n.extend_from_slice(iv);
        Ok(n)
    }

    /// Verifies and decrypts the SK payload of `msg`, whose generic header
    /// starts at `sk_offset` and which runs to the end of the message.
    /// Returns the inner payload chain bytes.
    pub fn open(&self, msg: &[u8], sk_offset: usize) -> Result<Vec<u8>> {
        let aad_end = sk_offset + GENERIC_HEADER_LEN;
        let aad = msg.get(..aad_end).ok_or(CryptoError::Malformed("short"))?;
        let body = msg.get(aad_end..).ok_or(CryptoError::Malformed("short"))?;
        let ivl = self.encr.iv_len();
        let icvl = self.icv_len();
        if body.len() < ivl + icvl + 1 {
            return Err(CryptoError::Malformed("shorter than IV + ICV"));
        }
        let (iv, rest) = body.split_at(ivl);
        let (ct, icv) = rest.split_at(rest.len() - icvl);
        let pt = match self.encr {
            Encr::AesCbc(_) => {
                let integ = self
                    .integ
                    .ok_or(CryptoError::Unsupported("CBC without INTEG"))?;
                let signed = msg
                    .get(..msg.len() - icvl)
                    .ok_or(CryptoError::Malformed("short"))?;
                let want = integ.mac(self.integ_key.as_bytes(), signed)?;
                if !openssl::memcmp::eq(&want, icv) {
                    return Err(CryptoError::IntegrityCheckFailed);
                }
                if ct.len() % 16 != 0 {
                    return Err(CryptoError::Malformed(
                        "ciphertext not a multiple of the block",
                    ));
                }
                cbc(
                    self.encr.cipher()?,
                    Mode::Decrypt,
                    self.encr_key.as_bytes(),
                    iv,
                    ct,
                )?
            }
            _ => {
                let nonce = self.aead_nonce(iv)?;
                openssl::symm::decrypt_aead(
                    self.encr.cipher()?,
                    self.aead_key()?,
                    Some(&nonce),
                    aad,
                    ct,
                    icv,
                )
                .map_err(|_| CryptoError::IntegrityCheckFailed)?
            }
        };
        let (&padlen, rest) = pt
            .split_last()
            .ok_or(CryptoError::Malformed("empty plaintext"))?;
        let keep = rest
            .len()
            .checked_sub(usize::from(padlen))
            .ok_or(CryptoError::Malformed("pad length exceeds plaintext"))?;
        Ok(rest.get(..keep).unwrap_or(&[]).to_vec())
    }
}

fn cbc(cipher: Cipher, mode: Mode, key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>> {
    let mut c = Crypter::new(cipher, mode, key, Some(iv))?;
    c.pad(false);
    let mut out = vec![0u8; data.len() + cipher.block_size()];
    let mut n = c.update(data, &mut out)?;
    n += c.finalize(out.get_mut(n..).unwrap_or(&mut []))?;
    out.truncate(n);
    Ok(out)
}

/// Fills `buf` from openssl's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    openssl::rand::rand_bytes(buf)?;
    Ok(())
}

/// SHA-1 (for NAT_DETECTION_*_IP, §2.23).
pub fn sha1(parts: &[&[u8]]) -> Result<Vec<u8>> {
    let mut h = Md::Sha1.hasher();
    for p in parts {
        h.update(p);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests;
