//! Certificate authentication (RFC 7296 §2.15, §3.6–3.8) through openssl: our
//! certificate and key, the trusted CAs, CERTREQ hashes, chain verification,
//! identity-in-certificate checks, and AUTH signatures, both RFC 7427 digital
//! signatures (method 14) and the classic methods (RSA 1, ECDSA 9/10/11 of
//! RFC 4754).
//!
//! What it does not do: read files or clocks (the driver loads PEM bytes and
//! gives a wall-clock anchor), CRLs or OCSP, hash-and-URL certificates,
//! RSASSA-PSS, raw public keys.

use crate::wire::{AuthMethod, AuthPayload, IdPayload, IdType};
use openssl::bn::BigNum;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, PKeyRef, Private, Public};
use openssl::sign::{Signer, Verifier};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyParam;
use openssl::x509::{X509StoreContext, X509};
use std::time::Instant;

/// Errors of certificate handling: bad local material (misuse) or a peer
/// whose certificate or signature does not verify (peer).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Misuse: PEM or key material we were given does not load.
    #[error("cannot load {what}: {why}")]
    Load {
        /// Which input.
        what: &'static str,
        /// openssl's reason.
        why: String,
    },
    /// Misuse: the private key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// Incompatible: a key type we cannot sign or verify with.
    #[error("unsupported key: {0}")]
    UnsupportedKey(&'static str),
    /// Peer: certificate chain, identity or signature refused.
    #[error("{0}")]
    Refused(String),
}

fn load<T>(what: &'static str, r: Result<T, openssl::error::ErrorStack>) -> Result<T, CertError> {
    r.map_err(|e| CertError::Load {
        what,
        why: e.to_string(),
    })
}

/// Hash algorithm numbers of SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4, IANA
/// "IKEv2 Hash Algorithms").
pub mod hash_alg {
    /// SHA2-256.
    pub const SHA2_256: u16 = 2;
    /// SHA2-384.
    pub const SHA2_384: u16 = 3;
    /// SHA2-512.
    pub const SHA2_512: u16 = 4;
}

/// The hash algorithms we announce and accept in RFC 7427 signatures.
pub const OUR_HASHES: [u16; 3] = [hash_alg::SHA2_256, hash_alg::SHA2_384, hash_alg::SHA2_512];

/// RFC 7427 Appendix A: ASN.1 AlgorithmIdentifier DER of the signature
/// schemes we use, with their key type and hash.
const ALG_IDS: &[(&[u8], Id, u16)] = &[
    // sha256WithRSAEncryption (A.1.2), NULL parameters.
    (
        &[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05,
            0x00,
        ],
        Id::RSA,
        hash_alg::SHA2_256,
    ),
    // sha384WithRSAEncryption (A.1.3).
    (
        &[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05,
            0x00,
        ],
        Id::RSA,
        hash_alg::SHA2_384,
    ),
    // sha512WithRSAEncryption (A.1.4).
    (
        &[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05,
            0x00,
        ],
        Id::RSA,
        hash_alg::SHA2_512,
    ),
    // ecdsa-with-SHA256 (A.3.1), no parameters.
    (
        &[
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
        ],
        Id::EC,
        hash_alg::SHA2_256,
    ),
    // ecdsa-with-SHA384 (A.3.2).
    (
        &[
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
        ],
        Id::EC,
        hash_alg::SHA2_384,
    ),
    // ecdsa-with-SHA512 (A.3.3).
    (
        &[
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04,
        ],
        Id::EC,
        hash_alg::SHA2_512,
    ),
];

/// The same RSA identifiers with the NULL parameters left out, which some
/// peers send (RFC 4055 §2.1 allows both).
fn rsa_without_null(alg: &[u8]) -> Option<u16> {
    let prefix = [
        0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
    ];
    match alg.strip_prefix(&prefix[..]) {
        Some([0x0b]) => Some(hash_alg::SHA2_256),
        Some([0x0c]) => Some(hash_alg::SHA2_384),
        Some([0x0d]) => Some(hash_alg::SHA2_512),
        _ => None,
    }
}

fn digest(hash: u16) -> Option<MessageDigest> {
    match hash {
        hash_alg::SHA2_256 => Some(MessageDigest::sha256()),
        hash_alg::SHA2_384 => Some(MessageDigest::sha384()),
        hash_alg::SHA2_512 => Some(MessageDigest::sha512()),
        _ => None,
    }
}

