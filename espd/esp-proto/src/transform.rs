//! ESP transforms: which cipher, which integrity algorithm, and the sizes they imply.

use crate::error::{EspError, Result};

/// ESP encryption algorithms. Values from IKEv2 Transform Type 1 (RFC 7296 §3.3.2, IANA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encryption {
    /// ENCR_AES_CBC (12) with a 128-bit key (RFC 3602).
    AesCbc128,
    /// ENCR_AES_CBC (12) with a 256-bit key (RFC 3602).
    AesCbc256,
    /// ENCR_AES_GCM_16 (20) with a 128-bit key (RFC 4106).
    AesGcm16_128,
    /// ENCR_AES_GCM_16 (20) with a 256-bit key (RFC 4106).
    AesGcm16_256,
    /// ENCR_CHACHA20_POLY1305 (28) (RFC 7634).
    ChaCha20Poly1305,
}

/// IKEv2 transform ID of ENCR_AES_CBC (RFC 7296 §3.3.2).
pub const ENCR_AES_CBC: u16 = 12;
/// IKEv2 transform ID of ENCR_AES_GCM_16 (RFC 4106 §8.1 / RFC 5282).
pub const ENCR_AES_GCM_16: u16 = 20;
/// IKEv2 transform ID of ENCR_CHACHA20_POLY1305 (RFC 7634 §4).
pub const ENCR_CHACHA20_POLY1305: u16 = 28;
/// IKEv2 transform ID of AUTH_HMAC_SHA1_96 (RFC 7296 §3.3.2, RFC 2404).
pub const AUTH_HMAC_SHA1_96: u16 = 2;
/// IKEv2 transform ID of AUTH_HMAC_SHA2_256_128 (RFC 4868 §4).
pub const AUTH_HMAC_SHA2_256_128: u16 = 12;
/// IKEv2 transform ID of AUTH_HMAC_SHA2_512_256 (RFC 4868 §4).
pub const AUTH_HMAC_SHA2_512_256: u16 = 14;

impl Encryption {
    /// IKEv2 transform ID.
    pub const fn ikev2_id(self) -> u16 {
        match self {
            Encryption::AesCbc128 | Encryption::AesCbc256 => ENCR_AES_CBC,
            Encryption::AesGcm16_128 | Encryption::AesGcm16_256 => ENCR_AES_GCM_16,
            Encryption::ChaCha20Poly1305 => ENCR_CHACHA20_POLY1305,
        }
    }

    /// From an IKEv2 transform ID and its Key Length attribute (bits).
    pub fn from_ikev2(id: u16, key_bits: Option<u16>) -> Option<Self> {
        match (id, key_bits) {
            (ENCR_AES_CBC, Some(128)) => Some(Encryption::AesCbc128),
            (ENCR_AES_CBC, Some(256)) => Some(Encryption::AesCbc256),
            (ENCR_AES_GCM_16, Some(128)) => Some(Encryption::AesGcm16_128),
            (ENCR_AES_GCM_16, Some(256)) => Some(Encryption::AesGcm16_256),
            // RFC 7634 §4: no Key Length attribute.
            (ENCR_CHACHA20_POLY1305, None) => Some(Encryption::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Cipher key length in bytes (without salt).
    pub const fn key_len(self) -> usize {
        match self {
            Encryption::AesCbc128 | Encryption::AesGcm16_128 => 16,
            Encryption::AesCbc256 | Encryption::AesGcm16_256 | Encryption::ChaCha20Poly1305 => 32,
        }
    }

    /// Salt taken from the end of the encryption KEYMAT: 4 bytes for AES-GCM (RFC 4106 §8.1)
    /// and ChaCha20-Poly1305 (RFC 7634 §2), none for CBC.
    pub const fn salt_len(self) -> usize {
        if self.is_aead() {
            4
        } else {
            0
        }
    }

    /// Bytes of KEYMAT the encryption key takes (RFC 7296 §2.17 order: encryption first).
    pub const fn keymat_len(self) -> usize {
        self.key_len() + self.salt_len()
    }

    /// IV bytes carried in each packet: 16 for CBC (RFC 3602 §3), 8 for GCM (RFC 4106 §3.1)
    /// and ChaCha20-Poly1305 (RFC 7634 §2).
    pub const fn iv_len(self) -> usize {
        if self.is_aead() {
            8
        } else {
            16
        }
    }

    /// Whether this is a combined-mode (AEAD) algorithm.
    pub const fn is_aead(self) -> bool {
        matches!(
            self,
            Encryption::AesGcm16_128 | Encryption::AesGcm16_256 | Encryption::ChaCha20Poly1305
        )
    }

    /// Alignment of payload + padding + 2 trailer bytes: the cipher block size for CBC, else
    /// 4 bytes (RFC 4303 §2.4).
    pub const fn align(self) -> usize {
        if self.is_aead() {
            4
        } else {
            16
        }
    }

    /// FortiOS `diagnose` name of the cipher (`esp=aes key=16`).
    pub const fn diag_name(self) -> &'static str {
        match self {
            Encryption::AesCbc128 | Encryption::AesCbc256 => "aes",
            Encryption::AesGcm16_128 | Encryption::AesGcm16_256 => "aes-gcm",
            Encryption::ChaCha20Poly1305 => "chacha20poly1305",
        }
    }
}

/// ESP integrity algorithms (IKEv2 Transform Type 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Integrity {
    /// AUTH_HMAC_SHA1_96 (RFC 2404).
    HmacSha1_96,
    /// AUTH_HMAC_SHA2_256_128 (RFC 4868).
    HmacSha2_256_128,
    /// AUTH_HMAC_SHA2_512_256 (RFC 4868).
    HmacSha2_512_256,
}

impl Integrity {
    /// IKEv2 transform ID.
    pub const fn ikev2_id(self) -> u16 {
        match self {
            Integrity::HmacSha1_96 => AUTH_HMAC_SHA1_96,
            Integrity::HmacSha2_256_128 => AUTH_HMAC_SHA2_256_128,
            Integrity::HmacSha2_512_256 => AUTH_HMAC_SHA2_512_256,
        }
    }

