//! One named test per attack class that hit other IKEv2 implementations
//! (issue 8; the list with the expected answer of each is ops/ATTACKS.md).
//! Each drives the responder through the same driver as the fuzz target
//! ([`super::fuzz::Harness`]: CookieGuard, SPI routing, the SA's real
//! keys for forgeries) and checks the RFC's answer or a drop (an `Err`,
//! which ikemgr counts in `ikemgr_drops_total{reason}` by
//! [`IkeError::kind`]), and that no state changed.

use super::fuzz::Harness;
use super::*;
use crate::cookie::{CookieGuard, GuardConfig, Verdict};
use crate::proposal::ike_proposals;
use crate::wire::{TransformType, TsType};

fn peer() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 500))
}

/// An established responder (AES-GCM, x25519, PFS with group 31).
fn established() -> Harness {
    let mut h = Harness::new(1).unwrap();
    h.settle();
    assert!(h.resp.as_ref().unwrap().is_established());
    assert_eq!(h.live.len(), 1);
    h
}

fn resp(h: &Harness) -> &IkeSa {
    h.resp.as_ref().unwrap()
}

/// (message IDs, CHILD SAs, established) of the responder.
fn state(h: &Harness) -> ((u32, u32), Vec<u32>, bool) {
    let r = resp(h);
    (r.message_ids(), r.child_spis(), r.is_established())
}

/// Decrypts the responder's last answer with the SA's keys.
fn answer(h: &mut Harness) -> Vec<Payload> {
    let t = h.to_init.pop_back().expect("an answer");
    let m = Message::decode(&t.payload).unwrap();
    resp(h).decrypt_as_peer(&t.payload, &m).unwrap()
}

impl IkeSa {
    /// Test helper: opens a message we sent, with the peer's view of the keys.
    fn decrypt_as_peer(&self, data: &[u8], msg: &Message) -> Option<Vec<Payload>> {
        let keys = self.chan.keys.as_ref()?;
        let (first, off) = match (msg.payloads.last(), msg.sk_offset) {
            (Some(Payload::Sk { first_inner, .. }), Some(off)) => (*first_inner, off),
            _ => return None,
        };
        let inner = keys.out.open(data, off).ok()?;
        decode_chain(first, &inner).ok().map(|x| x.0)
    }
}

fn has_notify(p: &[Payload], ty: NotifyType) -> bool {
    find_notify(p, ty).is_some()
}