/// ECDSA curve of a key with its RFC 4754 method and hash, and the octet
/// length of r and s.
fn ec_params<T: openssl::pkey::HasPublic>(
    key: &PKeyRef<T>,
) -> Result<(AuthMethod, u16, usize), CertError> {
    let ec = key
        .ec_key()
        .map_err(|_| CertError::UnsupportedKey("not an EC key"))?;
    match ec.group().curve_name() {
        Some(Nid::X9_62_PRIME256V1) => Ok((AuthMethod::ECDSA_SHA256_P256, hash_alg::SHA2_256, 32)),
        Some(Nid::SECP384R1) => Ok((AuthMethod::ECDSA_SHA384_P384, hash_alg::SHA2_384, 48)),
        Some(Nid::SECP521R1) => Ok((AuthMethod::ECDSA_SHA512_P521, hash_alg::SHA2_512, 66)),
        _ => Err(CertError::UnsupportedKey(
            "EC curve other than P-256, P-384, P-521",
        )),
    }
}

/// Our certificate (with intermediates) and private key.
pub struct Credentials {
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl core::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "subject",
                &self
                    .chain
                    .first()
                    .map(|c| format!("{:?}", c.subject_name())),
            )
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads a PEM certificate file (our certificate first, then any
    /// intermediates) and a PEM private key (RSA or ECDSA P-256/384/521).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Credentials, CertError> {
        let chain = load("certificate", X509::stack_from_pem(cert_pem))?;
        let key = load("private key", PKey::private_key_from_pem(key_pem))?;
        let leaf = chain.first().ok_or(CertError::Load {
            what: "certificate",
            why: "no certificate in the PEM data".into(),
        })?;
        let public = load("certificate key", leaf.public_key())?;
        if !key.public_eq(&public) {
            return Err(CertError::KeyMismatch);
        }
        match key.id() {
            Id::RSA => {}
            Id::EC => {
                ec_params(&key)?;
            }
            _ => return Err(CertError::UnsupportedKey("neither RSA nor ECDSA")),
        }
        Ok(Credentials { chain, key })
    }

    /// DER of our certificate, then of each intermediate (CERT payloads).
    pub fn cert_ders(&self) -> Vec<Vec<u8>> {
        self.chain.iter().filter_map(|c| c.to_der().ok()).collect()
    }

    /// Signs `octets` (§2.15) for an AUTH payload: RFC 7427 when the peer
    /// announced hash algorithms we share (`peer_hashes`), else the classic
    /// method of the key type (RSA with SHA-1, §3.8; ECDSA of RFC 4754).
    pub fn sign(&self, octets: &[u8], peer_hashes: &[u16]) -> Result<AuthPayload, CertError> {
        let fail = |e: openssl::error::ErrorStack| CertError::Refused(format!("signing: {e}"));
        let is_ec = self.key.id() == Id::EC;
        let ec = if is_ec {
            Some(ec_params(&self.key)?)
        } else {
            None
        };
        // Preferred hash: the curve's for ECDSA, SHA2-256 for RSA; else any shared one.
        let preferred = ec.map_or(hash_alg::SHA2_256, |(_, h, _)| h);
        let shared = |h: &u16| peer_hashes.contains(h) && OUR_HASHES.contains(h);
        let hash = [preferred]
            .iter()
            .chain(OUR_HASHES.iter())
            .copied()
            .find(|h| shared(h));
        if let (Some(hash), Some(md)) = (hash, hash.and_then(digest)) {
            let key_id = if is_ec { Id::EC } else { Id::RSA };
            let alg = ALG_IDS
                .iter()
                .find(|(_, k, h)| *k == key_id && *h == hash)
                .map(|(a, _, _)| *a)
                .ok_or(CertError::UnsupportedKey("no signature scheme"))?;
            let mut s = Signer::new(md, &self.key).map_err(fail)?;
            let sig = s.sign_oneshot_to_vec(octets).map_err(fail)?;
            // §3 of RFC 7427: length of the AlgorithmIdentifier, it, the signature.
            let mut data = Vec::with_capacity(1 + alg.len() + sig.len());
            data.push(u8::try_from(alg.len()).unwrap_or(u8::MAX));
            data.extend_from_slice(alg);
            data.extend_from_slice(&sig);
            return Ok(AuthPayload {
                method: AuthMethod::DIGITAL_SIGNATURE,
                data,
            });
        }
        match ec {
            None => {
                // §3.8: RSA_SIG is PKCS#1 v1.5 with SHA-1.
                let mut s = Signer::new(MessageDigest::sha1(), &self.key).map_err(fail)?;
                Ok(AuthPayload {
                    method: AuthMethod::RSA_SIG,
                    data: s.sign_oneshot_to_vec(octets).map_err(fail)?,
                })
            }
            Some((method, hash, len)) => {
                let md = digest(hash).ok_or(CertError::UnsupportedKey("hash"))?;
                let mut s = Signer::new(md, &self.key).map_err(fail)?;
                let der = s.sign_oneshot_to_vec(octets).map_err(fail)?;
                // RFC 4754 §7: r and s as fixed-length big-endian integers.
                let sig = EcdsaSig::from_der(&der).map_err(fail)?;
                let pad = i32::try_from(len).unwrap_or(66);
                let mut data = sig.r().to_vec_padded(pad).map_err(fail)?;
                data.extend(sig.s().to_vec_padded(pad).map_err(fail)?);
                Ok(AuthPayload { method, data })
            }
        }
    }
}