    /// From an IKEv2 transform ID.
    pub fn from_ikev2(id: u16) -> Option<Self> {
        match id {
            AUTH_HMAC_SHA1_96 => Some(Integrity::HmacSha1_96),
            AUTH_HMAC_SHA2_256_128 => Some(Integrity::HmacSha2_256_128),
            AUTH_HMAC_SHA2_512_256 => Some(Integrity::HmacSha2_512_256),
            _ => None,
        }
    }

    /// Key length in bytes: the hash output size (RFC 2404 §3, RFC 4868 §2.1.1).
    pub const fn key_len(self) -> usize {
        match self {
            Integrity::HmacSha1_96 => 20,
            Integrity::HmacSha2_256_128 => 32,
            Integrity::HmacSha2_512_256 => 64,
        }
    }

    /// Truncated ICV length in bytes (RFC 2404 §3, RFC 4868 §2.1.1).
    pub const fn icv_len(self) -> usize {
        match self {
            Integrity::HmacSha1_96 => 12,
            Integrity::HmacSha2_256_128 => 16,
            Integrity::HmacSha2_512_256 => 32,
        }
    }

    /// FortiOS `diagnose` name (`ah=sha1 key=20`).
    pub const fn diag_name(self) -> &'static str {
        match self {
            Integrity::HmacSha1_96 => "sha1",
            Integrity::HmacSha2_256_128 => "sha256",
            Integrity::HmacSha2_512_256 => "sha512",
        }
    }
}

/// AEAD tag length: GCM with 16-octet ICV (RFC 4106 §6), Poly1305 (RFC 7634 §2).
pub const AEAD_ICV_LEN: usize = 16;

/// A valid ESP transform: an AEAD cipher alone, or CBC with an integrity algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transform {
    enc: Encryption,
    integ: Option<Integrity>,
}

impl Transform {
    /// AES-GCM-16 with a 128-bit key.
    pub const AES128GCM: Transform = Transform {
        enc: Encryption::AesGcm16_128,
        integ: None,
    };
    /// AES-GCM-16 with a 256-bit key.
    pub const AES256GCM: Transform = Transform {
        enc: Encryption::AesGcm16_256,
        integ: None,
    };
    /// ChaCha20-Poly1305.
    pub const CHACHA20POLY1305: Transform = Transform {
        enc: Encryption::ChaCha20Poly1305,
        integ: None,
    };

    /// Combine; AEAD ciphers take no integrity algorithm, CBC needs one (RFC 4303 §3.2).
    pub fn new(enc: Encryption, integ: Option<Integrity>) -> Result<Self> {
        match (enc.is_aead(), integ) {
            (true, None) | (false, Some(_)) => Ok(Transform { enc, integ }),
            (true, Some(_)) => Err(EspError::Config(
                "AEAD transform with an integrity algorithm",
            )),
            (false, None) => Err(EspError::Config(
                "CBC transform without integrity algorithm",
            )),
        }
    }

    /// The encryption algorithm.
    pub const fn encryption(&self) -> Encryption {
        self.enc
    }

    /// The integrity algorithm (None for AEAD).
    pub const fn integrity(&self) -> Option<Integrity> {
        self.integ
    }

    /// IV bytes per packet.
    pub const fn iv_len(&self) -> usize {
        self.enc.iv_len()
    }

    /// ICV bytes per packet.
    pub const fn icv_len(&self) -> usize {
        match self.integ {
            Some(i) => i.icv_len(),
            None => AEAD_ICV_LEN,
        }
    }

    /// Bytes of KEYMAT for the encryption key (including the salt of AEAD ciphers).
    pub const fn enc_keymat_len(&self) -> usize {
        self.enc.keymat_len()
    }

    /// Bytes of KEYMAT for the integrity key (0 for AEAD).
    pub const fn integ_keymat_len(&self) -> usize {
        match self.integ {
            Some(i) => i.key_len(),
            None => 0,
        }
    }

    /// Bytes of KEYMAT for one direction (encryption then integrity, RFC 7296 §2.17).
    pub const fn keymat_len(&self) -> usize {
        self.enc_keymat_len() + self.integ_keymat_len()
    }

