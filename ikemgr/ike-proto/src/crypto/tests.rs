use super::*;
use crate::wire::{ExchangeType, Flags, Message, Payload, IKEV2_VERSION};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn prf_hmac_known_answers() {
    // RFC 2202 §3 (HMAC-SHA-1) test cases 1 and 2.
    let k1 = [0x0bu8; 20];
    assert_eq!(
        Prf::HmacSha1.prf(&k1, b"Hi There").unwrap(),
        hex("b617318655057264e28bc0b6fb378c8ef146be00")
    );
    assert_eq!(
        Prf::HmacSha1
            .prf(b"Jefe", b"what do ya want for nothing?")
            .unwrap(),
        hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
    );
    // RFC 4231 §4.2 (test case 1).
    assert_eq!(
        Prf::HmacSha256.prf(&k1, b"Hi There").unwrap(),
        hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
    );
    assert_eq!(
        Prf::HmacSha384.prf(&k1, b"Hi There").unwrap(),
        hex(
            "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c
             faea9ea9076ede7f4af152e8b2fa9cb6"
        )
    );
    assert_eq!(
        Prf::HmacSha512.prf(&k1, b"Hi There").unwrap(),
        hex(
            "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde
             daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"
        )
    );
    // RFC 4231 §4.3 (test case 2).
    let d2 = b"what do ya want for nothing?";
    assert_eq!(
        Prf::HmacSha256.prf(b"Jefe", d2).unwrap(),
        hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    );
    assert_eq!(
        Prf::HmacSha384.prf(b"Jefe", d2).unwrap(),
        hex(
            "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e
             8e2240ca5e69e2c78b3239ecfab21649"
        )
    );
    assert_eq!(
        Prf::HmacSha512.prf(b"Jefe", d2).unwrap(),
        hex(
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554
             9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        )
    );
    // RFC 4231 §4.7 (test case 6, key longer than the block).
    assert_eq!(
        Prf::HmacSha256
            .prf(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )
            .unwrap(),
        hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
    );
    // RFC 4868 truncation: the ICV is the leading half of the HMAC.
    assert_eq!(
        Integ::HmacSha256_128.mac(&k1, b"Hi There").unwrap(),
        hex("b0344c61d8db38535ca8afceaf0bf12b")
    );
    assert_eq!(Integ::HmacSha1_96.mac(&k1, b"Hi There").unwrap().len(), 12);
}

/// HMAC-SHA-256 from the hash alone (RFC 2104), independent of openssl's HMAC.
fn manual_hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&openssl::sha::sha256(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(data);
    let ih = openssl::sha::sha256(&inner);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&ih);
    openssl::sha::sha256(&outer).to_vec()
}

#[test]
fn prf_plus_and_skeyseed_match_a_hand_built_chain() {
    let ni = hex("0102030405060708090a0b0c0d0e0f10");
    let nr = hex("a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4");
    let gir = vec![0x42u8; 256];
    let spi_i = 0x1111_2222_3333_4444u64;
    let spi_r = 0x5555_6666_7777_8888u64;
    // SKEYSEED = prf(Ni | Nr, g^ir).
    let mut k = ni.clone();
    k.extend_from_slice(&nr);
    let want_seed = manual_hmac_sha256(&k, &gir);
    let seed = skeyseed(Prf::HmacSha256, &ni, &nr, &gir).unwrap();
    assert_eq!(seed.as_bytes(), &want_seed[..]);
    // prf+ by hand: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n).
    let mut s = ni.clone();
    s.extend_from_slice(&nr);
    s.extend_from_slice(&spi_i.to_be_bytes());
    s.extend_from_slice(&spi_r.to_be_bytes());
    let mut stream = Vec::new();
    let mut t = Vec::new();
    for n in 1u8..=8 {
        let mut input = t.clone();
        input.extend_from_slice(&s);
        input.push(n);
        t = manual_hmac_sha256(&want_seed, &input);
        stream.extend_from_slice(&t);
    }
    let keys = derive_ike_keys(
        Prf::HmacSha256,
        Encr::AesCbc(32),
        Some(Integ::HmacSha256_128),
        &seed,
        &ni,
        &nr,
        spi_i,
        spi_r,
    )
    .unwrap();
    let order = [
        &keys.sk_d,
        &keys.sk_ai,
        &keys.sk_ar,
        &keys.sk_ei,
        &keys.sk_er,
        &keys.sk_pi,
        &keys.sk_pr,
    ];
    let lens = [32, 32, 32, 32, 32, 32, 32];
    let mut at = 0;
    for (k, l) in order.iter().zip(lens) {
        assert_eq!(k.as_bytes(), &stream[at..at + l]);
        at += l;
    }
    // The same stream continues past one prf output: prf+ length 100 is a prefix.
    let p = Prf::HmacSha256.prf_plus(&want_seed, &s, 100).unwrap();
    assert_eq!(p.as_bytes(), &stream[..100]);
}