/// The CA certificates we trust, and a wall-clock anchor for validity checks.
pub struct TrustAnchors {
    cas: Vec<X509>,
    /// An `Instant` and the Unix time at that instant: validity is checked at
    /// `unix + (now - instant)`, so the core reads no clock.
    anchor: (Instant, i64),
}

impl core::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("cas", &self.cas.len())
            .finish()
    }
}

impl TrustAnchors {
    /// Trusted CAs from PEM data (any number of certificates); `anchor` is
    /// an instant and the Unix time (seconds) at that instant.
    pub fn from_pem(pem: &[u8], anchor: (Instant, i64)) -> Result<TrustAnchors, CertError> {
        let cas = if pem.iter().all(|b| b.is_ascii_whitespace()) {
            Vec::new()
        } else {
            load("CA certificates", X509::stack_from_pem(pem))?
        };
        Ok(TrustAnchors { cas, anchor })
    }

    /// How many CAs are trusted.
    pub fn len(&self) -> usize {
        self.cas.len()
    }

    /// True when no CA is trusted (every peer certificate is refused).
    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    /// CERTREQ data (§3.7, encoding 4): the SHA-1 hashes of the trusted CAs'
    /// SubjectPublicKeyInfo, concatenated.
    pub fn certreq(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ca in &self.cas {
            let spki = ca.public_key().and_then(|k| k.public_key_to_der());
            if let Ok(h) = spki.and_then(|d| openssl::hash::hash(MessageDigest::sha1(), &d)) {
                out.extend_from_slice(&h);
            }
        }
        out
    }

    /// Verifies the peer's end-entity certificate `leaf` (DER) against the
    /// trusted CAs, with `intermediates` (DER) as untrusted helpers, at the
    /// time `now` maps to; returns the certificate's public key.
    pub fn verify_chain(
        &self,
        leaf: &[u8],
        intermediates: &[Vec<u8>],
        now: Instant,
    ) -> Result<PKey<Public>, CertError> {
        let refuse =
            |what: &str, e: openssl::error::ErrorStack| CertError::Refused(format!("{what}: {e}"));
        if self.cas.is_empty() {
            return Err(CertError::Refused("no trusted CA configured".into()));
        }
        let leaf = X509::from_der(leaf).map_err(|e| refuse("peer certificate", e))?;
        let mut chain = Stack::new().map_err(|e| refuse("stack", e))?;
        for d in intermediates {
            let c = X509::from_der(d).map_err(|e| refuse("intermediate certificate", e))?;
            chain.push(c).map_err(|e| refuse("stack", e))?;
        }
        let mut b = X509StoreBuilder::new().map_err(|e| refuse("store", e))?;
        for ca in &self.cas {
            b.add_cert(ca.clone()).map_err(|e| refuse("store", e))?;
        }
        let elapsed = now.saturating_duration_since(self.anchor.0).as_secs();
        let unix = self
            .anchor
            .1
            .saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX));
        let mut param = X509VerifyParam::new().map_err(|e| refuse("verify parameters", e))?;
        // time_t is i64 here but narrower on some targets.
        #[allow(clippy::useless_conversion)]
        param.set_time(unix.try_into().unwrap_or_default());
        b.set_param(&param).map_err(|e| refuse("store", e))?;
        let store = b.build();
        let mut ctx = X509StoreContext::new().map_err(|e| refuse("store", e))?;
        let (ok, err) = ctx
            .init(&store, &leaf, &chain, |c| {
                let ok = c.verify_cert()?;
                Ok((ok, c.error()))
            })
            .map_err(|e| refuse("chain", e))?;
        if !ok {
            return Err(CertError::Refused(format!(
                "certificate chain does not verify: {}",
                err.error_string()
            )));
        }
        leaf.public_key().map_err(|e| refuse("peer key", e))
    }
}

