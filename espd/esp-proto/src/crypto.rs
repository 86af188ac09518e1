//! Crypto contexts prepared once per SA: AEAD (AES-GCM, ChaCha20-Poly1305), AES-CBC and HMAC.
//!
//! Key schedules are set up when the SA is created. Per packet, the AEAD and CBC contexts only
//! get a new IV (`EVP_CipherInit_ex` with no cipher and no key keeps the key schedule), so the
//! hot path allocates nothing. This goes through the safe `CipherCtx` API: a version calling
//! `EVP_*` through openssl-sys directly (skipping the wrapper's IV-length query and size
//! checks) measured no faster on OpenSSL 3.0 (OpenSSL's own per-call cost dominates), so the
//! unsafe code was not kept. HMAC (RFC 2104) is built on OpenSSL's SHA contexts: the inner
//! and outer states after absorbing the padded key are kept, and each packet starts from a
//! plain copy of them.

use crate::error::{EspError, Result};
use crate::transform::{Encryption, Integrity, AEAD_ICV_LEN};
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use openssl::sha::{Sha1, Sha256, Sha512};

/// One cipher context with its key schedule.
struct Evp {
    ctx: CipherCtx,
    /// Cipher block size (1 for the stream/AEAD ciphers, 16 for CBC).
    block: usize,
}

impl Evp {
    fn new(cipher: &CipherRef, key: &[u8], encrypt: bool) -> Result<Self> {
        if key.len() != cipher.key_length() {
            return Err(EspError::Config("encryption key length"));
        }
        let mut ctx = CipherCtx::new().map_err(|_| EspError::Crypto)?;
        let r = if encrypt {
            ctx.encrypt_init(Some(cipher), Some(key), None)
        } else {
            ctx.decrypt_init(Some(cipher), Some(key), None)
        };
        r.map_err(|_| EspError::Crypto)?;
        // ESP pads itself (RFC 4303 §2.4).
        ctx.set_padding(false);
        Ok(Evp {
            ctx,
            block: cipher.block_size(),
        })
    }

    /// Restart the context with a new IV, keeping the key schedule. Callers pass fixed-size
    /// arrays of exactly the cipher's IV length (12 for the AEADs, 16 for CBC), so the
    /// wrapper's length assertion holds.
    fn reset_iv(&mut self, iv: &[u8], encrypt: bool) -> Result<()> {
        let r = if encrypt {
            self.ctx.encrypt_init(None, None, Some(iv))
        } else {
            self.ctx.decrypt_init(None, None, Some(iv))
        };
        r.map_err(|_| EspError::Crypto)
    }

    fn aad(&mut self, aad: &[u8]) -> Result<()> {
        self.ctx
            .cipher_update(aad, None)
            .map(|_| ())
            .map_err(|_| EspError::Crypto)
    }

    /// Transform `input` into `output` (same length; a block multiple for CBC).
    fn update(&mut self, input: &[u8], output: &mut [u8]) -> Result<()> {
        if output.len() != input.len() || input.len() % self.block != 0 {
            return Err(EspError::Crypto);
        }
        if self.block == 1 {
            let n = self
                .ctx
                .cipher_update(input, Some(output))
                .map_err(|_| EspError::Crypto)?;
            return expect_len(n, input.len());
        }
        // Block cipher: the wrapper wants a block of output slack per call. With padding off
        // and block-aligned input OpenSSL writes exactly the input length, so all but the last
        // block go straight to `output` (which has the last block as slack) and the last block
        // goes through a scratch buffer.
        let split = input.len().saturating_sub(self.block);
        let (head, last) = input.split_at(split);
        let n = self
            .ctx
            .cipher_update(head, Some(output))
            .map_err(|_| EspError::Crypto)?;
        expect_len(n, head.len())?;
        let mut scratch = [0u8; 2 * MAX_BLOCK];
        let n = self
            .ctx
            .cipher_update(last, Some(&mut scratch))
            .map_err(|_| EspError::Crypto)?;
        expect_len(n, last.len())?;
        let tail = output.get_mut(split..).ok_or(EspError::Crypto)?;
        tail.copy_from_slice(scratch.get(..last.len()).ok_or(EspError::Crypto)?);
        Ok(())
    }