/// A first IKE_SA_INIT request offering `group` with this KE value.
fn init_request(h: &Harness, spi_i: u64, group: DhGroup, ke: Vec<u8>) -> Message {
    Message {
        header: Header {
            spi_i,
            spi_r: 0,
            next_payload: PayloadType::NONE,
            version: IKEV2_VERSION,
            exchange: ExchangeType::IKE_SA_INIT,
            flags: Flags::new(true, false),
            message_id: 0,
            length: 0,
        },
        payloads: vec![
            Payload::Sa(ike_proposals(&h.resp_cfg.ike_proposals, &[group], &[])),
            Payload::Ke(KePayload { group, data: ke }),
            Payload::Nonce(vec![7; 32]),
        ],
        sk_offset: None,
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn attack_ike_sa_init_flood_engages_cookies_and_bounds_half_open() {
    // RFC 7296 §2.6: spoofed IKE_SA_INIT from 2000 sources. Above the
    // threshold every new source gets a stateless COOKIE request; no more
    // than the threshold of SAs is ever half-open; an honest initiator
    // still gets through by returning the cookie.
    let h = Harness::new(0).unwrap();
    let now = h.now;
    let cfg = GuardConfig::default();
    let mut guard = CookieGuard::new(now, cfg.clone(), &mut OsEntropy).unwrap();
    let mut half_open = Vec::new();
    let mut cookies = 0;
    for i in 0..2000u32 {
        let from = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 500));
        let req = init_request(&h, 0x1000 + u64::from(i), DhGroup::CURVE25519, {
            KeyExchange::generate(DhGroup::CURVE25519)
                .unwrap()
                .public_value()
                .to_vec()
        })
        .encode();
        match guard.check(now, from, &req, &mut OsEntropy) {
            Verdict::Accept => {
                let addrs = Addresses {
                    local: SocketAddr::from(([198, 51, 100, 2], 500)),
                    remote: from,
                };
                match IkeSa::accept(now, h.resp_cfg.clone(), addrs, Box::new(OsEntropy), &req) {
                    Ok(Accepted::Sa(sa)) => {
                        guard.half_open_started(from.ip());
                        half_open.push((from.ip(), sa));
                    }
                    other => panic!("honest-looking request refused: {:?}", other.err()),
                }
            }
            Verdict::Reply(_) => cookies += 1,
            Verdict::Drop(why) => panic!("dropped {why:?}"),
        }
    }
    assert_eq!(half_open.len(), cfg.cookie_threshold);
    assert_eq!(guard.half_open(), cfg.cookie_threshold);
    assert_eq!(cookies, 2000 - cfg.cookie_threshold);
    assert_eq!(guard.stats().cookies_sent, cookies as u64);
    // One source cannot hold more than its share either.
    let one = SocketAddr::from(([10, 0, 0, 0], 500));
    for _ in 0..cfg.max_half_open_per_source {
        guard.half_open_started(one.ip());
    }
    let req = init_request(&h, 0xdead, DhGroup::CURVE25519, vec![9; 32]).encode();
    assert_eq!(
        guard.check(now, one, &req, &mut OsEntropy),
        Verdict::Drop(crate::cookie::DropReason::PerSourceLimit)
    );
    assert_eq!(guard.stats().dropped_per_source, 1);
    // The half-open SAs give up on their own (no IKE_AUTH ever comes).
    let later = now + Duration::from_secs(120);
    for (ip, sa) in &mut half_open {
        sa.handle_timeout(later);
        assert!(sa.is_closed());
        guard.half_open_finished(*ip);
    }
    for _ in 0..cfg.max_half_open_per_source {
        guard.half_open_finished(one.ip());
    }
    assert_eq!(guard.half_open(), 0);
    // The honest path with a COOKIE round is covered end to end by the
    // harness with `cookie_threshold` 0:
    let mut h = Harness::new(8).unwrap();
    h.settle();
    assert!(resp(&h).is_established());
    assert_eq!(h.guard.stats().cookies_sent, 1);
}

