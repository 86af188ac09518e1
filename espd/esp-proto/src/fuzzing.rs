//! Bodies of the fuzz targets (espd/esp-proto/fuzz), shared with a unit test that runs them
//! over a corpus and deterministic mutations on stable Rust.

use crate::sa::{DecryptSa, EncryptSa, OutboundOptions, SaConfig, SaKeys};
use crate::transform::Transform;
use crate::udp::{classify_udp4500, Udp4500};
use crate::wire::ESP_HEADER_LEN;
use crate::LifetimeConfig;
use std::time::Instant;

/// SPI used by the fuzz SAs.
pub const FUZZ_SPI: u32 = 0x0102_0304;

/// A matching outbound/inbound pair for `transform` with fixed keys.
pub fn sa_pair(transform: Transform, esn: bool) -> (EncryptSa, DecryptSa) {
    let cfg = SaConfig {
        spi: FUZZ_SPI,
        transform,
        esn,
        lifetime: LifetimeConfig::default(),
    };
    let enc: Vec<u8> = (0..transform.enc_keymat_len()).map(|i| i as u8).collect();
    let integ: Vec<u8> = (0..transform.integ_keymat_len())
        .map(|i| 0x80 | i as u8)
        .collect();
    let keys = SaKeys {
        enc: &enc,
        integ: &integ,
    };
    let now = Instant::now();
    // Fixed valid parameters: these constructors cannot fail (a test checks it).
    let e = EncryptSa::new(&cfg, keys, OutboundOptions::default(), now);
    let d = DecryptSa::new(&cfg, keys, 64, now);
    match (e, d) {
        (Ok(e), Ok(d)) => (e, d),
        _ => unreachable!("fixed fuzz SA parameters are valid"),
    }
}

/// Target body: feed `data` as a UDP/4500 payload and, if ESP, to decapsulate; then seal
/// `data` as a raw (hostile) plaintext payload so that padding, Next Header and inner-header
/// checks see arbitrary authenticated input. Panics only on a broken invariant.
pub fn decapsulate_and_classify(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let all = Transform::all();
    let transform = all[usize::from(selector) % all.len()];
    let esn = selector & 0x80 != 0;
    let (mut enc, mut dec) = sa_pair(transform, esn);
    let mut out = vec![0u8; rest.len() + 64];

    // 1. Unauthenticated input.
    if let Ok(Udp4500::Esp(esp)) = classify_udp4500(rest) {
        let _ = dec.decapsulate(esp, &mut out);
    }
    let mut spi_fixed = rest.to_vec();
    if spi_fixed.len() >= 4 {
        spi_fixed[..4].copy_from_slice(&FUZZ_SPI.to_be_bytes());
        if let Ok(d) = dec.decapsulate(&spi_fixed, &mut out) {
            // Forging an ICV from fuzz input is not expected to succeed.
            assert!(d.len <= spi_fixed.len());
        }
    }

    // 2. Authenticated hostile payloads: the trailer and inner checks must hold the line.
    let align = transform.encryption().align();
    let body_len = rest.len().div_ceil(align).max(1) * align;
    let mut payload = rest.to_vec();
    payload.resize(body_len, 0);
    let iv_len = transform.iv_len();
    let iv = vec![7u8; iv_len];
    let mut esp = vec![0u8; ESP_HEADER_LEN + iv_len + body_len + transform.icv_len()];
    let seq = 1 + u64::from(selector);
    if let Ok(n) = enc.seal_payload(seq, &iv, &payload, &mut esp) {
        match dec.decapsulate(&esp[..n], &mut out) {
            Ok(d) => {
                let inner = &out[..d.len];
                assert!(d.is_dummy() || crate::inner::validate_inner(d.next_header, inner).is_ok());
                assert_eq!(d.seq, seq);
            }
            Err(e) => assert_eq!(e.kind(), crate::ErrorKind::PeerMisbehaved, "{e:?}"),
        }
        // A replay of the same authenticated packet never passes.
        assert!(dec.decapsulate(&esp[..n], &mut out).is_err());
    }

    // 3. Round trip of the input as an inner packet when it parses as one.
    let mut esp2 = vec![0u8; rest.len() + transform.max_overhead()];
    if let Ok(n) = enc.encapsulate(rest, &mut esp2) {
        if let Ok(d) = dec.decapsulate(&esp2[..n], &mut out) {
            assert_eq!(&out[..d.len], rest);
        }
    }
}
