//! Named attack-class tests for the ESP core (issue 8; the full list with the
//! counters each one moves is ops/ATTACKS.md). Replay before decryption,
//! padding, Next Header and inner-header length lies are in `sa_tests.rs`
//! (`replay_checked_before_decryption`, `hostile_inputs_map_to_their_errors`).

use crate::fuzzing::sa_pair;
use crate::inner::sample_ipv4;
use crate::{classify_udp4500, DropReason, EspError, Transform, Udp4500};

#[test]
fn attack_truncated_and_oversized_esp_is_dropped_and_counted() {
    // Every length from 0 to past a full packet, and a 64 KiB packet of
    // garbage under the SA's SPI: each is a counted drop, none moves the
    // window, and the genuine packet still passes once.
    for t in Transform::all() {
        let (mut enc, mut dec) = sa_pair(t, false);
        let inner = sample_ipv4(200, 3);
        let mut esp = vec![0u8; 400];
        let n = enc.encapsulate(&inner, &mut esp).unwrap();
        let good = esp[..n].to_vec();
        let mut out = vec![0u8; 70_000];
        let mut dropped = 0;
        for len in 0..n {
            assert!(dec.decapsulate(&good[..len], &mut out).is_err(), "{len}");
            dropped += 1;
        }
        let mut big = good.clone();
        big.resize(65_535, 0x5a);
        let r = dec.decapsulate(&big, &mut out);
        assert!(
            matches!(r, Err(EspError::Auth | EspError::Truncated)),
            "{}: {r:?}",
            t.name()
        );
        dropped += 1;
        let mut longer = good.clone();
        longer.push(0);
        assert!(dec.decapsulate(&longer, &mut out).is_err());
        dropped += 1;
        let counted: u64 = DropReason::ALL.iter().map(|r| dec.drops(*r)).sum();
        assert_eq!(counted, dropped, "{}", t.name());
        assert!(dec.decapsulate(&good, &mut out).is_ok(), "{}", t.name());
        assert_eq!(dec.decapsulate(&good, &mut out), Err(EspError::Replay));
    }
}

#[test]
fn attack_forged_sequence_jump_does_not_move_the_window() {
    // A packet far ahead with a forged ICV must not advance the window
    // (which would make every genuine packet a "replay").
    let (mut enc, mut dec) = sa_pair(Transform::AES128GCM, false);
    let inner = sample_ipv4(60, 1);
    let mut esp = vec![0u8; 200];
    let mut out = vec![0u8; 200];
    let n = enc.encapsulate(&inner, &mut esp).unwrap();
    let good = esp[..n].to_vec();
    for seq in [1_000u32, 4_000_000, u32::MAX] {
        let mut forged = good.clone();
        forged[4..8].copy_from_slice(&seq.to_be_bytes());
        assert_eq!(dec.decapsulate(&forged, &mut out), Err(EspError::Auth));
    }
    assert_eq!(dec.drops(DropReason::Auth), 3);
    assert!(dec.decapsulate(&good, &mut out).is_ok());
}

#[test]
fn attack_nat_keepalive_flood_is_classified_without_state() {
    // RFC 3948 §2.3: a keepalive is one 0xff octet; a flood of them (and of
    // near-keepalives) is classified without allocation or state, and
    // never reaches the ESP or IKE paths.
    let mut keepalives = 0u32;
    let mut truncated = 0u32;
    for i in 0..100_000u32 {
        let d: &[u8] = match i % 4 {
            0 | 1 => &[0xff],
            2 => &[0xff, 0xff],
            _ => &[0, 0, 0],
        };
        match classify_udp4500(d) {
            Ok(Udp4500::Keepalive) => keepalives += 1,
            Err(EspError::Truncated) => truncated += 1,
            other => panic!("{d:?} classified as {other:?}"),
        }
    }
    assert_eq!((keepalives, truncated), (50_000, 50_000));
}