    /// Largest number of bytes [`crate::EncryptSa::encapsulate`] adds to an inner packet:
    /// header, IV, worst-case padding, pad length, next header and ICV.
    pub const fn max_overhead(&self) -> usize {
        crate::wire::ESP_HEADER_LEN + self.iv_len() + (self.enc.align() - 1) + 2 + self.icv_len()
    }

    /// Exact ESP packet length for an inner packet of `inner_len` bytes.
    pub const fn esp_len(&self, inner_len: usize) -> usize {
        let align = self.enc.align();
        let body = (inner_len + 2).div_ceil(align) * align;
        crate::wire::ESP_HEADER_LEN + self.iv_len() + body + self.icv_len()
    }

    /// FortiOS phase2 proposal name (`aes128gcm`, `aes256-sha512`, ...).
    pub const fn name(&self) -> &'static str {
        use Encryption::*;
        use Integrity::*;
        match (self.enc, self.integ) {
            (AesGcm16_128, _) => "aes128gcm",
            (AesGcm16_256, _) => "aes256gcm",
            (ChaCha20Poly1305, _) => "chacha20poly1305",
            (AesCbc128, Some(HmacSha1_96)) | (AesCbc128, None) => "aes128-sha1",
            (AesCbc128, Some(HmacSha2_256_128)) => "aes128-sha256",
            (AesCbc128, Some(HmacSha2_512_256)) => "aes128-sha512",
            (AesCbc256, Some(HmacSha1_96)) | (AesCbc256, None) => "aes256-sha1",
            (AesCbc256, Some(HmacSha2_256_128)) => "aes256-sha256",
            (AesCbc256, Some(HmacSha2_512_256)) => "aes256-sha512",
        }
    }

    /// Parse a FortiOS phase2 proposal name.
    pub fn from_name(name: &str) -> Option<Self> {
        use Encryption::*;
        use Integrity::*;
        let (enc, integ) = match name {
            "aes128gcm" => (AesGcm16_128, None),
            "aes256gcm" => (AesGcm16_256, None),
            "chacha20poly1305" => (ChaCha20Poly1305, None),
            "aes128-sha1" => (AesCbc128, Some(HmacSha1_96)),
            "aes128-sha256" => (AesCbc128, Some(HmacSha2_256_128)),
            "aes128-sha512" => (AesCbc128, Some(HmacSha2_512_256)),
            "aes256-sha1" => (AesCbc256, Some(HmacSha1_96)),
            "aes256-sha256" => (AesCbc256, Some(HmacSha2_256_128)),
            "aes256-sha512" => (AesCbc256, Some(HmacSha2_512_256)),
            _ => return None,
        };
        Transform::new(enc, integ).ok()
    }

    /// Every supported transform (for tests and capability listings).
    pub fn all() -> [Transform; 9] {
        use Encryption::*;
        use Integrity::*;
        let t = |enc, integ| Transform { enc, integ };
        [
            t(AesGcm16_128, None),
            t(AesGcm16_256, None),
            t(ChaCha20Poly1305, None),
            t(AesCbc128, Some(HmacSha1_96)),
            t(AesCbc128, Some(HmacSha2_256_128)),
            t(AesCbc128, Some(HmacSha2_512_256)),
            t(AesCbc256, Some(HmacSha1_96)),
            t(AesCbc256, Some(HmacSha2_256_128)),
            t(AesCbc256, Some(HmacSha2_512_256)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in Transform::all() {
            assert_eq!(Transform::from_name(t.name()), Some(t), "{}", t.name());
        }
        assert_eq!(Transform::from_name("des-md5"), None);
    }

    #[test]
    fn invalid_combinations_rejected() {
        assert!(Transform::new(Encryption::AesGcm16_128, Some(Integrity::HmacSha1_96)).is_err());
        assert!(Transform::new(Encryption::AesCbc128, None).is_err());
    }

    #[test]
    fn ikev2_ids_round_trip() {
        for t in Transform::all() {
            let e = t.encryption();
            let bits = if e == Encryption::ChaCha20Poly1305 {
                None
            } else {
                Some(e.key_len() as u16 * 8)
            };
            assert_eq!(Encryption::from_ikev2(e.ikev2_id(), bits), Some(e));
            if let Some(i) = t.integrity() {
                assert_eq!(Integrity::from_ikev2(i.ikev2_id()), Some(i));
            }
        }
    }

    #[test]
    fn sizes() {
        // 100-byte inner packet, GCM: 8 hdr + 8 iv + 104 (100+2 -> 104) + 16 icv.
        assert_eq!(Transform::AES128GCM.esp_len(100), 136);
        let cbc = Transform::from_name("aes128-sha1").unwrap();
        // 8 + 16 + 112 (102 -> 112) + 12.
        assert_eq!(cbc.esp_len(100), 148);
        assert_eq!(Transform::AES256GCM.enc_keymat_len(), 36);
        assert_eq!(cbc.integ_keymat_len(), 20);
        for t in Transform::all() {
            for n in 0..64 {
                assert!(t.esp_len(n) <= n + t.max_overhead());
            }
        }
    }
}