/// Checks that the peer's IKE identity is one its certificate (DER) names:
/// the subject DN for DER_ASN1_DN, a subjectAltName of the same kind for
/// FQDN, RFC822 and IP identities.
pub fn id_in_cert(id: &IdPayload, leaf: &[u8]) -> Result<(), CertError> {
    let cert = X509::from_der(leaf).map_err(|e| CertError::Refused(e.to_string()))?;
    let sans = cert.subject_alt_names();
    let san_any = |f: &dyn Fn(&openssl::x509::GeneralNameRef) -> bool| {
        sans.as_ref().is_some_and(|s| s.iter().any(f))
    };
    let text = || std::str::from_utf8(&id.data).unwrap_or("");
    let ok = match id.id_type {
        IdType::DER_ASN1_DN => cert.subject_name().to_der().is_ok_and(|d| d == id.data),
        IdType::FQDN => san_any(&|n| n.dnsname().is_some_and(|d| d.eq_ignore_ascii_case(text()))),
        IdType::RFC822_ADDR => {
            san_any(&|n| n.email().is_some_and(|d| d.eq_ignore_ascii_case(text())))
        }
        IdType::IPV4_ADDR | IdType::IPV6_ADDR => {
            san_any(&|n| n.ipaddress().is_some_and(|a| a == id.data.as_slice()))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CertError::Refused(format!(
            "identity {id} is not named by the peer's certificate"
        )))
    }
}

/// Verifies an AUTH payload's signature over `octets` with the peer's key.
pub fn verify_signature(
    key: &PKey<Public>,
    auth: &AuthPayload,
    octets: &[u8],
) -> Result<(), CertError> {
    let refused = |why: &str| CertError::Refused(format!("AUTH signature: {why}"));
    let (md, sig): (MessageDigest, Vec<u8>) = match auth.method {
        AuthMethod::DIGITAL_SIGNATURE => {
            // RFC 7427 §3: length octet, AlgorithmIdentifier, signature.
            let (&len, rest) = auth.data.split_first().ok_or_else(|| refused("empty"))?;
            let len = usize::from(len);
            let alg = rest.get(..len).ok_or_else(|| refused("truncated"))?;
            let sig = rest.get(len..).ok_or_else(|| refused("truncated"))?;
            let (kind, hash) = ALG_IDS
                .iter()
                .find(|(a, _, _)| *a == alg)
                .map(|(_, k, h)| (*k, *h))
                .or_else(|| rsa_without_null(alg).map(|h| (Id::RSA, h)))
                .ok_or_else(|| refused("unsupported signature algorithm"))?;
            if key.id() != kind {
                return Err(refused("algorithm does not fit the certificate's key"));
            }
            (digest(hash).ok_or_else(|| refused("hash"))?, sig.to_vec())
        }
        AuthMethod::RSA_SIG => {
            if key.id() != Id::RSA {
                return Err(refused("RSA method with a non-RSA key"));
            }
            (MessageDigest::sha1(), auth.data.clone())
        }
        AuthMethod::ECDSA_SHA256_P256
        | AuthMethod::ECDSA_SHA384_P384
        | AuthMethod::ECDSA_SHA512_P521 => {
            let (method, hash, len) = ec_params(key).map_err(|_| refused("not an EC key"))?;
            if method != auth.method || auth.data.len() != 2 * len {
                return Err(refused("ECDSA method, curve or length mismatch"));
            }
            let (r, s) = auth.data.split_at(len);
            let der = BigNum::from_slice(r)
                .and_then(|r| BigNum::from_slice(s).map(|s| (r, s)))
                .and_then(|(r, s)| EcdsaSig::from_private_components(r, s))
                .and_then(|sig| sig.to_der())
                .map_err(|_| refused("bad ECDSA value"))?;
            (digest(hash).ok_or_else(|| refused("hash"))?, der)
        }
        _ => return Err(refused("not a signature method")),
    };
    let mut v = Verifier::new(md, key).map_err(|e| refused(&e.to_string()))?;
    match v.verify_oneshot(&sig, octets) {
        Ok(true) => Ok(()),
        _ => Err(refused("does not verify")),
    }
}

/// Certificate authentication of one gateway: our credentials and the CAs
/// we trust for the peer.
#[derive(Debug)]
pub struct CertAuth {
    /// Our certificate and key.
    pub local: Credentials,
    /// CAs the peer's certificate must chain to.
    pub trust: TrustAnchors,
}

/// Parses SIGNATURE_HASH_ALGORITHMS notify data (RFC 7427 §4): 2-octet
/// numbers; a trailing odd octet is ignored.
pub fn parse_hash_algs(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2)
        .filter_map(|c| <[u8; 2]>::try_from(c).ok())
        .map(u16::from_be_bytes)
        .collect()
}

/// SIGNATURE_HASH_ALGORITHMS notify data for [`OUR_HASHES`].
pub fn our_hash_algs() -> Vec<u8> {
    OUR_HASHES.iter().flat_map(|h| h.to_be_bytes()).collect()
}

#[cfg(test)]
pub(crate) mod tests;