#[test]
fn ike_key_lengths_per_suite() {
    let seed = Secret::new(vec![1; 20]);
    let k = derive_ike_keys(
        Prf::HmacSha384,
        Encr::AesGcm16(32),
        None,
        &seed,
        b"n",
        b"m",
        1,
        2,
    )
    .unwrap();
    assert_eq!(k.sk_d.len(), 48);
    assert!(k.sk_ai.is_empty());
    assert_eq!(k.sk_ei.len(), 36);
    assert_eq!(k.sk_pr.len(), 48);
    let c = derive_child_keys(
        Prf::HmacSha1,
        &[7; 20],
        None,
        b"a",
        b"b",
        Encr::AesCbc(16),
        Some(Integ::HmacSha1_96),
    )
    .unwrap();
    assert_eq!(
        (
            c.encr_i.len(),
            c.integ_i.len(),
            c.encr_r.len(),
            c.integ_r.len()
        ),
        (16, 20, 16, 20)
    );
    // PFS changes the keys.
    let c2 = derive_child_keys(
        Prf::HmacSha1,
        &[7; 20],
        Some(&[9; 32]),
        b"a",
        b"b",
        Encr::AesCbc(16),
        Some(Integ::HmacSha1_96),
    )
    .unwrap();
    assert_ne!(c.encr_i, c2.encr_i);
    // Debug never shows key bytes.
    let dbg = format!("{c:?}");
    assert!(dbg.contains("redacted") && !dbg.contains("encr_i: Secret(["));
}

#[test]
fn ecp256_rfc5903_known_answer() {
    // RFC 5903 §8.1.
    let i = hex("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433");
    let gi = hex(
        "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180
         5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3",
    );
    let r = hex("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53");
    let gr = hex(
        "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63
         56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB",
    );
    let girx = hex("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE");
    let ki = KeyExchange::from_private(DhGroup::ECP256, &i).unwrap();
    let kr = KeyExchange::from_private(DhGroup::ECP256, &r).unwrap();
    assert_eq!(ki.public_value(), &gi[..]);
    assert_eq!(kr.public_value(), &gr[..]);
    assert_eq!(ki.compute_shared(&gr).unwrap().as_bytes(), &girx[..]);
    assert_eq!(kr.compute_shared(&gi).unwrap().as_bytes(), &girx[..]);
    // Off-curve: y + 1.
    let mut bad = gr.clone();
    bad[63] ^= 1;
    assert!(matches!(
        ki.compute_shared(&bad),
        Err(CryptoError::InvalidPublicValue(_))
    ));
    assert!(matches!(
        ki.compute_shared(&[0; 64]),
        Err(CryptoError::InvalidPublicValue(_))
    ));
    assert!(matches!(
        ki.compute_shared(&gr[..63]),
        Err(CryptoError::InvalidPublicValue(_))
    ));
    assert!(matches!(
        ki.compute_shared(&[0x04; 65]),
        Err(CryptoError::InvalidPublicValue(_))
    ));
}

#[test]
fn x25519_rfc7748_known_answer() {
    // RFC 7748 §6.1.
    let a = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    let a_pub = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let b = hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
    let b_pub = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let k = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    let ka = KeyExchange::from_private(DhGroup::CURVE25519, &a).unwrap();
    let kb = KeyExchange::from_private(DhGroup::CURVE25519, &b).unwrap();
    assert_eq!(ka.public_value(), &a_pub[..]);
    assert_eq!(kb.public_value(), &b_pub[..]);
    assert_eq!(ka.compute_shared(&b_pub).unwrap().as_bytes(), &k[..]);
    assert_eq!(kb.compute_shared(&a_pub).unwrap().as_bytes(), &k[..]);
    // Low-order point (all zero) and wrong length are refused.
    assert!(matches!(
        ka.compute_shared(&[0; 32]),
        Err(CryptoError::InvalidPublicValue(_))
    ));
    let mut one = [0u8; 32];
    one[0] = 1;
    assert!(matches!(
        ka.compute_shared(&one),
        Err(CryptoError::InvalidPublicValue(_))
    ));
    assert!(matches!(
        ka.compute_shared(&[9; 31]),
        Err(CryptoError::InvalidPublicValue(_))
    ));
}

#[test]
fn every_group_agrees_and_has_the_right_length() {
    for g in SUPPORTED_GROUPS {
        let a = KeyExchange::generate(g).unwrap();
        let b = KeyExchange::generate(g).unwrap();
        assert_eq!(a.public_value().len(), public_len(g).unwrap(), "{g:?}");
        let s1 = a.compute_shared(b.public_value()).unwrap();
        let s2 = b.compute_shared(a.public_value()).unwrap();
        assert_eq!(s1, s2, "{g:?}");
        assert!(!s1.is_empty());
        assert!(a.compute_shared(&b.public_value()[1..]).is_err(), "{g:?}");
    }
}

