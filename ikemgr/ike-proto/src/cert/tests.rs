//! Certificates made here with openssl: a CA, leaves with subjectAltNames,
//! RSA and ECDSA keys; signatures in every method, chains, identities.

use super::*;
use crate::wire::IdPayload;
use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509Builder, X509NameBuilder};
use std::time::Duration;

pub(crate) fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

pub(crate) fn ec_key(nid: Nid) -> PKey<Private> {
    PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(nid).unwrap()).unwrap()).unwrap()
}

/// A certificate for `cn` (and DNS SAN `dns` if any) signed by `issuer`
/// (self-signed CA when None), valid for `days` from now.
pub(crate) fn make_cert(
    cn: &str,
    dns: Option<&str>,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    days: u32,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(days).unwrap())
        .unwrap();
    let serial = BigNum::from_u32(cn.len() as u32 + 7)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    b.set_serial_number(&serial).unwrap();
    if issuer.is_none() {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
    }
    if let Some(d) = dns {
        let san = SubjectAlternativeName::new()
            .dns(d)
            .build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None))
            .unwrap();
        b.append_extension(san).unwrap();
    }
    let signer = issuer.map_or(key, |(_, k)| k);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    b.build()
}

pub(crate) struct Pki {
    ca: X509,
    ca_key: PKey<Private>,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let ca_key = rsa_key();
        let ca = make_cert("Haven Test CA", None, &ca_key, None, 30);
        Pki { ca, ca_key }
    }
    pub(crate) fn leaf(&self, dns: &str, key: PKey<Private>) -> (Credentials, Vec<u8>) {
        let cert = make_cert(dns, Some(dns), &key, Some((&self.ca, &self.ca_key)), 10);
        let c = Credentials::from_pem(
            &cert.to_pem().unwrap(),
            &key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        (c, cert.to_der().unwrap())
    }
    pub(crate) fn trust(&self, now: Instant) -> TrustAnchors {
        TrustAnchors::from_pem(&self.ca.to_pem().unwrap(), (now, unix_now())).unwrap()
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn roundtrip(creds: &Credentials, der: &[u8], pki: &Pki, hashes: &[u16], method: AuthMethod) {
    let now = Instant::now();
    let octets = b"RealMessage|Nonce|prf(SK_p, ID)";
    let auth = creds.sign(octets, hashes).unwrap();
    assert_eq!(auth.method, method);
    let key = pki.trust(now).verify_chain(der, &[], now).unwrap();
    verify_signature(&key, &auth, octets).unwrap();
    assert!(verify_signature(&key, &auth, b"other octets").is_err());
    let mut bad = auth.clone();
    if let Some(last) = bad.data.last_mut() {
        *last ^= 1;
    }
    assert!(verify_signature(&key, &bad, octets).is_err());
}

#[test]
fn rsa_signs_with_rfc7427_when_announced_and_rsa_sig_otherwise() {
    let pki = Pki::new();
    let (c, der) = pki.leaf("gw.haven.test", rsa_key());
    roundtrip(&c, &der, &pki, &OUR_HASHES, AuthMethod::DIGITAL_SIGNATURE);
    let a = c.sign(b"x", &[hash_alg::SHA2_384]).unwrap();
    assert_eq!(a.data[0] as usize, 15, "AlgorithmIdentifier length");
    assert_eq!(a.data[1..16], *ALG_IDS[1].0, "sha384WithRSAEncryption");
    roundtrip(&c, &der, &pki, &[], AuthMethod::RSA_SIG);
}

#[test]
fn ecdsa_uses_the_curve_method_or_rfc7427() {
    let pki = Pki::new();
    for (nid, method, len) in [
        (Nid::X9_62_PRIME256V1, AuthMethod::ECDSA_SHA256_P256, 64),
        (Nid::SECP384R1, AuthMethod::ECDSA_SHA384_P384, 96),
    ] {
        let (c, der) = pki.leaf("gw.haven.test", ec_key(nid));
        roundtrip(&c, &der, &pki, &OUR_HASHES, AuthMethod::DIGITAL_SIGNATURE);
        roundtrip(&c, &der, &pki, &[], method);
        assert_eq!(c.sign(b"x", &[]).unwrap().data.len(), len, "r || s");
    }
}

#[test]
fn chains_to_another_ca_or_out_of_validity_are_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let now = Instant::now();
    let (_, der) = pki.leaf("gw.haven.test", rsa_key());
    assert!(pki.trust(now).verify_chain(&der, &[], now).is_ok());
    let e = other.trust(now).verify_chain(&der, &[], now).unwrap_err();
    assert!(e.to_string().contains("does not verify"), "{e}");
    // Eleven days later the leaf (ten days) has expired.
    let later = now + Duration::from_secs(11 * 86400);
    assert!(pki.trust(now).verify_chain(&der, &[], later).is_err());
    let empty = TrustAnchors::from_pem(b"", (now, unix_now())).unwrap();
    assert!(empty.verify_chain(&der, &[], now).is_err());
    assert!(pki
        .trust(now)
        .verify_chain(b"\x30\x03junk", &[], now)
        .is_err());
}

#[test]
fn the_identity_must_be_named_by_the_certificate() {
    let pki = Pki::new();
    let (_, der) = pki.leaf("gw.haven.test", rsa_key());
    assert!(id_in_cert(&IdPayload::fqdn("gw.haven.test"), &der).is_ok());
    assert!(id_in_cert(&IdPayload::fqdn("GW.haven.test"), &der).is_ok());
    assert!(id_in_cert(&IdPayload::fqdn("evil.haven.test"), &der).is_err());
    let cert = X509::from_der(&der).unwrap();
    let dn = IdPayload {
        id_type: IdType::DER_ASN1_DN,
        data: cert.subject_name().to_der().unwrap(),
    };
    assert!(id_in_cert(&dn, &der).is_ok());
    assert!(id_in_cert(&IdPayload::from_ip("192.0.2.1".parse().unwrap()), &der).is_err());
}

#[test]
fn certreq_hashes_the_ca_public_keys_and_mismatched_keys_are_refused() {
    let pki = Pki::new();
    let now = Instant::now();
    assert_eq!(pki.trust(now).certreq().len(), 20);
    let spki = pki.ca.public_key().unwrap().public_key_to_der().unwrap();
    assert_eq!(
        pki.trust(now).certreq(),
        openssl::hash::hash(MessageDigest::sha1(), &spki)
            .unwrap()
            .to_vec()
    );
    let cert = make_cert("a", Some("a"), &rsa_key(), Some((&pki.ca, &pki.ca_key)), 1);
    let e = Credentials::from_pem(
        &cert.to_pem().unwrap(),
        &rsa_key().private_key_to_pem_pkcs8().unwrap(),
    )
    .unwrap_err();
    assert!(matches!(e, CertError::KeyMismatch));
    assert!(Credentials::from_pem(b"nonsense", b"nonsense").is_err());
}

#[test]
fn hash_algorithm_lists_round_trip() {
    assert_eq!(parse_hash_algs(&our_hash_algs()), OUR_HASHES);
    assert_eq!(parse_hash_algs(&[0, 2, 0]), [2]);
}