#[test]
fn attack_degenerate_dh_public_values_are_refused() {
    // RFC 6989 §2, RFC 7748 §6.1, RFC 8031 §2.3: 0, 1, p-1, p, points off
    // the curve and small-order points. IKE_SA_INIT: no SA, an error.
    let h = Harness::new(0).unwrap();
    let p2048 = {
        // p - 1 and p of MODP-2048 (RFC 3526 §3): top and bottom 64 bits are ones.
        let kex = KeyExchange::generate(DhGroup::MODP2048).unwrap();
        let n = kex.public_value().len();
        let p = crate::crypto::tests_modp_prime(DhGroup::MODP2048).unwrap();
        assert_eq!(p.len(), n);
        let mut pm1 = p.clone();
        *pm1.last_mut().unwrap() -= 1;
        vec![p, pm1]
    };
    let mut one = vec![0; 256];
    one[255] = 1;
    let mut cases: Vec<(DhGroup, Vec<u8>)> = vec![
        (DhGroup::MODP2048, vec![0; 256]),
        (DhGroup::MODP2048, one),
        (DhGroup::MODP2048, vec![0xff; 256]),
        (DhGroup::MODP2048, vec![0; 255]),
        (DhGroup::ECP256, vec![0; 64]),
        (DhGroup::ECP256, {
            let mut v = vec![0; 64];
            v[31] = 1;
            v[63] = 1;
            v
        }),
        (DhGroup::ECP256, vec![1; 63]),
        (DhGroup::CURVE25519, vec![0; 32]),
        (DhGroup::CURVE25519, {
            let mut v = vec![0; 32];
            v[0] = 1;
            v
        }),
        (
            DhGroup::CURVE25519,
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        ),
        (
            DhGroup::CURVE25519,
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        ),
        (
            DhGroup::CURVE25519,
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ),
    ];
    for v in p2048 {
        cases.push((DhGroup::MODP2048, v));
    }
    let mut cfg = (*h.resp_cfg).clone();
    cfg.ike_groups = vec![DhGroup::CURVE25519, DhGroup::ECP256, DhGroup::MODP2048];
    let cfg = Arc::new(cfg);
    for (i, (group, ke)) in cases.iter().enumerate() {
        let req = init_request(&h, 0x100 + i as u64, *group, ke.clone()).encode();
        let addrs = Addresses {
            local: SocketAddr::from(([198, 51, 100, 2], 500)),
            remote: peer(),
        };
        let r = IkeSa::accept(h.now, cfg.clone(), addrs, Box::new(OsEntropy), &req);
        assert!(
            matches!(r, Err(IkeError::Crypto(_))),
            "case {i} ({group:?}) not refused: {:?}",
            r.map(|_| ()).err()
        );
    }
    // The same values in a CREATE_CHILD_SA with PFS: answered with
    // INVALID_KE_PAYLOAD, nothing installed, the SA stays.
    let mut h = established();
    let before = state(&h);
    for ke in [
        vec![0; 32],
        hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ] {
        let (mid, _) = h.mids(false);
        let sa = crate::proposal::esp_proposals(
            &h.resp_cfg.esp_proposals,
            &[DhGroup::CURVE25519],
            0x1111_2222,
        );
        let any = TrafficSelector::subnet(IpAddr::from([0, 0, 0, 0]), 0);
        let d = h
            .forge_payloads(
                false,
                ExchangeType::CREATE_CHILD_SA,
                mid,
                false,
                &[
                    Payload::Sa(sa),
                    Payload::Nonce(vec![3; 32]),
                    Payload::Ke(KePayload {
                        group: DhGroup::CURVE25519,
                        data: ke,
                    }),
                    Payload::TsI(vec![any.clone()]),
                    Payload::TsR(vec![any]),
                ],
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        let a = answer(&mut h);
        assert!(has_notify(&a, NotifyType::INVALID_KE_PAYLOAD), "{a:?}");
    }
    let after = state(&h);
    assert_eq!((after.1, after.2), (before.1, before.2));
    assert_eq!(h.live.len(), 1);
}

#[test]
fn attack_replayed_messages_change_nothing() {
    // §2.1: a replayed request gets the cached response byte for byte
    // and is not processed again; a replay of an older request or of the
    // IKE_SA_INIT after establishment is dropped without an answer.
    let mut h = established();
    let (mid, _) = h.mids(false);
    let d = h
        .forge_payloads(false, ExchangeType::INFORMATIONAL, mid, false, &[])
        .unwrap();
    h.deliver(peer(), 500, &d).unwrap();
    let first = h.to_init.pop_back().unwrap().payload;
    let before = state(&h);
    for _ in 0..3 {
        h.deliver(peer(), 500, &d).unwrap();
        assert_eq!(h.to_init.pop_back().unwrap().payload, first);
    }
    assert_eq!(state(&h), before);
    // Every earlier datagram of the conversation, again.
    let history = h.history.clone();
    for old in &history[..history.len() - 4] {
        assert!(h.deliver(peer(), 500, old).is_err());
        assert!(h.to_init.is_empty(), "no answer to an old replay");
    }
    assert_eq!(state(&h), before);
}

#[test]
fn attack_message_id_far_outside_the_window_is_dropped() {
    // §2.3: requests outside the window and responses to nothing are
    // dropped without an answer (INVALID_MESSAGE_ID is never sent for them).
    let mut h = established();
    let before = state(&h);
    let (next, ours) = h.mids(false);
    for (mid, response) in [
        (next + 1, false),
        (next + 1000, false),
        (u32::MAX, false),
        (next.wrapping_sub(5), false),
        (ours.wrapping_add(1), true),
        (u32::MAX, true),
    ] {
        let d = h
            .forge_payloads(false, ExchangeType::INFORMATIONAL, mid, response, &[])
            .unwrap();
        let r = h.deliver(peer(), 500, &d);
        assert!(
            matches!(
                r,
                Err(IkeError::InvalidMessageId { .. } | IkeError::Unexpected(_))
            ),
            "{mid} {response}: {r:?}"
        );
        assert!(h.to_init.is_empty());
    }
    assert_eq!(state(&h), before);
}

#[test]
fn attack_length_fields_that_lie_are_dropped() {
    // §3.1-§3.3: header length, payload lengths, proposal, transform and
    // attribute lengths, and a KE whose data does not match its group.
    let mut h = Harness::new(0).unwrap();
    let honest = h.to_resp.pop_front().unwrap().payload;
    let mut lies: Vec<Vec<u8>> = Vec::new();
    // Header length (octets 24..28): too short, too long, huge.
    for len in [
        0u32,
        27,
        honest.len() as u32 - 1,
        honest.len() as u32 + 1,
        u32::MAX,
    ] {
        let mut d = honest.clone();
        d[24..28].copy_from_slice(&len.to_be_bytes());
        lies.push(d);
    }
    // Each payload's length field (octets 2..4 of its generic header).
    let mut off = 28;
    while off + 4 <= honest.len() {
        let len = usize::from(u16::from_be_bytes([honest[off + 2], honest[off + 3]]));
        for bad in [0u16, 3, 0xffff, len as u16 + 1] {
            let mut d = honest.clone();
            d[off + 2..off + 4].copy_from_slice(&bad.to_be_bytes());
            lies.push(d);
        }
        if len < 4 {
            break;
        }
        off += len;
    }
    // SA payload: proposal length, transform length, attribute length lies.
    // The SA payload is first: proposal header at 32, transforms from 40.
    for (at, v) in [
        (34usize, 0xffffu16),
        (34, 4),
        (42, 0xffff),
        (42, 3),
        (48, 0x0000),
    ] {
        let mut d = honest.clone();
        d[at..at + 2].copy_from_slice(&v.to_be_bytes());
        lies.push(d);
    }
    // A DH public value shorter and longer than its group's.
    for n in [0usize, 31, 33, 300] {
        lies.push(init_request(&h, 0x77, DhGroup::CURVE25519, vec![9; n]).encode());
    }
    // A nonce shorter than 16 or longer than 256 octets (§3.9).
    for n in [0usize, 15, 257] {
        let mut m = init_request(&h, 0x78, DhGroup::CURVE25519, vec![9; 32]);
        m.payloads[2] = Payload::Nonce(vec![1; n]);
        lies.push(m.encode());
    }
    for (i, d) in lies.iter().enumerate() {
        let r = h.deliver(peer(), 500, d);
        assert!(r.is_err(), "lie {i} accepted: {:?}", h.to_init);
        assert!(h.resp.is_none(), "lie {i} made an SA");
    }
    assert_eq!(h.guard.half_open(), 0);
    // The honest request still works afterwards.
    h.deliver(peer(), 500, &honest).unwrap();
    assert!(h.resp.is_some());
}

#[test]
fn attack_inner_length_lies_in_encrypted_payloads_are_invalid_syntax() {
    // An authenticated message whose inner chain lies about a length is
    // answered INVALID_SYNTAX (§3.10.1) and changes nothing else.
    let mut h = established();
    let before = state(&h);
    for inner in [
        vec![0u8, 0, 0, 2],
        vec![0u8, 0, 0xff, 0xff, 1, 2],
        vec![0u8, 0, 0, 8, 1, 2, 3],
    ] {
        let (mid, _) = h.mids(false);
        let d = h
            .forge(
                false,
                ExchangeType::INFORMATIONAL,
                mid,
                false,
                PayloadType::DELETE,
                &inner,
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        assert!(has_notify(&answer(&mut h), NotifyType::INVALID_SYNTAX));
    }
    let after = state(&h);
    assert_eq!((after.1, after.2), (before.1, before.2));
}

#[test]
fn attack_requests_in_the_wrong_state_are_refused() {
    // An encrypted INFORMATIONAL or CREATE_CHILD_SA before IKE_AUTH
    // completed: answered INVALID_SYNTAX, nothing established, no CHILD SA.
    for exchange in [ExchangeType::INFORMATIONAL, ExchangeType::CREATE_CHILD_SA] {
        let mut h = Harness::new(1).unwrap();
        let t = h.to_resp.pop_front().unwrap();
        h.deliver(t.source, 500, &t.payload).unwrap();
        h.to_init.clear();
        assert!(!resp(&h).is_established());
        let d = h
            .forge_payloads(false, exchange, 1, false, &[Payload::Nonce(vec![1; 32])])
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        assert!(has_notify(&answer(&mut h), NotifyType::INVALID_SYNTAX));
        assert!(!resp(&h).is_established());
        assert!(h.live.is_empty());
        assert!(!h
            .events
            .iter()
            .any(|e| matches!(e, Event::IkeSaEstablished(_))));
    }
    // An IKE_AUTH for an SA that is already established: dropped.
    let mut h = established();
    let before = state(&h);
    let (mid, _) = h.mids(false);
    let d = h
        .forge_payloads(
            false,
            ExchangeType::IKE_AUTH,
            mid,
            false,
            &[Payload::IdI(IdPayload::fqdn("mallory"))],
        )
        .unwrap();
    assert!(matches!(
        h.deliver(peer(), 500, &d),
        Err(IkeError::Unexpected(_))
    ));
    assert!(h.to_init.is_empty());
    assert_eq!(state(&h), before);
}

#[test]
fn attack_forged_and_repeated_deletes() {
    let mut h = established();
    let (&inb, &outb) = h.live.iter().next().unwrap();
    // Forged without the keys: the ICV fails, the CHILD SA stays.
    let (mid, _) = h.mids(false);
    let mut d = h
        .forge_payloads(
            false,
            ExchangeType::INFORMATIONAL,
            mid,
            false,
            &[Payload::Delete(DeletePayload {
                protocol: ProtocolId::ESP,
                spi_size: 4,
                spis: vec![outb.to_be_bytes().to_vec()],
            })],
        )
        .unwrap();
    let n = d.len();
    d[n - 1] ^= 1;
    assert!(matches!(
        h.deliver(peer(), 500, &d),
        Err(IkeError::Integrity)
    ));
    assert_eq!(h.live.len(), 1);
    // Authenticated deletes of SPIs we do not have (also our own inbound
    // SPI, which is not the one the peer names): answered, nothing removed.
    for spi in [0x0bad_0bad_u32, inb] {
        let (mid, _) = h.mids(false);
        let d = h
            .forge_payloads(
                false,
                ExchangeType::INFORMATIONAL,
                mid,
                false,
                &[Payload::Delete(DeletePayload {
                    protocol: ProtocolId::ESP,
                    spi_size: 4,
                    spis: vec![spi.to_be_bytes().to_vec()],
                })],
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        answer(&mut h);
        assert_eq!(h.live.len(), 1, "delete of {spi:08x} removed a CHILD SA");
    }
    // The real delete, then the same delete again in a new request:
    // one ChildSaDeleted (the harness fails on a second one).
    for round in 0..2 {
        let (mid, _) = h.mids(false);
        let d = h
            .forge_payloads(
                false,
                ExchangeType::INFORMATIONAL,
                mid,
                false,
                &[Payload::Delete(DeletePayload {
                    protocol: ProtocolId::ESP,
                    spi_size: 4,
                    spis: vec![outb.to_be_bytes().to_vec()],
                })],
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        let a = answer(&mut h);
        if round == 0 {
            assert!(matches!(&a[..], [Payload::Delete(_)]), "{a:?}");
        } else {
            assert!(a.is_empty(), "{a:?}");
        }
    }
    assert!(h.live.is_empty());
    assert!(resp(&h).is_established());
    // A delete with a lying SPI size or protocol: no CHILD SA removed, no panic.
    let mut h = established();
    for (protocol, spi_size, spi) in [
        (ProtocolId::ESP, 8u8, vec![0u8; 8]),
        (ProtocolId::ESP, 0, vec![]),
        (ProtocolId::AH, 4, vec![1, 2, 3, 4]),
        (ProtocolId(9), 4, vec![1, 2, 3, 4]),
    ] {
        let (mid, _) = h.mids(false);
        let d = h
            .forge_payloads(
                false,
                ExchangeType::INFORMATIONAL,
                mid,
                false,
                &[Payload::Delete(DeletePayload {
                    protocol,
                    spi_size,
                    spis: vec![spi],
                })],
            )
            .unwrap();
        let _ = h.deliver(peer(), 500, &d);
        h.to_init.clear();
    }
    assert_eq!(h.live.len(), 1);
    assert!(resp(&h).is_established());
}

#[test]
fn attack_rekey_sa_with_protocol_ike_or_none_rekeys_nothing() {
    // A REKEY_SA notify whose protocol id is 0 or 1 (not ESP/AH): no
    // CHILD SA is replaced, and the exchange is answered with an error.
    let mut h = established();
    let (&inb, &outb) = h.live.iter().next().unwrap();
    let any = TrafficSelector::subnet(IpAddr::from([0, 0, 0, 0]), 0);
    for protocol in [ProtocolId::NONE, ProtocolId::IKE] {
        let (mid, _) = h.mids(false);
        let ke = KeyExchange::generate(DhGroup::CURVE25519).unwrap();
        let d = h
            .forge_payloads(
                false,
                ExchangeType::CREATE_CHILD_SA,
                mid,
                false,
                &[
                    Payload::Notify(NotifyPayload {
                        protocol,
                        spi: outb.to_be_bytes().to_vec(),
                        ty: NotifyType::REKEY_SA,
                        data: Vec::new(),
                    }),
                    Payload::Sa(crate::proposal::esp_proposals(
                        &h.resp_cfg.esp_proposals,
                        &[DhGroup::CURVE25519],
                        0x4444_5555,
                    )),
                    Payload::Nonce(vec![3; 32]),
                    Payload::Ke(KePayload {
                        group: DhGroup::CURVE25519,
                        data: ke.public_value().to_vec(),
                    }),
                    Payload::TsI(vec![any.clone()]),
                    Payload::TsR(vec![any.clone()]),
                ],
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        let a = answer(&mut h);
        assert!(
            a.iter()
                .any(|p| matches!(p, Payload::Notify(n) if n.ty.0 < 16384)),
            "{protocol:?}: expected an error notify, got {a:?}"
        );
        assert_eq!(h.live.keys().copied().collect::<Vec<_>>(), vec![inb]);
    }
    assert!(!h.events.iter().any(|e| matches!(
        e,
        Event::ChildSaEstablished(c) if c.rekey_of.is_some()
    )));
}

#[test]
fn attack_ike_fragments_are_dropped_without_state() {
    // RFC 7383 is not negotiated: SKF payloads (any fragment count, with
    // unknown outer payloads in front, in IKE_SA_INIT or later) are
    // dropped and nothing is buffered.
    let mut h = established();
    let before = state(&h);
    let (spi_i, spi_r) = resp(&h).spis();
    let (mid, _) = h.mids(false);
    for (outer, total) in [(0usize, 65535u16), (2, 2), (1, 1)] {
        for fragment in 1..=20u16 {
            let mut payloads: Vec<Payload> = (0..outer)
                .map(|i| Payload::Unknown {
                    ty: PayloadType(200 + i as u8),
                    critical: false,
                    data: vec![0; 8],
                })
                .collect();
            payloads.push(Payload::Skf {
                first_inner: PayloadType::DELETE,
                fragment,
                total,
                body: vec![0x42; 1200],
            });
            let d = Message {
                header: Header {
                    spi_i,
                    spi_r,
                    next_payload: PayloadType::NONE,
                    version: IKEV2_VERSION,
                    exchange: ExchangeType::INFORMATIONAL,
                    flags: Flags::new(true, false),
                    message_id: mid,
                    length: 0,
                },
                payloads,
                sk_offset: None,
            }
            .encode();
            assert!(h.deliver(peer(), 500, &d).is_err());
            assert!(h.to_init.is_empty());
        }
    }
    assert_eq!(state(&h), before);
    // In a first IKE_SA_INIT: no SA.
    let mut h = Harness::new(0).unwrap();
    let mut m = init_request(&h, 0x99, DhGroup::CURVE25519, vec![9; 32]);
    m.payloads.push(Payload::Skf {
        first_inner: PayloadType::NONE,
        fragment: 1,
        total: 65535,
        body: vec![0; 64],
    });
    let _ = h.deliver(peer(), 500, &m.encode());
    assert!(h.resp.is_none());
}

#[test]
fn attack_proposal_without_dh_group_is_no_proposal_chosen() {
    // §3.3.2: IKE proposals must carry a DH transform; a request without
    // one gets a stateless NO_PROPOSAL_CHOSEN and leaves no SA.
    let mut h = Harness::new(0).unwrap();
    let mut m = init_request(&h, 0x42, DhGroup::CURVE25519, vec![9; 32]);
    if let Payload::Sa(props) = &mut m.payloads[0] {
        for p in props.iter_mut() {
            p.transforms.retain(|t| t.ty != TransformType::DH);
        }
    }
    h.deliver(peer(), 500, &m.encode()).unwrap();
    assert!(h.resp.is_none());
    let reply = Message::decode(&h.to_init.pop_back().unwrap().payload).unwrap();
    assert!(has_notify(&reply.payloads, NotifyType::NO_PROPOSAL_CHOSEN));
    assert_eq!(h.guard.half_open(), 0);
}

#[test]
fn attack_unknown_critical_payloads_are_refused() {
    // §2.5: UNSUPPORTED_CRITICAL_PAYLOAD with the type, in IKE_SA_INIT
    // (stateless) and inside SK; non-critical unknown payloads are skipped.
    let mut h = Harness::new(0).unwrap();
    let mut m = init_request(&h, 0x43, DhGroup::CURVE25519, vec![9; 32]);
    m.payloads.push(Payload::Unknown {
        ty: PayloadType(222),
        critical: true,
        data: vec![1],
    });
    h.deliver(peer(), 500, &m.encode()).unwrap();
    assert!(h.resp.is_none());
    let reply = Message::decode(&h.to_init.pop_back().unwrap().payload).unwrap();
    assert!(matches!(&reply.payloads[..], [Payload::Notify(n)]
        if n.ty == NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD && n.data == vec![222]));
    let mut h = established();
    let before = state(&h);
    for critical in [true, false] {
        let (mid, _) = h.mids(false);
        let d = h
            .forge_payloads(
                false,
                ExchangeType::INFORMATIONAL,
                mid,
                false,
                &[Payload::Unknown {
                    ty: PayloadType(222),
                    critical,
                    data: vec![1],
                }],
            )
            .unwrap();
        h.deliver(peer(), 500, &d).unwrap();
        let a = answer(&mut h);
        assert_eq!(
            has_notify(&a, NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD),
            critical
        );
    }
    let after = state(&h);
    assert_eq!((after.1, after.2), (before.1, before.2));
}

#[test]
fn attack_traffic_selector_type_lies_are_refused() {
    // A CREATE_CHILD_SA whose selectors have an unknown type: no CHILD SA.
    let mut h = established();
    let (mid, _) = h.mids(false);
    let bad = TrafficSelector {
        ts_type: TsType(99),
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: vec![0; 4],
        end: vec![255; 4],
    };
    let d = h
        .forge_payloads(
            false,
            ExchangeType::CREATE_CHILD_SA,
            mid,
            false,
            &[
                Payload::Sa(crate::proposal::esp_proposals(
                    &h.resp_cfg.esp_proposals,
                    &[],
                    0x5555_6666,
                )),
                Payload::Nonce(vec![3; 32]),
                Payload::TsI(vec![bad.clone()]),
                Payload::TsR(vec![bad]),
            ],
        )
        .unwrap();
    let _ = h.deliver(peer(), 500, &d);
    assert_eq!(h.live.len(), 1);
    assert!(resp(&h).is_established());
}
