//! Bodies of the fuzz targets (espd/esp-proto/fuzz), shared with a unit test that runs them
//! over a corpus and deterministic mutations on stable Rust.

use crate::sa::{DecryptSa, EncryptSa, OutboundOptions, SaConfig, SaKeys};
use crate::transform::Transform;
use crate::udp::{classify_udp4500, write_ike_payload, Udp4500};
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

/// Bit set in the outcome mask of [`decapsulate_and_classify`] when a packet was accepted.
pub const OUTCOME_OK: u32 = 1 << 31;

fn outcome(r: &crate::Result<crate::Decapsulated>) -> u32 {
    match r {
        Ok(_) => OUTCOME_OK,
        Err(e) => 1 << e.drop_reason().index(),
    }
}

/// Target body: feed `data` as a UDP/4500 payload and, if ESP, to decapsulate; then seal
/// `data` as a raw (hostile) plaintext payload so that padding, Next Header and inner-header
/// checks see arbitrary authenticated input. Panics only on a broken invariant. Returns the
/// outcomes seen (bit `DropReason::index()` per error, [`OUTCOME_OK`] for success), so tests
/// can check that every path is reached.
pub fn decapsulate_and_classify(data: &[u8]) -> u32 {
    let mut seen = 0u32;
    let Some((&selector, rest)) = data.split_first() else {
        return seen;
    };
    let all = Transform::all();
    let transform = all[usize::from(selector) % all.len()];
    let esn = selector & 0x80 != 0;
    let (mut enc, mut dec) = sa_pair(transform, esn);
    let mut out = vec![0u8; rest.len() + 64];

    // 1. Unauthenticated input.
    if let Ok(Udp4500::Esp(esp)) = classify_udp4500(rest) {
        seen |= outcome(&dec.decapsulate(esp, &mut out));
    }
    let mut spi_fixed = rest.to_vec();
    if spi_fixed.len() >= 4 {
        spi_fixed[..4].copy_from_slice(&FUZZ_SPI.to_be_bytes());
        let r = dec.decapsulate(&spi_fixed, &mut out);
        seen |= outcome(&r);
        if let Ok(d) = r {
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
        let r = dec.decapsulate(&esp[..n], &mut out);
        seen |= outcome(&r);
        match r {
            Ok(d) => {
                let inner = &out[..d.len];
                assert!(d.is_dummy() || crate::inner::validate_inner(d.next_header, inner).is_ok());
                assert_eq!(d.seq, seq);
            }
            Err(e) => assert_eq!(e.kind(), crate::ErrorKind::PeerMisbehaved, "{e:?}"),
        }
        // A replay of the same authenticated packet never passes.
        let r = dec.decapsulate(&esp[..n], &mut out);
        seen |= outcome(&r);
        assert!(r.is_err());
    }

    // 3. Round trip of the input as an inner packet when it parses as one (fresh SAs, so
    //    the sequence numbers used above do not collide).
    let (mut enc, mut dec) = sa_pair(transform, esn);
    let mut esp2 = vec![0u8; rest.len() + transform.max_overhead()];
    if let Ok(n) = enc.encapsulate(rest, &mut esp2) {
        let r = dec.decapsulate(&esp2[..n], &mut out);
        seen |= outcome(&r);
        if let Ok(d) = r {
            assert_eq!(&out[..d.len], rest);
        }
    }
    seen
}

/// Target body: classify a UDP/4500 payload; IKE messages rebuild to the same bytes, ESP
/// packets carry a non-zero SPI and a full header.
pub fn udp_classify_round_trip(data: &[u8]) {
    match classify_udp4500(data) {
        Ok(Udp4500::Keepalive) => assert_eq!(data, [0xff]),
        Ok(Udp4500::Ike(ike)) => {
            let mut buf = vec![0u8; data.len()];
            assert_eq!(write_ike_payload(ike, &mut buf), Ok(data.len()));
            assert_eq!(buf, data);
        }
        Ok(Udp4500::Esp(esp)) => {
            assert_eq!(esp, data);
            let h = crate::wire::EspHeader::peek(esp);
            assert!(h.is_some_and(|h| h.spi != 0));
        }
        Err(e) => {
            assert_eq!(e, crate::EspError::Truncated);
            assert!(data.len() < ESP_HEADER_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inner::{sample_ipv4, sample_ipv6};

    /// Seeds: for each transform (and ESN), a valid ESP packet for the fuzz SAs behind its
    /// selector byte, plus inner packets and UDP/4500 shapes.
    fn corpus() -> Vec<Vec<u8>> {
        let mut c = Vec::new();
        let all = Transform::all();
        for sel in 0..=255u8 {
            let t = all[usize::from(sel) % all.len()];
            if usize::from(sel & 0x7f) >= all.len() {
                continue;
            }
            let (mut enc, _) = sa_pair(t, sel & 0x80 != 0);
            let inner = if sel % 2 == 0 {
                sample_ipv4(60, 1)
            } else {
                sample_ipv6(80)
            };
            let mut esp = vec![0u8; 200];
            let n = enc.encapsulate(&inner, &mut esp).unwrap();
            let mut seed = vec![sel];
            seed.extend_from_slice(&esp[..n]);
            c.push(seed);
            let mut seed = vec![sel];
            seed.extend_from_slice(&inner);
            c.push(seed);
        }
        c.push(vec![]);
        c.push(vec![0xff]);
        c.push(vec![0, 0, 0, 0, 0, 0x21, 0x20, 0x22]);
        c.push(vec![3, 0xff]);
        c
    }

    /// Deterministic mutations (xorshift): bit flips, byte sets, truncation, extension,
    /// insertion and deletion.
    fn mutate(seed: &[u8], rng: &mut u64) -> Vec<u8> {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        let mut d = seed.to_vec();
        for _ in 0..1 + next() % 4 {
            let r = next();
            let pos = if d.is_empty() {
                0
            } else {
                (next() as usize) % d.len()
            };
            match r % 7 {
                0 if !d.is_empty() => d[pos] ^= 1 << ((r >> 8) % 8),
                1 if !d.is_empty() => d[pos] = [0, 0xff, 1, 4, 41, 59][(r >> 8) as usize % 6],
                2 => d.truncate(pos),
                3 => d.extend(std::iter::repeat_n((r >> 16) as u8, (r >> 8) as usize % 40)),
                4 => d.insert(pos.min(d.len()), (r >> 8) as u8),
                5 if !d.is_empty() => {
                    d.remove(pos);
                }
                _ if d.len() > 2 => {
                    // Touch the tail, where padding and Next Header live.
                    let last = d.len() - 1 - (r as usize >> 8) % 3;
                    d[last] = (r >> 24) as u8;
                }
                _ => {}
            }
        }
        d
    }

    #[test]
    fn fuzz_bodies_over_corpus_and_mutations() {
        use crate::DropReason as R;
        let corpus = corpus();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut seen = 0u32;
        for seed in &corpus {
            seen |= decapsulate_and_classify(seed);
            udp_classify_round_trip(seed);
        }
        // ESP_FUZZ_ITERS raises the count for a longer one-off run.
        let iters = std::env::var("ESP_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6000);
        for i in 0..iters {
            let seed = &corpus[i % corpus.len()];
            let m = mutate(seed, &mut rng);
            seen |= decapsulate_and_classify(&m);
            udp_classify_round_trip(&m);
        }
        // Every packet-level outcome was reached at least once.
        for r in [
            R::Truncated,
            R::Replay,
            R::Auth,
            R::Padding,
            R::NextHeader,
            R::InnerHeader,
            R::SpiMismatch,
        ] {
            assert!(seen & (1 << r.index()) != 0, "never reached {r:?}");
        }
        assert!(seen & OUTCOME_OK != 0);
    }

    #[test]
    fn valid_seed_decapsulates() {
        // The seeds really reach the success path (so mutations start from valid packets).
        let (mut enc, mut dec) = sa_pair(Transform::AES128GCM, false);
        let inner = sample_ipv4(60, 1);
        let mut esp = vec![0u8; 200];
        let n = enc.encapsulate(&inner, &mut esp).unwrap();
        let mut out = vec![0u8; 200];
        assert!(dec.decapsulate(&esp[..n], &mut out).is_ok());
    }
}