    /// Transform `data` in place (a block multiple for CBC).
    fn update_in_place(&mut self, data: &mut [u8]) -> Result<()> {
        if data.len() % self.block != 0 {
            return Err(EspError::Crypto);
        }
        if self.block == 1 {
            let len = data.len();
            let n = self
                .ctx
                .cipher_update_inplace(data, len)
                .map_err(|_| EspError::Crypto)?;
            return expect_len(n, len);
        }
        // As in update(): the last block of `data` is the slack for the rest.
        let split = data.len().saturating_sub(self.block);
        let n = self
            .ctx
            .cipher_update_inplace(data, split)
            .map_err(|_| EspError::Crypto)?;
        expect_len(n, split)?;
        let last = data.get_mut(split..).ok_or(EspError::Crypto)?;
        let mut scratch = [0u8; 2 * MAX_BLOCK];
        scratch[..last.len()].copy_from_slice(last);
        let n = self
            .ctx
            .cipher_update_inplace(&mut scratch, last.len())
            .map_err(|_| EspError::Crypto)?;
        expect_len(n, last.len())?;
        let len = last.len();
        last.copy_from_slice(&scratch[..len]);
        Ok(())
    }

    /// Finish; for AEAD decryption this is where the tag is verified.
    fn finish(&mut self) -> Result<()> {
        // Nothing is left to write (stream cipher, or CBC without padding on aligned input);
        // the scratch block satisfies the wrapper's size check.
        let mut scratch = [0u8; MAX_BLOCK];
        let n = self
            .ctx
            .cipher_final(&mut scratch)
            .map_err(|_| EspError::Crypto)?;
        expect_len(n, 0)
    }

    fn get_tag(&mut self, tag: &mut [u8; AEAD_ICV_LEN]) -> Result<()> {
        self.ctx.tag(tag).map_err(|_| EspError::Crypto)
    }

    fn set_tag(&mut self, tag: &[u8; AEAD_ICV_LEN]) -> Result<()> {
        self.ctx.set_tag(tag).map_err(|_| EspError::Crypto)
    }
}

/// Largest cipher block (AES).
const MAX_BLOCK: usize = 16;

fn expect_len(got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EspError::Crypto)
    }
}

fn cipher_for(enc: Encryption) -> &'static CipherRef {
    match enc {
        Encryption::AesCbc128 => Cipher::aes_128_cbc(),
        Encryption::AesCbc256 => Cipher::aes_256_cbc(),
        Encryption::AesGcm16_128 => Cipher::aes_128_gcm(),
        Encryption::AesGcm16_256 => Cipher::aes_256_gcm(),
        Encryption::ChaCha20Poly1305 => Cipher::chacha20_poly1305(),
    }
}

/// AES-GCM-16 (RFC 4106) or ChaCha20-Poly1305 (RFC 7634): nonce = salt (4) || IV (8).
pub(crate) struct Aead {
    evp: Evp,
    salt: [u8; 4],
    encrypt: bool,
}

impl Aead {
    /// `keymat` is the cipher key followed by the 4-byte salt (RFC 4106 §8.1, RFC 7634 §2).
    pub(crate) fn new(enc: Encryption, keymat: &[u8], encrypt: bool) -> Result<Self> {
        if !enc.is_aead() || keymat.len() != enc.keymat_len() {
            return Err(EspError::Config("AEAD key material length"));
        }
        let (key, salt) = keymat.split_at(enc.key_len());
        let mut s = [0u8; 4];
        s.copy_from_slice(salt);
        Ok(Aead {
            evp: Evp::new(cipher_for(enc), key, encrypt)?,
            salt: s,
            encrypt,
        })
    }

    fn nonce(&self, iv: &[u8; 8]) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(iv);
        n
    }

    /// Encrypt `data` in place and return the tag.
    pub(crate) fn seal(
        &mut self,
        iv: &[u8; 8],
        aad: &[u8],
        data: &mut [u8],
    ) -> Result<[u8; AEAD_ICV_LEN]> {
        let nonce = self.nonce(iv);
        self.evp.reset_iv(&nonce, self.encrypt)?;
        self.evp.aad(aad)?;
        self.evp.update_in_place(data)?;
        self.evp.finish()?;
        let mut tag = [0u8; AEAD_ICV_LEN];
        self.evp.get_tag(&mut tag)?;
        Ok(tag)
    }

    /// Decrypt `ct` into `out` (same length) and verify `tag`; [`EspError::Auth`] on mismatch.
    /// On error `out` holds unauthenticated bytes that must not be used.
    pub(crate) fn open(
        &mut self,
        iv: &[u8; 8],
        aad: &[u8],
        ct: &[u8],
        tag: &[u8; AEAD_ICV_LEN],
        out: &mut [u8],
    ) -> Result<()> {
        let nonce = self.nonce(iv);
        self.evp.reset_iv(&nonce, self.encrypt)?;
        self.evp.set_tag(tag)?;
        self.evp.aad(aad)?;
        self.evp.update(ct, out)?;
        self.evp.finish().map_err(|_| EspError::Auth)
    }
}