#[test]
fn modp_rejects_weak_public_values() {
    let k = KeyExchange::generate(DhGroup::MODP2048).unwrap();
    let p = BigNum::get_rfc3526_prime_2048().unwrap();
    let pad = |n: &BigNum| n.to_vec_padded(256).unwrap();
    let one = BigNum::from_u32(1).unwrap();
    let two = BigNum::from_u32(2).unwrap();
    let mut pm1 = BigNum::new().unwrap();
    pm1.checked_sub(&p, &one).unwrap();
    let mut pm2 = BigNum::new().unwrap();
    pm2.checked_sub(&p, &two).unwrap();
    for bad in [
        vec![0u8; 256],
        pad(&one),
        pad(&pm1),
        pad(&p),
        vec![0xff; 256],
        pad(&pm2), // -2 is a non-residue: outside the order-q subgroup
    ] {
        assert!(
            matches!(
                k.compute_shared(&bad),
                Err(CryptoError::InvalidPublicValue(_))
            ),
            "accepted a weak value"
        );
    }
    // 2 (the generator) is fine.
    assert!(k.compute_shared(&pad(&two)).is_ok());
}

fn header() -> Header {
    Header {
        spi_i: 1,
        spi_r: 2,
        next_payload: PayloadType::NONE,
        version: IKEV2_VERSION,
        exchange: ExchangeType::INFORMATIONAL,
        flags: Flags::new(true, false),
        message_id: 7,
        length: 0,
    }
}

#[test]
fn sk_payload_round_trip_and_tamper_detection() {
    let suites: [(Encr, Option<Integ>); 7] = [
        (Encr::AesCbc(16), Some(Integ::HmacSha1_96)),
        (Encr::AesCbc(32), Some(Integ::HmacSha256_128)),
        (Encr::AesCbc(32), Some(Integ::HmacSha384_192)),
        (Encr::AesCbc(16), Some(Integ::HmacSha512_256)),
        (Encr::AesGcm16(16), None),
        (Encr::AesGcm16(32), None),
        (Encr::ChaCha20Poly1305, None),
    ];
    for (encr, integ) in suites {
        let ek = Secret::new((0..encr.keymat_len() as u8).collect());
        let ik = Secret::new(vec![0x33; integ.map(Integ::key_len).unwrap_or(0)]);
        let c = SkCipher::new(encr, integ, ek, ik);
        for inner_len in [0usize, 1, 15, 16, 17, 100] {
            let inner: Vec<u8> = (0..inner_len as u8).collect();
            let iv = vec![0x5a; encr.iv_len()];
            let msg = c.seal(&header(), PayloadType::NOTIFY, &inner, &iv).unwrap();
            let m = Message::decode(&msg).unwrap();
            assert_eq!(m.header.length as usize, msg.len());
            assert!(matches!(
                m.payloads[0],
                Payload::Sk {
                    first_inner: PayloadType::NOTIFY,
                    ..
                }
            ));
            let off = m.sk_offset.unwrap();
            assert_eq!(c.open(&msg, off).unwrap(), inner, "{encr:?}");
            // Flip one bit anywhere: header, IV, ciphertext or ICV.
            for pos in [0, 20, off + 1, off + 4, msg.len() / 2 + 16, msg.len() - 1] {
                let mut t = msg.clone();
                t[pos.min(msg.len() - 1)] ^= 0x01;
                assert!(c.open(&t, off).is_err(), "{encr:?} tamper at {pos}");
            }
        }
        // A different key fails.
        let other = SkCipher::new(
            encr,
            integ,
            Secret::new(vec![9; encr.keymat_len()]),
            Secret::new(vec![9; integ.map(Integ::key_len).unwrap_or(0)]),
        );
        let msg = c
            .seal(
                &header(),
                PayloadType::NOTIFY,
                b"abc",
                &vec![1; encr.iv_len()],
            )
            .unwrap();
        assert!(matches!(
            other.open(&msg, 28),
            Err(CryptoError::IntegrityCheckFailed)
        ));
        // Too short to hold IV and ICV.
        assert!(c.open(&msg[..40], 28).is_err());
    }
}

#[test]
fn aes_gcm_matches_rfc4106_layout() {
    // Independent check of nonce = salt | IV and AAD = header | SK header:
    // decrypt with openssl directly.
    let ek = Secret::new((1..=20).collect());
    let c = SkCipher::new(Encr::AesGcm16(16), None, ek.clone(), Secret::default());
    let iv = [7u8; 8];
    let msg = c
        .seal(&header(), PayloadType::DELETE, b"hello", &iv)
        .unwrap();
    let mut nonce = ek.as_bytes()[16..20].to_vec();
    nonce.extend_from_slice(&iv);
    let body = &msg[32 + 8..msg.len() - 16];
    let pt = openssl::symm::decrypt_aead(
        Cipher::aes_128_gcm(),
        &ek.as_bytes()[..16],
        Some(&nonce),
        &msg[..32],
        body,
        &msg[msg.len() - 16..],
    )
    .unwrap();
    assert_eq!(pt, b"hello\0");
}