/// AES-CBC (RFC 3602) without padding (ESP pads itself).
pub(crate) struct Cbc {
    evp: Evp,
    encrypt: bool,
}

/// AES block size (RFC 3602 §2.1).
pub(crate) const AES_BLOCK: usize = 16;

impl Cbc {
    pub(crate) fn new(enc: Encryption, key: &[u8], encrypt: bool) -> Result<Self> {
        if enc.is_aead() || key.len() != enc.keymat_len() {
            return Err(EspError::Config("CBC key length"));
        }
        Ok(Cbc {
            evp: Evp::new(cipher_for(enc), key, encrypt)?,
            encrypt,
        })
    }

    /// Encrypt block-aligned `data` in place.
    pub(crate) fn encrypt(&mut self, iv: &[u8; AES_BLOCK], data: &mut [u8]) -> Result<()> {
        if data.len() % AES_BLOCK != 0 {
            return Err(EspError::Crypto);
        }
        self.evp.reset_iv(iv, self.encrypt)?;
        self.evp.update_in_place(data)?;
        self.evp.finish()
    }

    /// Decrypt block-aligned `ct` into `out` (same length).
    pub(crate) fn decrypt(
        &mut self,
        iv: &[u8; AES_BLOCK],
        ct: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        if ct.len() % AES_BLOCK != 0 {
            return Err(EspError::Truncated);
        }
        self.evp.reset_iv(iv, self.encrypt)?;
        self.evp.update(ct, out)?;
        self.evp.finish()
    }
}

#[derive(Clone)]
enum HashState {
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl HashState {
    fn new(alg: Integrity) -> Self {
        match alg {
            Integrity::HmacSha1_96 => HashState::Sha1(Sha1::new()),
            Integrity::HmacSha2_256_128 => HashState::Sha256(Sha256::new()),
            Integrity::HmacSha2_512_256 => HashState::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            HashState::Sha1(h) => h.update(data),
            HashState::Sha256(h) => h.update(data),
            HashState::Sha512(h) => h.update(data),
        }
    }

    /// Finish into `out`; returns the digest length.
    fn finish(self, out: &mut [u8; MAX_DIGEST]) -> usize {
        match self {
            HashState::Sha1(h) => copy_prefix(out, &h.finish()),
            HashState::Sha256(h) => copy_prefix(out, &h.finish()),
            HashState::Sha512(h) => copy_prefix(out, &h.finish()),
        }
    }
}

fn copy_prefix(out: &mut [u8; MAX_DIGEST], d: &[u8]) -> usize {
    let n = d.len().min(MAX_DIGEST);
    out[..n].copy_from_slice(&d[..n]);
    n
}

/// Largest digest (SHA-512).
pub(crate) const MAX_DIGEST: usize = 64;

/// HMAC (RFC 2104) with the keyed inner and outer hash states precomputed.
#[derive(Clone)]
pub(crate) struct Hmac {
    alg: Integrity,
    inner: HashState,
    outer: HashState,
    icv_len: usize,
}

impl Drop for Hmac {
    /// Best effort without unsafe code: overwrite the keyed states (which are key-derived
    /// secrets) with unkeyed ones; `black_box` keeps the stores from being elided.
    fn drop(&mut self) {
        self.inner = HashState::new(self.alg);
        self.outer = HashState::new(self.alg);
        std::hint::black_box(&self.inner);
        std::hint::black_box(&self.outer);
    }
}

impl Hmac {
    /// `key` must have the algorithm's key length (RFC 2404 §3, RFC 4868 §2.1.1).
    pub(crate) fn new(alg: Integrity, key: &[u8]) -> Result<Self> {
        if key.len() != alg.key_len() {
            return Err(EspError::Config("integrity key length"));
        }
        Ok(Self::with_any_key(alg, key))
    }

    /// RFC 2104 keying for any key length (longer than a block: hashed first).
    pub(crate) fn with_any_key(alg: Integrity, key: &[u8]) -> Self {
        let block = match alg {
            Integrity::HmacSha1_96 | Integrity::HmacSha2_256_128 => 64,
            Integrity::HmacSha2_512_256 => 128,
        };
        let mut k = [0u8; 128];
        if key.len() > block {
            let mut h = HashState::new(alg);
            h.update(key);
            let mut d = [0u8; MAX_DIGEST];
            let n = h.finish(&mut d);
            k[..n].copy_from_slice(&d[..n]);
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut pad = [0u8; 128];
        let mut inner = HashState::new(alg);
        for (p, b) in pad.iter_mut().zip(k.iter()).take(block) {
            *p = b ^ 0x36;
        }
        inner.update(&pad[..block]);
        let mut outer = HashState::new(alg);
        for (p, b) in pad.iter_mut().zip(k.iter()).take(block) {
            *p = b ^ 0x5c;
        }
        outer.update(&pad[..block]);
        k.fill(0);
        pad.fill(0);
        std::hint::black_box((&k, &pad)); // keep the wipes
        Hmac {
            alg,
            inner,
            outer,
            icv_len: alg.icv_len(),
        }
    }

    /// Full HMAC over the concatenation of `parts`; returns the digest length.
    pub(crate) fn mac(&self, parts: &[&[u8]], out: &mut [u8; MAX_DIGEST]) -> usize {
        let mut h = self.inner.clone();
        for p in parts {
            h.update(p);
        }
        let mut d = [0u8; MAX_DIGEST];
        let n = h.finish(&mut d);
        let mut o = self.outer.clone();
        o.update(&d[..n]);
        o.finish(out)
    }

    /// Truncated ICV length.
    pub(crate) fn icv_len(&self) -> usize {
        self.icv_len
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hmac(alg: Integrity, key: &[u8], data: &[u8]) -> Vec<u8> {
        let h = Hmac::with_any_key(alg, key);
        let mut out = [0u8; MAX_DIGEST];
        // Split the data to exercise multi-part input.
        let (a, b) = data.split_at(data.len() / 2);
        let n = h.mac(&[a, b], &mut out);
        out[..n].to_vec()
    }

    // RFC 4868 §2.7.2.1: SHA256 authentication test vectors (32-byte keys as ESP uses).
    #[test]
    fn rfc4868_auth256() {
        let cases = [
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "4869205468657265",
                "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7",
            ),
            (
                "4a6566654a6566654a6566654a6566654a6566654a6566654a6566654a656665",
                "7768617420646f2079612077616e7420666f72206e6f7468696e673f",
                "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6",
            ),
            (
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd\
                 dddddddddddddddddddddddddddddddddddd",
                "cdcb1220d1ecccea91e53aba3092f962e549fe6ce9ed7fdc43191fbde45c30b0",
            ),
            (
                "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
                "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd\
                 cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
                "372efcf9b40b35c2115b1346903d2ef42fced46f0846e7257bb156d3d7b30d3f",
            ),
        ];
        for (key, data, prf) in cases {
            let key = hex(key);
            assert_eq!(key.len(), Integrity::HmacSha2_256_128.key_len());
            let full = hmac(Integrity::HmacSha2_256_128, &key, &hex(data));
            assert_eq!(full, hex(prf));
            // HMAC-SHA-256-128 is the first 128 bits.
            assert_eq!(
                &full[..Integrity::HmacSha2_256_128.icv_len()],
                &hex(prf)[..16]
            );
        }
    }

    // RFC 4868 §2.7.2.3: SHA512 authentication test vectors AUTH512-1 and AUTH512-2.
    #[test]
    fn rfc4868_auth512() {
        let cases = [
            (
                "0b".repeat(64),
                "4869205468657265".to_string(),
                "637edc6e01dce7e6742a99451aae82df23da3e92439e590e43e761b33e910fb8\
                 ac2878ebd5803f6f0b61dbce5e251ff8789a4722c1be65aea45fd464e89f8f5b",
            ),
            (
                "4a656665".repeat(16),
                "7768617420646f2079612077616e7420666f72206e6f7468696e673f".to_string(),
                "cb370917ae8a7ce28cfd1d8f4705d6141c173b2a9362c15df235dfb251b15454\
                 6aa334ae9fb9afc2184932d8695e397bfa0ffb93466cfcceaae38c833b7dba38",
            ),
        ];
        for (key, data, prf) in cases {
            let key = hex(&key);
            assert_eq!(key.len(), Integrity::HmacSha2_512_256.key_len());
            let full = hmac(Integrity::HmacSha2_512_256, &key, &hex(&data));
            assert_eq!(full, hex(prf));
            assert_eq!(Integrity::HmacSha2_512_256.icv_len(), 32);
        }
    }

    // RFC 2202 §3 test cases 1 and 5 (HMAC-SHA-1), whose 96-bit truncation RFC 2404 uses.
    #[test]
    fn rfc2202_sha1_96() {
        let full = hmac(Integrity::HmacSha1_96, &[0x0b; 20], b"Hi There");
        assert_eq!(full, hex("b617318655057264e28bc0b6fb378c8ef146be00"));
        let full = hmac(Integrity::HmacSha1_96, &[0x0c; 20], b"Test With Truncation");
        assert_eq!(&full[..12], &hex("4c1a03424b55e07fe7f27be1")[..]);
        // Keys longer than the block are hashed first (RFC 2104 §2), RFC 2202 case 6.
        let full = hmac(
            Integrity::HmacSha1_96,
            &[0xaa; 80],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(full, hex("aa4ae5e15272d00e95705637ce8a3b55ed402112"));
    }

    #[test]
    fn hmac_rejects_wrong_key_length() {
        assert!(Hmac::new(Integrity::HmacSha2_256_128, &[0; 31]).is_err());
        assert!(Hmac::new(Integrity::HmacSha2_256_128, &[0; 32]).is_ok());
    }

    // McGrew & Viega, "The Galois/Counter Mode of Operation", test case 4 (AES-128, 60-byte
    // plaintext, 20-byte AAD, 96-bit IV); the IV splits as salt || explicit IV (RFC 4106 §4).
    #[test]
    fn gcm_spec_test_case_4() {
        let mut keymat = hex("feffe9928665731c6d6a8f9467308308");
        keymat.extend(hex("cafebabe"));
        let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let pt = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let ct = hex(
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        );
        let tag = hex("5bc94fbc3221a5db94fae95ae7121a47");
        let mut enc = Aead::new(Encryption::AesGcm16_128, &keymat, true).unwrap();
        let mut data = pt.clone();
        let t = enc.seal(&iv, &aad, &mut data).unwrap();
        assert_eq!(data, ct);
        assert_eq!(t.to_vec(), tag);
        // Second use of the same context with a new IV must not depend on the first.
        let mut again = pt.clone();
        let t2 = enc.seal(&iv, &aad, &mut again).unwrap();
        assert_eq!((again, t2), (ct.clone(), t));

        let mut dec = Aead::new(Encryption::AesGcm16_128, &keymat, false).unwrap();
        let mut out = vec![0u8; ct.len()];
        dec.open(&iv, &aad, &ct, &t, &mut out).unwrap();
        assert_eq!(out, pt);
        let mut bad = t;
        bad[0] ^= 1;
        assert_eq!(
            dec.open(&iv, &aad, &ct, &bad, &mut out),
            Err(EspError::Auth)
        );
        // And the context still works after a failure.
        dec.open(&iv, &aad, &ct, &t, &mut out).unwrap();
        assert_eq!(out, pt);
    }

    // GCM spec test case 16 (AES-256, 60-byte plaintext, 20-byte AAD).
    #[test]
    fn gcm_spec_test_case_16() {
        let mut keymat = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        keymat.extend(hex("cafebabe"));
        let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let mut data = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let mut enc = Aead::new(Encryption::AesGcm16_256, &keymat, true).unwrap();
        let t = enc.seal(&iv, &aad, &mut data).unwrap();
        assert_eq!(
            data,
            hex(
                "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
            )
        );
        assert_eq!(t.to_vec(), hex("76fc6ece0f4e1768cddf8853bb2d551b"));
    }

    // RFC 3602 §4 case 2: AES-128-CBC, 32 bytes.
    #[test]
    fn rfc3602_cbc_case_2() {
        let key = hex("c286696d887c9aa0611bbb3e2025a45a");
        let iv: [u8; 16] = hex("562e17996d093d28ddb3ba695a2e6f58").try_into().unwrap();
        let pt = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        let ct = hex("d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1");
        let mut enc = Cbc::new(Encryption::AesCbc128, &key, true).unwrap();
        let mut data = pt.clone();
        enc.encrypt(&iv, &mut data).unwrap();
        assert_eq!(data, ct);
        let mut dec = Cbc::new(Encryption::AesCbc128, &key, false).unwrap();
        let mut out = vec![0u8; 32];
        dec.decrypt(&iv, &ct, &mut out).unwrap();
        assert_eq!(out, pt);
        assert_eq!(
            dec.decrypt(&iv, &ct[..31], &mut out[..31]),
            Err(EspError::Truncated)
        );
    }
}
