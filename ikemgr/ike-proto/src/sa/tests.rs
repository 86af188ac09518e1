//! Two endpoints joined by in-memory queues with a simulated clock, loss
//! and reordering. Exchanges are written in RFC notation in the comments.

use super::*;
use crate::proposal::{dhgrp_list, phase1_list, phase2_list};
use std::sync::Mutex;

/// Entropy whose 32-octet draws (nonces) can be scripted by the test.
#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl Scripted {
    fn push_nonce(&self, b: u8) {
        self.0.lock().unwrap().push_back(vec![b; NONCE_LEN]);
    }
}

impl Entropy for Scripted {
    fn fill(&mut self, buf: &mut [u8]) -> std::result::Result<(), CryptoError> {
        if buf.len() == NONCE_LEN {
            if let Some(n) = self.0.lock().unwrap().pop_front() {
                buf.copy_from_slice(&n);
                return Ok(());
            }
        }
        crate::crypto::random_bytes(buf)
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cfg(psk: &[u8], id: &str, ike: &str, groups: &str, esp: &str, pfs: &str) -> IkeConfig {
    let mut c = IkeConfig::psk(psk, IdPayload::fqdn(id));
    c.ike_proposals = phase1_list(ike).unwrap();
    c.ike_groups = dhgrp_list(groups).unwrap();
    c.esp_proposals = phase2_list(esp).unwrap();
    c.pfs_groups = dhgrp_list(pfs).unwrap();
    c.rekey_jitter = Duration::ZERO;
    c
}

fn net(s: &str, p: u8) -> TrafficSelector {
    TrafficSelector::subnet(s.parse().unwrap(), p)
}

struct Pair {
    now: Instant,
    a: IkeSa,
    b: Option<IkeSa>,
    b_cfg: Arc<IkeConfig>,
    a_ent: Scripted,
    b_ent: Scripted,
    ab: VecDeque<Transmit>,
    ba: VecDeque<Transmit>,
    ev_a: Vec<Event>,
    ev_b: Vec<Event>,
    sent_a: Vec<Vec<u8>>,
    sent_b: Vec<Vec<u8>>,
    /// (from_a, index on that direction) -> drop?
    lose: Box<dyn FnMut(bool, usize) -> bool>,
    reorder: bool,
}

const A: &str = "192.0.2.1:500";
const B: &str = "198.51.100.2:500";

impl Pair {
    fn new(a: IkeConfig, b: IkeConfig) -> Pair {
        let now = Instant::now();
        let a_ent = Scripted::default();
        let b_ent = Scripted::default();
        let sa = IkeSa::initiate(
            now,
            Arc::new(a),
            Addresses {
                local: addr(A),
                remote: addr(B),
            },
            Box::new(a_ent.clone()),
        )
        .unwrap();
        Pair {
            now,
            a: sa,
            b: None,
            b_cfg: Arc::new(b),
            a_ent,
            b_ent,
            ab: VecDeque::new(),
            ba: VecDeque::new(),
            ev_a: Vec::new(),
            ev_b: Vec::new(),
            sent_a: Vec::new(),
            sent_b: Vec::new(),
            lose: Box::new(|_, _| false),
            reorder: false,
        }
    }

    fn b(&mut self) -> &mut IkeSa {
        self.b.as_mut().expect("responder exists")
    }

    /// Moves transmits into the queues and events into the logs.
    fn collect(&mut self) {
        while let Some(t) = self.a.poll_transmit() {
            assert_eq!(t.destination.ip(), addr(B).ip());
            let n = self.sent_a.len();
            self.sent_a.push(t.payload.clone());
            if !(self.lose)(true, n) {
                self.ab.push_back(t);
            }
        }
        while let Some(e) = self.a.poll_event() {
            self.ev_a.push(e);
        }
        if let Some(b) = self.b.as_mut() {
            while let Some(t) = b.poll_transmit() {
                assert_eq!(t.destination.ip(), addr(A).ip());
                let n = self.sent_b.len();
                self.sent_b.push(t.payload.clone());
                if !(self.lose)(false, n) {
                    self.ba.push_back(t);
                }
            }
            while let Some(e) = b.poll_event() {
                self.ev_b.push(e);
            }
        }
    }

    fn deliver_to_b(&mut self, t: Transmit) {
        let path = Addresses {
            local: t.destination,
            remote: t.source,
        };
        let d = t.payload;
        match self.b.as_mut() {
            Some(b) => {
                let _ = b.handle_datagram(self.now, path, &d);
            }
            None => match IkeSa::accept(
                self.now,
                self.b_cfg.clone(),
                Addresses {
                    local: addr(B),
                    remote: addr(A),
                },
                Box::new(self.b_ent.clone()),
                &d,
            ) {
                Ok(Accepted::Sa(sa)) => self.b = Some(*sa),
                Ok(Accepted::Reply(t)) => {
                    let n = self.sent_b.len();
                    self.sent_b.push(t.payload.clone());
                    if !(self.lose)(false, n) {
                        self.ba.push_back(t);
                    }
                }
                Err(_) => {}
            },
        }
    }

    fn deliver_to_a(&mut self, t: Transmit) -> Result<()> {
        let path = Addresses {
            local: t.destination,
            remote: t.source,
        };
        self.a.handle_datagram(self.now, path, &t.payload)
    }

    /// Delivers everything in flight once (reversed per direction when
    /// `reorder`); returns whether anything moved.
    fn step(&mut self) -> bool {
        self.collect();
        if self.ab.is_empty() && self.ba.is_empty() {
            return false;
        }
        let mut ab: Vec<_> = self.ab.drain(..).collect();
        let mut ba: Vec<_> = self.ba.drain(..).collect();
        if self.reorder {
            ab.reverse();
            ba.reverse();
        }
        for d in ab {
            self.deliver_to_b(d);
        }
        for t in ba {
            let _ = self.deliver_to_a(t);
        }
        self.collect();
        true
    }

    /// Runs messages and timers until nothing is in flight and the next
    /// timer is later than `horizon` from the start of the call.
    fn run(&mut self, horizon: Duration) {
        let end = self.now + horizon;
        for _ in 0..10_000 {
            if self.step() {
                continue;
            }
            let next = [
                self.a.poll_timeout(),
                self.b.as_ref().and_then(|b| b.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.a.handle_timeout(self.now);
                    if let Some(b) = self.b.as_mut() {
                        b.handle_timeout(self.now);
                    }
                }
                _ => return,
            }
        }
        panic!("simulation did not settle");
    }

    fn settle(&mut self) {
        self.run(Duration::from_secs(120));
    }

    fn children(ev: &[Event]) -> Vec<ChildSaInfo> {
        ev.iter()
            .filter_map(|e| match e {
                Event::ChildSaEstablished(c) => Some((**c).clone()),
                _ => None,
            })
            .collect()
    }
}

fn assert_child_pair(a: &ChildSaInfo, b: &ChildSaInfo) {
    assert_eq!(a.inbound_spi, b.outbound_spi);
    assert_eq!(a.outbound_spi, b.inbound_spi);
    assert_eq!(a.encr, b.encr);
    assert_eq!(a.integ, b.integ);
    assert_eq!(a.keys.encr_out, b.keys.encr_in);
    assert_eq!(a.keys.integ_out, b.keys.integ_in);
    assert_eq!(a.keys.encr_in, b.keys.encr_out);
    assert_eq!(a.keys.integ_in, b.keys.integ_out);
    assert_ne!(a.keys.encr_in, a.keys.encr_out);
    assert_eq!(a.local_ts, b.remote_ts);
    assert_eq!(a.remote_ts, b.local_ts);
}

fn established(ike: &str, groups: &str, esp: &str) -> Pair {
    let mut p = Pair::new(
        cfg(b"secret", "a.example", ike, groups, esp, ""),
        cfg(b"secret", "b.example", ike, groups, esp, ""),
    );
    p.settle();
    assert!(p.a.is_established(), "{:?}", p.ev_a);
    assert!(p.b().is_established(), "{:?}", p.ev_b);
    p
}

fn check_establishment(p: &mut Pair, encr: Encr, integ: Option<Integ>, group: DhGroup) {
    let ike_a = p.ev_a.iter().find_map(|e| match e {
        Event::IkeSaEstablished(i) => Some(i.clone()),
        _ => None,
    });
    let ike_b = p.ev_b.iter().find_map(|e| match e {
        Event::IkeSaEstablished(i) => Some(i.clone()),
        _ => None,
    });
    let (ia, ib) = (ike_a.unwrap(), ike_b.unwrap());
    assert_eq!((ia.spi_i, ia.spi_r), (ib.spi_i, ib.spi_r));
    assert!(ia.initiator && !ib.initiator);
    assert_eq!(ia.suite.dh, group);
    assert_eq!(ia.suite, ib.suite);
    assert_eq!(ia.remote_id, IdPayload::fqdn("b.example"));
    assert_eq!(ib.remote_id, IdPayload::fqdn("a.example"));
    assert!(!ia.local_behind_nat && !ia.remote_behind_nat);
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_eq!((ca.len(), cb.len()), (1, 1));
    assert_child_pair(&ca[0], &cb[0]);
    assert_eq!(ca[0].encr, encr);
    assert_eq!(ca[0].integ, integ);
    assert!(ca[0].initiator && !cb[0].initiator);
    assert_eq!(p.a.message_ids(), (2, 0));
    assert_eq!(p.b().message_ids(), (0, 2));
}

#[test]
fn establishes_with_aes_gcm_and_ecp256() {
    // HDR, SAi1, KEi, Ni, N(NAT_D)x2 -->  <-- HDR, SAr1, KEr, Nr, N(NAT_D)x2
    // HDR, SK {IDi, AUTH, SAi2, TSi, TSr} -->  <-- HDR, SK {IDr, AUTH, SAr2, TSi, TSr}
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    check_establishment(&mut p, Encr::AesGcm16(16), None, DhGroup::ECP256);
    let c = &Pair::children(&p.ev_a)[0];
    assert_eq!(c.keys.encr_out.len(), 20, "AES-128 key + 4-octet salt");
}

#[test]
fn establishes_with_cbc_hmac_and_modp2048() {
    let mut p = established("aes256-sha256", "14", "aes256-sha256");
    check_establishment(
        &mut p,
        Encr::AesCbc(32),
        Some(Integ::HmacSha256_128),
        DhGroup::MODP2048,
    );
    let c = &Pair::children(&p.ev_a)[0];
    assert_eq!((c.keys.encr_in.len(), c.keys.integ_in.len()), (32, 32));
}

#[test]
fn establishes_with_chacha20_and_x25519() {
    let mut p = established("chacha20poly1305-prfsha256", "31", "chacha20poly1305");
    check_establishment(&mut p, Encr::ChaCha20Poly1305, None, DhGroup::CURVE25519);
}

#[test]
fn establishes_with_fortios_seed_suite() {
    // Seed 002: proposal aes256-sha512, dhgrp 21.
    let mut p = established("aes256-sha512", "21", "aes256-sha512");
    check_establishment(
        &mut p,
        Encr::AesCbc(32),
        Some(Integ::HmacSha512_256),
        DhGroup::ECP521,
    );
}

#[test]
fn narrowing_applies_to_the_first_child() {
    let mut a = cfg(b"k", "a.example", "aes128-sha1", "14", "aes128-sha1", "");
    let mut b = cfg(b"k", "b.example", "aes128-sha1", "14", "aes128-sha1", "");
    // A proposes 0/0 <-> 0/0; B only allows 10.2/16 (its side) <-> 10.1/16.
    b.local_ts = vec![net("10.2.0.0", 16)];
    b.remote_ts = vec![net("10.1.0.0", 16)];
    a.local_ts = vec![net("0.0.0.0", 0)];
    let mut p = Pair::new(a, b);
    p.settle();
    let ca = &Pair::children(&p.ev_a)[0];
    assert_eq!(ca.local_ts, vec![net("10.1.0.0", 16)]);
    assert_eq!(ca.remote_ts, vec![net("10.2.0.0", 16)]);
}

#[test]
fn disjoint_selectors_keep_the_ike_sa_without_child() {
    let mut a = cfg(b"k", "a.example", "aes128-sha1", "14", "aes128-sha1", "");
    let b = cfg(b"k", "b.example", "aes128-sha1", "14", "aes128-sha1", "");
    a.local_ts = vec![net("10.9.0.0", 16)];
    let mut b = b;
    b.remote_ts = vec![net("10.1.0.0", 16)];
    let mut p = Pair::new(a, b);
    p.settle();
    assert!(p.a.is_established());
    assert!(p.ev_a.contains(&Event::ChildSaFailed {
        notify: NotifyType::TS_UNACCEPTABLE
    }));
    assert!(Pair::children(&p.ev_a).is_empty());
    assert!(Pair::children(&p.ev_b).is_empty());
}

#[test]
fn wrong_psk_fails_on_both_sides() {
    let mut p = Pair::new(
        cfg(
            b"right",
            "a.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
        cfg(
            b"wrong",
            "b.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
    );
    p.settle();
    assert!(p.ev_b.iter().any(|e| matches!(e, Event::AuthFailed { .. })));
    assert!(p.ev_a.iter().any(|e| matches!(e, Event::AuthFailed { .. })));
    assert!(p.a.is_closed() && p.b().is_closed());
    assert!(Pair::children(&p.ev_a).is_empty() && Pair::children(&p.ev_b).is_empty());
    assert!(p.ev_a.contains(&Event::IkeSaDeleted {
        spi_i: p.a.spis().0,
        spi_r: p.a.spis().1,
        reason: DeleteReason::AuthFailed
    }));
}

#[test]
fn initiator_peerid_mismatch_tells_the_responder() {
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128-sha256",
        "14",
        "aes128-sha256",
        "",
    );
    a.peer_id = Some(IdPayload::fqdn("someone.else"));
    let mut p = Pair::new(
        a,
        cfg(
            b"k",
            "b.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
    );
    p.settle();
    assert!(p.ev_a.contains(&Event::AuthFailed {
        reason: "peer identity does not match peerid"
    }));
    assert!(p.a.is_closed());
    assert!(p.b().is_closed(), "B learnt of the failure: {:?}", p.ev_b);
    assert!(p.ev_b.contains(&Event::AuthFailed {
        reason: "peer rejected our AUTH"
    }));
}

#[test]
fn forced_nat_traversal_floats_to_4500() {
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    a.nat_traversal = NatTraversal::Forced;
    let mut p = Pair::new(
        a,
        cfg(
            b"k",
            "b.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        ),
    );
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
    let ib = p.ev_b.iter().find_map(|e| match e {
        Event::IkeSaEstablished(i) => Some(i.clone()),
        _ => None,
    });
    assert!(ib.unwrap().remote_behind_nat);
    assert_eq!(p.a.addresses().local.port(), NAT_T_PORT);
    assert_eq!(p.a.addresses().remote.port(), NAT_T_PORT);
    assert_eq!(p.b().addresses().remote.port(), NAT_T_PORT);
    // B answers liveness checks on 4500 too.
    p.a.start_liveness_check(p.now).unwrap();
    p.collect();
    assert_eq!(p.ab[0].destination.port(), NAT_T_PORT);
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply));
}

#[test]
fn nat_traversal_disabled_sends_no_nat_detection() {
    let mut a = cfg(b"k", "a.example", "aes128-sha1", "14", "aes128-sha1", "");
    a.nat_traversal = NatTraversal::Disable;
    let mut p = Pair::new(
        a,
        cfg(b"k", "b.example", "aes128-sha1", "14", "aes128-sha1", ""),
    );
    p.settle();
    let m = Message::decode(&p.sent_a[0]).unwrap();
    assert!(find_notify(&m.payloads, NotifyType::NAT_DETECTION_SOURCE_IP).is_none());
    let r = Message::decode(&p.sent_b[0]).unwrap();
    assert!(find_notify(&r.payloads, NotifyType::NAT_DETECTION_SOURCE_IP).is_none());
    assert_eq!(p.a.addresses().local.port(), 500);
}

#[test]
fn peerid_mismatch_is_authentication_failed() {
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128-sha256",
        "14",
        "aes128-sha256",
        "",
    );
    b.peer_id = Some(IdPayload::fqdn("Nokia_Peer"));
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
        b,
    );
    p.settle();
    assert!(p.ev_b.contains(&Event::AuthFailed {
        reason: "peer identity does not match peerid"
    }));
    assert!(p.a.is_closed());
}

#[test]
fn invalid_ke_payload_makes_the_initiator_retry_with_the_responders_group() {
    // A offers 14 and 19 with a KE for 14; B only accepts 19.
    //   HDR, SAi1, KEi(14), Ni -->  <-- HDR, N(INVALID_KE_PAYLOAD, 19)
    //   HDR, SAi1, KEi(19), Ni -->  <-- HDR, SAr1, KEr(19), Nr
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128-sha256",
            "14 19",
            "aes128-sha256",
            "",
        ),
        cfg(
            b"k",
            "b.example",
            "aes128-sha256",
            "19",
            "aes128-sha256",
            "",
        ),
    );
    p.settle();
    assert!(p.a.is_established());
    assert_eq!(p.a.suite().unwrap().dh, DhGroup::ECP256);
    let first = Message::decode(&p.sent_b[0]).unwrap();
    assert!(matches!(&first.payloads[0], Payload::Notify(n)
        if n.ty == NotifyType::INVALID_KE_PAYLOAD && n.data == vec![0, 19]));
}

#[test]
fn no_common_proposal_fails_cleanly() {
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
        cfg(
            b"k",
            "b.example",
            "aes256gcm-prfsha384",
            "14",
            "aes128-sha256",
            "",
        ),
    );
    p.settle();
    assert!(p.a.is_closed());
    assert!(p.b.is_none(), "responder kept no state");
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Failed(NotifyType::NO_PROPOSAL_CHOSEN),
            ..
        }
    )));
}

#[test]
fn cookie_request_is_answered_with_the_same_nonce_and_ke() {
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
        cfg(
            b"k",
            "b.example",
            "aes128-sha256",
            "14",
            "aes128-sha256",
            "",
        ),
    );
    p.collect();
    let req1 = Message::decode(&p.ab.pop_front().unwrap().payload).unwrap();
    // <-- HDR(A,0), N(COOKIE)
    let cookie = vec![0xc0; 24];
    let resp = Message {
        header: Header {
            spi_i: req1.header.spi_i,
            spi_r: 0,
            next_payload: PayloadType::NONE,
            version: IKEV2_VERSION,
            exchange: ExchangeType::IKE_SA_INIT,
            flags: Flags::new(false, true),
            message_id: 0,
            length: 0,
        },
        payloads: vec![Payload::Notify(NotifyPayload::new(
            NotifyType::COOKIE,
            cookie.clone(),
        ))],
        sk_offset: None,
    };
    p.deliver_to_a(Transmit {
        source: addr(B),
        destination: addr(A),
        payload: resp.encode(),
    })
    .unwrap();
    p.collect();
    // HDR(A,0), N(COOKIE), SAi1, KEi, Ni -->
    let req2 = Message::decode(&p.ab[0].payload).unwrap();
    assert!(
        matches!(&req2.payloads[0], Payload::Notify(n) if n.ty == NotifyType::COOKIE && n.data == cookie)
    );
    assert_eq!(req2.payloads[1..4], req1.payloads[0..3]);
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
}

#[test]
fn lost_requests_are_retransmitted_byte_identical() {
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        ),
        cfg(
            b"k",
            "b.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        ),
    );
    // Lose A's first two datagrams (IKE_SA_INIT) and the first IKE_AUTH.
    p.lose = Box::new(|from_a, n| from_a && (n < 2 || n == 3));
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
    assert_eq!(p.sent_a[0], p.sent_a[1]);
    assert_eq!(p.sent_a[1], p.sent_a[2]);
    assert_eq!(p.sent_a[3], p.sent_a[4]);
}

#[test]
fn lost_responses_are_answered_from_the_cache() {
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "",
        ),
        cfg(
            b"k",
            "b.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "",
        ),
    );
    // Lose B's IKE_SA_INIT response and its IKE_AUTH response once each.
    p.lose = Box::new(|from_a, n| !from_a && (n == 0 || n == 2));
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
    assert_eq!(
        p.sent_b[0], p.sent_b[1],
        "IKE_SA_INIT response resent as is"
    );
    assert_eq!(p.sent_b[2], p.sent_b[3], "IKE_AUTH response resent as is");
    // B processed IKE_AUTH once: one CHILD SA.
    assert_eq!(Pair::children(&p.ev_b).len(), 1);
}

#[test]
fn reordered_delivery_still_establishes() {
    let mut p = Pair::new(
        cfg(b"k", "a.example", "aes128-sha1", "2", "aes128-sha1", ""),
        cfg(b"k", "b.example", "aes128-sha1", "2", "aes128-sha1", ""),
    );
    p.reorder = true;
    // Duplicate-and-lose pattern: lose every third datagram from B.
    p.lose = Box::new(|from_a, n| !from_a && n % 3 == 1);
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
}

#[test]
fn initiator_gives_up_after_the_schedule() {
    let mut p = Pair::new(
        cfg(b"k", "a.example", "aes128-sha1", "14", "aes128-sha1", ""),
        cfg(b"k", "b.example", "aes128-sha1", "14", "aes128-sha1", ""),
    );
    p.lose = Box::new(|_, _| true);
    p.settle();
    let n = RetransmitPolicy::default().timeouts.len();
    assert_eq!(p.sent_a.len(), n, "first send + retransmissions");
    assert!(p.a.is_closed());
    assert!(matches!(
        p.ev_a.last(),
        Some(Event::IkeSaDeleted {
            reason: DeleteReason::Timeout,
            ..
        })
    ));
    assert_eq!(p.a.poll_timeout(), None);
}

#[test]
fn liveness_reply_and_timeout() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    p.ev_a.clear();
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply));
    assert_eq!(p.a.message_ids(), (3, 0));
    assert!(p.ev_b.contains(&Event::MessageIdUpdate {
        spi_i: p.a.spis().0,
        spi_r: p.a.spis().1,
        next_send: 0,
        next_recv: 3
    }));
    // Now the peer is gone.
    p.lose = Box::new(|_, _| true);
    p.ev_a.clear();
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessTimeout));
    assert!(
        p.a.is_established(),
        "the driver decides what a dead peer means"
    );
}

/// dpdmon's probes: every retry of one probe is the same message (same ID, same bytes),
/// sent only when the driver asks; the SA never retransmits it on its own, gives up after
/// the hold, and a reply to any transmission ends the check.
#[test]
fn driven_liveness_retransmits_only_when_asked() {
    let hold = Duration::from_secs(600);
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    p.ev_a.clear();
    p.lose = Box::new(|from_a, _| from_a);
    let mid = p.a.message_ids().0;
    assert_eq!(
        p.a.probe_liveness(p.now, hold).unwrap(),
        LivenessProbe::Sent(mid)
    );
    p.collect();
    let first = p.sent_a.last().cloned().unwrap();
    let sent = p.sent_a.len();
    // No retransmission of its own before the hold.
    p.now += Duration::from_secs(300);
    p.a.handle_timeout(p.now);
    p.collect();
    assert_eq!(p.sent_a.len(), sent, "retransmitted on its own schedule");
    assert_eq!(
        p.a.poll_timeout(),
        Some(p.now - Duration::from_secs(300) + hold)
    );
    // The driver's retries: the same bytes each time.
    for _ in 0..2 {
        p.now += Duration::from_secs(2);
        assert_eq!(
            p.a.probe_liveness(p.now, hold).unwrap(),
            LivenessProbe::Retransmitted(mid)
        );
        p.collect();
        assert_eq!(p.sent_a.last(), Some(&first));
    }
    assert_eq!(p.sent_a.len(), sent + 2);
    // The third transmission gets through: the reply ends the check.
    p.lose = Box::new(|_, _| false);
    assert_eq!(
        p.a.probe_liveness(p.now, hold).unwrap(),
        LivenessProbe::Retransmitted(mid)
    );
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);
    assert_eq!(p.a.message_ids().0, mid + 1);
    // A new check gets a new ID; unanswered, it is abandoned after the hold.
    p.ev_a.clear();
    p.lose = Box::new(|from_a, _| from_a);
    assert_eq!(
        p.a.probe_liveness(p.now, hold).unwrap(),
        LivenessProbe::Sent(mid + 1)
    );
    p.collect();
    let sent = p.sent_a.len();
    p.now += hold;
    p.a.handle_timeout(p.now);
    p.collect();
    assert_eq!(p.sent_a.len(), sent);
    assert!(p.ev_a.contains(&Event::LivenessTimeout), "{:?}", p.ev_a);
    assert!(p.a.is_established());
    // While another exchange holds the window the check waits behind it.
    p.lose = Box::new(|_, _| false);
    p.a.rekey_ike(p.now).unwrap();
    assert_eq!(
        p.a.probe_liveness(p.now, hold).unwrap(),
        LivenessProbe::Queued
    );
}

#[test]
fn delete_child_then_ike_sa() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let spi = p.a.child_spis()[0];
    p.a.delete_child(p.now, spi).unwrap();
    p.settle();
    assert!(p.b().child_spis().is_empty());
    assert!(p.ev_b.iter().any(|e| matches!(e, Event::ChildSaDeleted { outbound_spi, reason: DeleteReason::Peer, .. } if *outbound_spi == spi)));
    {
        let now = p.now;
        p.b().delete(now).unwrap();
    }
    p.settle();
    assert!(p.a.is_closed() && p.b().is_closed());
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Peer,
            ..
        }
    )));
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Local,
            ..
        }
    )));
}

#[test]
fn create_and_rekey_child_with_pfs() {
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "31",
        ),
        cfg(
            b"k",
            "b.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "31",
        ),
    );
    p.settle();
    // HDR, SK {SA, Ni, KEi, TSi, TSr} -->  <-- HDR, SK {SA, Nr, KEr, TSi, TSr}
    p.a.create_child(p.now).unwrap();
    p.settle();
    let ca = Pair::children(&p.ev_a);
    let cb = Pair::children(&p.ev_b);
    assert_eq!(ca.len(), 2);
    assert_child_pair(&ca[1], &cb[1]);
    assert_eq!(ca[1].pfs_group, Some(DhGroup::CURVE25519));
    assert_eq!(ca[0].pfs_group, None, "IKE_AUTH child has no PFS");
    // HDR, SK {N(REKEY_SA), SA, Ni, KEi, TSi, TSr} -->
    let old = ca[0].inbound_spi;
    {
        let now = p.now;
        p.b().rekey_child(now, ca[0].outbound_spi).unwrap();
    }
    p.settle();
    let ca = Pair::children(&p.ev_a);
    let cb = Pair::children(&p.ev_b);
    assert_eq!(ca.len(), 3);
    assert_child_pair(&ca[2], &cb[2]);
    assert_eq!(cb[2].rekey_of, Some(ca[0].outbound_spi));
    assert!(
        !p.a.child_spis().contains(&old),
        "old SA deleted after rekey"
    );
    assert_eq!(p.a.child_spis().len(), 2);
    assert_eq!(p.b().child_spis().len(), 2);
    assert!(p.ev_a.iter().any(|e| matches!(e, Event::ChildSaDeleted { inbound_spi, reason: DeleteReason::Rekeyed, .. } if *inbound_spi == old)));
}

/// Between the answer to the peer's CHILD SA rekey and the peer's Delete of the old SA,
/// the old SA is still listed but no longer current: an operator's rekey must pick the new
/// one (the peer would refuse a rekey of the old one).
#[test]
fn a_child_sa_the_peer_rekeyed_is_not_current_while_its_delete_is_on_the_way() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let a_old = p.a.child_spis()[0];
    let b_old = p.b().child_spis()[0];
    p.a.rekey_child(p.now, a_old).unwrap();
    p.collect();
    // A's request reaches B; B's answer is still on the way back.
    let req = p.ab.pop_front().expect("rekey request");
    p.deliver_to_b(req);
    p.collect();
    let listed = p.b().child_spis();
    let current = p.b().current_child_spis();
    assert_eq!(listed.len(), 2, "{listed:x?}");
    assert!(listed.contains(&b_old));
    assert_eq!(current.len(), 1, "{current:x?}");
    assert!(!current.contains(&b_old));
    // Once everything is through, only the new SA is left on both sides.
    p.settle();
    assert_eq!(p.b().child_spis(), current);
    assert_eq!(p.b().current_child_spis(), current);
}

#[test]
fn ike_rekey_moves_children_and_resets_message_ids() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let old = p.a.spis();
    let children = p.a.child_spis();
    let k_old = p.a.chan.keys.as_ref().unwrap().sk.sk_d.clone();
    // HDR, SK {SA, Ni, KEi} -->  <-- HDR, SK {SA, Nr, KEr}
    // HDR(old), SK {D(IKE)} -->  <-- HDR(old), SK {}
    p.a.rekey_ike(p.now).unwrap();
    p.settle();
    let new = p.a.spis();
    assert_ne!(new, old);
    assert_eq!(p.b().spis(), new);
    assert_eq!(p.a.child_spis(), children);
    assert_ne!(p.a.chan.keys.as_ref().unwrap().sk.sk_d, k_old);
    let kb = p.b().chan.keys.as_ref().unwrap().sk.sk_d.clone();
    assert_eq!(p.a.chan.keys.as_ref().unwrap().sk.sk_d, kb);
    assert_eq!(p.a.local_spis().len(), 1, "old SA gone");
    assert_eq!(p.b().local_spis().len(), 1);
    for ev in [&p.ev_a, &p.ev_b] {
        assert!(ev
            .iter()
            .any(|e| matches!(e, Event::IkeSaRekeyed { old_spi_i, .. } if *old_spi_i == old.0)));
        assert!(ev.contains(&Event::IkeSaDeleted {
            spi_i: old.0,
            spi_r: old.1,
            reason: DeleteReason::Rekeyed
        }));
    }
    assert_eq!(p.a.message_ids(), (0, 0));
    // The new SA works both ways.
    p.ev_a.clear();
    {
        let now = p.now;
        p.b().start_liveness_check(now).unwrap();
    }
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply));
    assert!(p.ev_b.contains(&Event::LivenessReply));
    // And a CHILD SA made on it derives from the new SK_d.
    p.a.create_child(p.now).unwrap();
    p.settle();
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_child_pair(ca.last().unwrap(), cb.last().unwrap());
    assert_eq!(ca.last().unwrap().ike_spi_i, new.0);
}

/// Both ends rekey the same CHILD SA at once (§2.8.1), with nonces chosen
/// so that `a_low` decides which exchange holds the lowest nonce.
fn simultaneous_rekey(a_low: bool, reorder_response: bool) -> Pair {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let a_old = p.a.child_spis()[0];
    let b_old = p.b().child_spis()[0];
    let (lo, hi) = (0x11u8, 0xeeu8);
    // A's exchange: Ni from A, Nr from B.  B's exchange: Ni from B, Nr from A.
    // A draws its Ni first, then its Nr when answering B; same for B.
    if a_low {
        p.a_ent.push_nonce(lo); // A's Ni (exchange 1)
        p.b_ent.push_nonce(hi); // B's Ni (exchange 2)
        p.a_ent.push_nonce(hi); // A's Nr (exchange 2)
        p.b_ent.push_nonce(hi); // B's Nr (exchange 1)
    } else {
        p.a_ent.push_nonce(hi);
        p.b_ent.push_nonce(lo);
        p.a_ent.push_nonce(hi);
        p.b_ent.push_nonce(hi);
    }
    p.a.rekey_child(p.now, a_old).unwrap();
    {
        let now = p.now;
        p.b().rekey_child(now, b_old).unwrap();
    }
    p.collect();
    // Both requests are in flight:
    //   A: HDR, SK {N(REKEY_SA), SA, Ni_a, TSi, TSr} -->
    //   <-- B: HDR, SK {N(REKEY_SA), SA, Ni_b, TSi, TSr}
    assert_eq!((p.ab.len(), p.ba.len()), (1, 1));
    let req_a = p.ab.pop_front().unwrap();
    let req_b = p.ba.pop_front().unwrap();
    if reorder_response {
        // B answers A's request, and that answer overtakes B's request.
        p.deliver_to_b(req_a);
        p.collect();
        let resp_to_a = p.ba.pop_front().unwrap();
        p.deliver_to_a(resp_to_a).unwrap();
        p.deliver_to_a(req_b).unwrap();
    } else {
        p.deliver_to_b(req_a);
        p.deliver_to_a(req_b).unwrap();
    }
    p.settle();
    p
}

fn check_one_child_left(p: &mut Pair) -> (u32, u32) {
    let a = p.a.child_spis();
    let b = p.b().child_spis();
    assert_eq!(a.len(), 1, "A keeps one CHILD SA: {:?}", p.ev_a);
    assert_eq!(b.len(), 1, "B keeps one CHILD SA: {:?}", p.ev_b);
    let ca = Pair::children(&p.ev_a)
        .into_iter()
        .find(|c| c.inbound_spi == a[0])
        .unwrap();
    let cb = Pair::children(&p.ev_b)
        .into_iter()
        .find(|c| c.inbound_spi == b[0])
        .unwrap();
    assert_child_pair(&ca, &cb);
    (a[0], b[0])
}

#[test]
fn simultaneous_child_rekey_lowest_nonce_in_a_exchange() {
    let mut p = simultaneous_rekey(true, false);
    check_one_child_left(&mut p);
    // A's new SA was redundant: A deleted it.
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
    assert!(!p.ev_b.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
    // The survivor is the one B initiated.
    let survivor = Pair::children(&p.ev_b)
        .into_iter()
        .find(|c| c.inbound_spi == p.b().child_spis()[0])
        .unwrap();
    assert!(survivor.initiator);
}

#[test]
fn simultaneous_child_rekey_lowest_nonce_in_b_exchange() {
    let mut p = simultaneous_rekey(false, false);
    check_one_child_left(&mut p);
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
    assert!(!p.ev_a.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
}

#[test]
fn simultaneous_child_rekey_with_lost_responses() {
    // Same collision, but each side's first response is lost once: the
    // requests are retransmitted and answered from the response caches.
    for a_low in [true, false] {
        let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
        let a_old = p.a.child_spis()[0];
        let b_old = p.b().child_spis()[0];
        let (lo, hi) = (0x11u8, 0xeeu8);
        let (ai, bi) = if a_low { (lo, hi) } else { (hi, lo) };
        p.a_ent.push_nonce(ai);
        p.b_ent.push_nonce(bi);
        p.a_ent.push_nonce(hi);
        p.b_ent.push_nonce(hi);
        p.a.rekey_child(p.now, a_old).unwrap();
        {
            let now = p.now;
            p.b().rekey_child(now, b_old).unwrap();
        }
        let (na, nb) = (p.sent_a.len(), p.sent_b.len());
        // Datagram na/nb are the requests; na+1/nb+1 the first responses.
        p.lose = Box::new(
            move |from_a, n| {
                if from_a {
                    n == na + 1
                } else {
                    n == nb + 1
                }
            },
        );
        p.settle();
        let retx = |v: &[Vec<u8>], i: usize| v.iter().filter(|x| **x == v[i]).count();
        assert!(
            retx(&p.sent_a, na) >= 2 && retx(&p.sent_b, nb) >= 2,
            "requests retransmitted"
        );
        assert!(
            retx(&p.sent_a, na + 1) >= 2,
            "A answered B's retransmission from cache"
        );
        check_one_child_left(&mut p);
        let redundant_on_a = p.ev_a.iter().any(|e| {
            matches!(
                e,
                Event::ChildSaDeleted {
                    reason: DeleteReason::Redundant,
                    ..
                }
            )
        });
        assert_eq!(redundant_on_a, a_low);
    }
}

#[test]
fn simultaneous_child_rekey_with_reordered_response() {
    // A's response overtakes B's request: A finished its rekey and already
    // sent the Delete of the old SA, so it answers B's request with
    // CHILD_SA_NOT_FOUND (TEMPORARY_FAILURE if the old SA were still there)
    // and B keeps A's new SA whatever the nonces.
    for a_low in [true, false] {
        let mut p = simultaneous_rekey(a_low, true);
        let (a_in, _) = check_one_child_left(&mut p);
        assert!(p.ev_b.contains(&Event::ChildSaFailed {
            notify: NotifyType::CHILD_SA_NOT_FOUND
        }));
        let survivor = Pair::children(&p.ev_a)
            .into_iter()
            .find(|c| c.inbound_spi == a_in)
            .unwrap();
        assert!(survivor.initiator, "A's rekey won");
    }
}

/// Both ends rekey the IKE SA at once (§2.8.2) with chosen nonces: `a_low`
/// puts the lowest of the four nonces in A's exchange. With `reorder`, B's
/// answer to A overtakes B's request, so A completes its rekey before it
/// sees B's (only B notices the collision).
fn simultaneous_ike_rekey(a_low: bool, reorder: bool) -> (Pair, (u64, u64), Vec<u32>) {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let old = p.a.spis();
    let children = p.a.child_spis();
    let (lo, hi) = (0x11u8, 0xeeu8);
    // A draws its Ni, then its Nr when answering B; B the same.
    p.a_ent.push_nonce(if a_low { lo } else { hi });
    p.b_ent.push_nonce(if a_low { hi } else { lo });
    p.a_ent.push_nonce(hi);
    p.b_ent.push_nonce(hi);
    p.a.rekey_ike(p.now).unwrap();
    {
        let now = p.now;
        p.b().rekey_ike(now).unwrap();
    }
    p.collect();
    // A: HDR, SK {SA(IKE), Ni_a, KEi} -->  <-- B: HDR, SK {SA(IKE), Ni_b, KEi}
    assert_eq!((p.ab.len(), p.ba.len()), (1, 1));
    let req_a = p.ab.pop_front().unwrap();
    let req_b = p.ba.pop_front().unwrap();
    if reorder {
        p.deliver_to_b(req_a);
        p.collect();
        let resp_to_a = p.ba.pop_front().unwrap();
        p.deliver_to_a(resp_to_a).unwrap();
        let _ = p.deliver_to_a(req_b);
    } else {
        p.deliver_to_b(req_a);
        p.deliver_to_a(req_b).unwrap();
    }
    p.settle();
    (p, old, children)
}

fn check_one_ike_sa(p: &mut Pair, old: (u64, u64), children: &[u32]) -> IkeSaInfo {
    let new = p.a.spis();
    assert_ne!(new, old);
    assert_eq!(p.b().spis(), new, "{:?}\n{:?}", p.ev_a, p.ev_b);
    assert_eq!(p.a.local_spis().len(), 1, "old and redundant SAs gone");
    assert_eq!(p.b().local_spis().len(), 1, "old and redundant SAs gone");
    assert_eq!(p.a.child_spis(), children, "CHILD SAs inherited");
    assert!(p.a.is_established() && p.b().is_established());
    // The surviving SA carries traffic: a liveness check is answered.
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(
        matches!(p.ev_a.last(), Some(Event::LivenessReply)),
        "{:?}",
        p.ev_a
    );
    p.a.ike_info_current().unwrap()
}

#[test]
fn simultaneous_ike_rekey_lowest_nonce_in_a_exchange_keeps_bs_sa() {
    let (mut p, old, children) = simultaneous_ike_rekey(true, false);
    let info = check_one_ike_sa(&mut p, old, &children);
    // A's SA had the lowest nonce: it was redundant and A deleted it; the
    // survivor is the one B initiated.
    assert!(!info.initiator, "survivor must be B's SA");
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
    // A never retried with a TEMPORARY_FAILURE dance: exactly one rekey each.
    let rekeyed = |ev: &[Event]| {
        ev.iter()
            .filter(|e| matches!(e, Event::IkeSaRekeyed { .. }))
            .count()
    };
    assert_eq!((rekeyed(&p.ev_a), rekeyed(&p.ev_b)), (1, 1));
}

#[test]
fn simultaneous_ike_rekey_lowest_nonce_in_b_exchange_keeps_as_sa() {
    let (mut p, old, children) = simultaneous_ike_rekey(false, false);
    let info = check_one_ike_sa(&mut p, old, &children);
    assert!(info.initiator, "survivor must be A's SA");
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Redundant,
            ..
        }
    )));
}

#[test]
fn simultaneous_ike_rekey_noticed_by_one_side_only() {
    // A completes first and refuses B's request on the old SA with
    // TEMPORARY_FAILURE; B adopts A's SA, whatever the nonces.
    for a_low in [true, false] {
        let (mut p, old, children) = simultaneous_ike_rekey(a_low, true);
        let info = check_one_ike_sa(&mut p, old, &children);
        assert!(info.initiator, "A's SA survives (a_low {a_low})");
    }
}

#[test]
fn simultaneous_ike_rekey_with_a_lost_response() {
    // B's answer to A's rekey request is lost: A retransmits it (B answers
    // from its cache) and both still end on one SA, the redundant or
    // half-known one deleted or dropped, whichever exchange held the lowest
    // nonce.
    for a_low in [true, false] {
        let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
        let old = p.a.spis();
        let children = p.a.child_spis();
        let (lo, hi) = (0x11u8, 0xeeu8);
        p.a_ent.push_nonce(if a_low { lo } else { hi });
        p.b_ent.push_nonce(if a_low { hi } else { lo });
        p.a_ent.push_nonce(hi);
        p.b_ent.push_nonce(hi);
        // B sends its request (first), then its answer to A's (second): lose that.
        let nb = p.sent_b.len();
        p.lose = Box::new(move |from_a, i| !from_a && i == nb + 1);
        p.a.rekey_ike(p.now).unwrap();
        {
            let now = p.now;
            p.b().rekey_ike(now).unwrap();
        }
        p.settle();
        let info = check_one_ike_sa(&mut p, old, &children);
        assert_eq!(info.initiator, !a_low, "a_low {a_low}: {:?}", p.ev_a);
    }
}

#[test]
fn hard_ike_lifetime_deletes_and_tells_the_peer() {
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    a.ike_lifetime = Duration::from_secs(100);
    a.rekey_margin = Duration::ZERO; // soft == hard: no rekey first
    let mut p = Pair::new(
        a,
        cfg(
            b"k",
            "b.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        ),
    );
    p.run(Duration::from_secs(10));
    assert!(p.a.is_established());
    p.run(Duration::from_secs(100));
    assert!(p.a.is_closed());
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Expired,
            ..
        }
    )));
    assert!(p.b().is_closed(), "the Delete reached B: {:?}", p.ev_b);
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Peer,
            ..
        }
    )));
}

#[test]
fn soft_lifetime_rekeys_the_child_and_ike_sa() {
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    a.child_lifetime = Duration::from_secs(600);
    a.ike_lifetime = Duration::from_secs(900);
    a.rekey_margin = Duration::from_secs(30);
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    b.child_lifetime = Duration::from_secs(3600);
    b.ike_lifetime = Duration::from_secs(7200);
    let mut p = Pair::new(a, b);
    p.settle();
    let first = p.a.child_spis();
    let ike = p.a.spis();
    p.run(Duration::from_secs(1000));
    assert!(p.a.is_established());
    assert_ne!(p.a.child_spis(), first, "child rekeyed at 570 s");
    assert_ne!(p.a.spis(), ike, "IKE SA rekeyed at 870 s");
    assert_eq!(p.a.child_spis().len(), 1);
    assert_eq!(p.b().child_spis().len(), 1);
    assert!(!p.ev_a.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Expired,
            ..
        }
    )));
}

/// `driver_rekeys` (FortiOS `keepalive disable`): the SA does not rekey that policy's CHILD
/// SA at its soft lifetime by itself; at the hard lifetime it deletes it and tells the peer,
/// and the IKE SA stays.
#[test]
fn driver_rekeyed_child_expires_at_its_hard_lifetime_and_the_peer_sees_the_delete() {
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    a.child_lifetime = Duration::from_secs(600);
    a.ike_lifetime = Duration::from_secs(7200);
    a.driver_rekeys = vec![0];
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    b.child_lifetime = Duration::from_secs(3600);
    b.ike_lifetime = Duration::from_secs(7200);
    let mut p = Pair::new(a, b);
    p.settle();
    let first = p.a.child_spis();
    assert_eq!(first.len(), 1);
    // Past the soft lifetime (570 s at most), before the hard one: untouched.
    p.run(Duration::from_secs(590));
    // Another timer may wake the SA between the soft and the hard lifetime.
    let woken = p.now + Duration::from_secs(590);
    p.a.handle_timeout(woken);
    p.run(Duration::from_secs(1));
    assert_eq!(p.a.child_spis(), first, "rekeyed without the driver");
    // `run` advances the clock only as far as timers fire: 700 s from the same start.
    p.run(Duration::from_secs(700));
    assert!(p.a.is_established());
    assert!(p.a.child_spis().is_empty(), "{:?}", p.a.child_spis());
    assert!(p.b().child_spis().is_empty(), "the peer kept its CHILD SA");
    assert!(p.ev_a.iter().any(|e| matches!(
        e,
        Event::ChildSaDeleted {
            reason: DeleteReason::Expired,
            ..
        }
    )));
    // The driver may still rekey by hand, and create the CHILD SA again.
    p.a.create_child_for(p.now, 0).expect("create again");
    p.settle();
    assert_eq!(p.a.child_spis().len(), 1);
}

#[test]
fn garbage_and_forgeries_change_nothing() {
    let mut p = established("aes128-sha1", "14", "aes128-sha1");
    let before = (p.a.message_ids(), p.a.child_spis());
    let (spi_i, spi_r) = p.a.spis();
    let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0; 28], vec![0xff; 200]];
    // Well-formed header with our SPIs but a forged SK payload.
    for exchange in [ExchangeType::INFORMATIONAL, ExchangeType::CREATE_CHILD_SA] {
        for response in [false, true] {
            let m = Message {
                header: Header {
                    spi_i,
                    spi_r,
                    next_payload: PayloadType::NONE,
                    version: IKEV2_VERSION,
                    exchange,
                    flags: Flags::new(false, response),
                    message_id: if response { 2 } else { 0 },
                    length: 0,
                },
                payloads: vec![Payload::Sk {
                    first_inner: PayloadType::DELETE,
                    body: vec![0x42; 64],
                }],
                sk_offset: None,
            };
            inputs.push(m.encode());
        }
    }
    // Every B->A datagram so far, mutated.
    for d in p.sent_b.clone() {
        for i in (0..d.len()).step_by(7) {
            let mut m = d.clone();
            m[i] ^= 0x5a;
            inputs.push(m);
        }
    }
    for d in inputs {
        let t = Transmit {
            source: addr(B),
            destination: addr(A),
            payload: d,
        };
        assert!(p.deliver_to_a(t).is_err());
    }
    p.collect();
    assert_eq!((p.a.message_ids(), p.a.child_spis()), before);
    assert!(p.a.is_established());
    assert!(!p
        .ev_a
        .iter()
        .any(|e| matches!(e, Event::ChildSaDeleted { .. })));
}

#[test]
fn child_sa_debug_redacts_keys() {
    let p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let c = &Pair::children(&p.ev_a)[0];
    let dbg = format!("{c:?}");
    assert!(dbg.contains("redacted"));
    let key_hex: String = c.keys.encr_in.as_bytes()[..4]
        .iter()
        .map(|b| format!("{b}, "))
        .collect();
    assert!(!dbg.contains(&key_hex));
}

#[test]
fn unknown_critical_payload_and_authenticated_garbage_are_answered() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    // B builds requests with its own keys (B's outbound = A's inbound).
    let mid = p.b().chan.next_send;
    let crit = [Payload::Unknown {
        ty: PayloadType(200),
        critical: true,
        data: vec![1, 2, 3],
    }];
    let req = p
        .b()
        .seal(false, ExchangeType::INFORMATIONAL, mid, false, &crit)
        .unwrap();
    let path = Addresses {
        local: addr(A),
        remote: addr(B),
    };
    p.a.handle_datagram(p.now, path, &req).unwrap();
    let resp = p.a.poll_transmit().unwrap().payload;
    let m = Message::decode(&resp).unwrap();
    let inner = p.b().decrypt(false, &resp, &m).unwrap().unwrap();
    assert!(matches!(&inner[0], Payload::Notify(n)
        if n.ty == NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD && n.data == vec![200]));
    // An authenticated request whose inner chain does not parse.
    let header = p
        .b()
        .header(ExchangeType::INFORMATIONAL, mid + 1, false, false);
    let iv = vec![7u8; 8];
    let garbage = p
        .b()
        .chan
        .keys
        .as_ref()
        .unwrap()
        .out
        .seal(&header, PayloadType::NOTIFY, &[0, 0, 0, 99], &iv)
        .unwrap();
    p.a.handle_datagram(p.now, path, &garbage).unwrap();
    let resp = p.a.poll_transmit().unwrap().payload;
    let m = Message::decode(&resp).unwrap();
    let inner = p.b().decrypt(false, &resp, &m).unwrap().unwrap();
    assert!(matches!(&inner[0], Payload::Notify(n) if n.ty == NotifyType::INVALID_SYNTAX));
    assert_eq!(p.a.message_ids().1, mid + 2);
    assert!(p.a.is_established());
}

#[test]
fn accept_survives_mutated_init_requests() {
    let now = Instant::now();
    let a = IkeSa::initiate(
        now,
        Arc::new(cfg(
            b"k",
            "a.example",
            "aes128-sha256",
            "14 19",
            "aes128-sha256",
            "",
        )),
        Addresses {
            local: addr(A),
            remote: addr(B),
        },
        Box::new(OsEntropy),
    );
    let mut a = a.unwrap();
    let req = a.poll_transmit().unwrap().payload;
    let b_cfg = Arc::new(cfg(
        b"k",
        "b.example",
        "aes128-sha256",
        "19",
        "aes128-sha256",
        "",
    ));
    let path = Addresses {
        local: addr(B),
        remote: addr(A),
    };
    let mut outcomes = [0usize; 3];
    for i in 0..req.len() {
        for x in [0x01u8, 0x80] {
            let mut m = req.clone();
            m[i] ^= x;
            match IkeSa::accept(now, b_cfg.clone(), path, Box::new(OsEntropy), &m) {
                Ok(Accepted::Sa(_)) => outcomes[0] += 1,
                Ok(Accepted::Reply(_)) => outcomes[1] += 1,
                Err(_) => outcomes[2] += 1,
            }
        }
    }
    // Flips inside the KE value or nonce still give an SA; most of the
    // rest are refused; nothing panics.
    assert!(
        outcomes[2] > 0 && outcomes[0] + outcomes[1] > 0,
        "{outcomes:?}"
    );
}

#[test]
fn restored_snapshot_takes_over_and_rekeys() {
    // B's state is replicated to a standby B' which then replaces B: the
    // peer notices nothing, and CREATE_CHILD_SA on the synced SA works
    // (the seed 002 failure must not happen here).
    let mut p = established("aes256-sha256", "14", "aes256-sha256");
    let now = p.now;
    let snap = p.b().snapshot(now).unwrap();
    assert_eq!(snap.next_recv, 2);
    assert_eq!(snap.children.len(), 1);
    let restored = IkeSa::restore(p.now, p.b_cfg.clone(), Box::new(OsEntropy), snap.clone());
    assert_eq!(
        restored.snapshot(p.now).unwrap(),
        snap,
        "restore(snapshot) is lossless"
    );
    p.b = Some(restored);
    p.ev_a.clear();
    p.ev_b.clear();
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply));
    let old = p.a.child_spis()[0];
    p.a.rekey_child(p.now, old).unwrap();
    p.settle();
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_eq!((ca.len(), cb.len()), (1, 1));
    assert_child_pair(&ca[0], &cb[0]);
    assert_eq!(p.b().child_spis(), vec![cb[0].inbound_spi]);
    {
        let now = p.now;
        p.b().rekey_ike(now).unwrap();
    }
    p.settle();
    assert_eq!(p.a.spis(), p.b().spis());
    assert_ne!(p.a.spis(), (snap.info.spi_i, snap.info.spi_r));
}

#[test]
fn pfs_group_mismatch_retries_with_the_responders_group() {
    // HDR, SK {SA, Ni, KEi(14), TSi, TSr} -->  <-- HDR, SK {N(INVALID_KE_PAYLOAD, 31)}
    // HDR, SK {SA, Ni, KEi(31), TSi, TSr} -->  <-- HDR, SK {SA, Nr, KEr(31), TSi, TSr}
    let mut p = Pair::new(
        cfg(
            b"k",
            "a.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "14 31",
        ),
        cfg(
            b"k",
            "b.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "31",
        ),
    );
    p.settle();
    p.a.create_child(p.now).unwrap();
    p.settle();
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_eq!(ca.len(), 2);
    assert_eq!(ca[1].pfs_group, Some(DhGroup::CURVE25519));
    assert_child_pair(&ca[1], &cb[1]);
    assert!(!p
        .ev_a
        .iter()
        .any(|e| matches!(e, Event::ChildSaFailed { .. })));
    // Rekeys use the same path.
    let old = ca[0].inbound_spi;
    p.a.rekey_child(p.now, old).unwrap();
    p.settle();
    assert!(!p.a.child_spis().contains(&old));
    assert_eq!(p.a.child_spis().len(), 2);
}

#[test]
fn peerid_text_matches_across_string_id_types() {
    use crate::wire::IdType;
    let fqdn = IdPayload::fqdn("Nokia_Peer");
    let keyid = IdPayload {
        id_type: IdType::KEY_ID,
        data: b"Nokia_Peer".to_vec(),
    };
    assert!(exchanges::id_matches(&fqdn, &keyid));
    assert!(!exchanges::id_matches(
        &fqdn,
        &IdPayload::fqdn("nokia_peer")
    ));
    let ip = IdPayload::from_ip("10.0.0.1".parse().unwrap());
    let ip_as_text = IdPayload::fqdn("10.0.0.1");
    assert!(!exchanges::id_matches(&ip, &ip_as_text));
    assert!(exchanges::id_matches(&ip, &ip.clone()));
    // End to end: B requires peerid Nokia_Peer, A sends it as KEY_ID.
    let mut a = cfg(b"k", "x", "aes128-sha256", "14", "aes128-sha256", "");
    a.local_id = keyid;
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128-sha256",
        "14",
        "aes128-sha256",
        "",
    );
    b.peer_id = Some(fqdn);
    let mut p = Pair::new(a, b);
    p.settle();
    assert!(p.a.is_established() && p.b().is_established());
}

#[test]
fn half_open_responder_gives_up_without_ike_auth() {
    let mut p = Pair::new(
        cfg(b"k", "a.example", "aes128-sha1", "14", "aes128-sha1", ""),
        cfg(b"k", "b.example", "aes128-sha1", "14", "aes128-sha1", ""),
    );
    // Only the IKE_SA_INIT request gets through.
    p.lose = Box::new(|from_a, n| !from_a || n > 0);
    p.settle();
    assert!(p.b().is_closed());
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::IkeSaDeleted {
            reason: DeleteReason::Timeout,
            ..
        }
    )));
    assert!(!p
        .ev_b
        .iter()
        .any(|e| matches!(e, Event::IkeSaEstablished(_))));
}

#[test]
fn requests_outside_the_window_are_dropped() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let path = Addresses {
        local: addr(A),
        remote: addr(B),
    };
    let next = p.b().chan.next_send;
    for mid in [next + 1, next + 100, u32::MAX] {
        let req = p
            .b()
            .seal(false, ExchangeType::INFORMATIONAL, mid, false, &[])
            .unwrap();
        assert!(matches!(
            p.a.handle_datagram(p.now, path, &req),
            Err(IkeError::InvalidMessageId { .. })
        ));
        assert!(
            p.a.poll_transmit().is_none(),
            "no answer outside the window"
        );
    }
    // The expected one is answered, and a replay of it gets the cached
    // response, byte for byte.
    let req = p
        .b()
        .seal(false, ExchangeType::INFORMATIONAL, next, false, &[])
        .unwrap();
    p.a.handle_datagram(p.now, path, &req).unwrap();
    let r1 = p.a.poll_transmit().unwrap().payload;
    p.a.handle_datagram(p.now, path, &req).unwrap();
    let r2 = p.a.poll_transmit().unwrap().payload;
    assert_eq!(r1, r2);
    assert_eq!(p.a.message_ids().1, next + 1);
}

/// A policy (phase2) with its own selectors and proposal.
fn policy(local: TrafficSelector, remote: TrafficSelector, esp: &str, pfs: &str) -> ChildPolicy {
    ChildPolicy {
        esp_proposals: phase2_list(esp).unwrap(),
        pfs_groups: dhgrp_list(pfs).unwrap(),
        local_ts: vec![local],
        remote_ts: vec![remote],
        lifetime: Duration::from_secs(3600),
    }
}

/// Sets policy 0 of `c` from `p`.
fn set_first(c: &mut IkeConfig, p: ChildPolicy) {
    c.esp_proposals = p.esp_proposals;
    c.pfs_groups = p.pfs_groups;
    c.local_ts = p.local_ts;
    c.remote_ts = p.remote_ts;
    c.child_lifetime = p.lifetime;
}

#[test]
fn every_phase2_gets_its_own_child_sa_and_rekeys_keep_their_policy() {
    // A has phase2s (10.1/16 <-> 10.2/16, gcm) and (10.11/16 <-> 10.12/16, cbc, PFS 31).
    // B lists the same two in the other order, with the other side's view.
    // IKE_AUTH carries the first CHILD SA; the second comes with
    // HDR, SK {SA, Ni, KEi, TSi, TSr} -->  <-- HDR, SK {SA, Nr, KEr, TSi, TSr}
    let (n1, n2) = (net("10.1.0.0", 16), net("10.2.0.0", 16));
    let (m1, m2) = (net("10.11.0.0", 16), net("10.12.0.0", 16));
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    set_first(&mut a, policy(n1.clone(), n2.clone(), "aes128gcm", ""));
    a.more_children = vec![policy(m1.clone(), m2.clone(), "aes256-sha256", "31")];
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    set_first(
        &mut b,
        policy(m2.clone(), m1.clone(), "aes256-sha256", "31"),
    );
    b.more_children = vec![policy(n2.clone(), n1.clone(), "aes128gcm", "")];
    let mut p = Pair::new(a, b);
    p.settle();
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_eq!((ca.len(), cb.len()), (2, 2), "{:?}\n{:?}", p.ev_a, p.ev_b);
    for (x, y) in ca.iter().zip(&cb) {
        assert_child_pair(x, y);
    }
    // A's policy 0 is B's policy 1 and the other way round: B chose by selectors.
    assert_eq!((ca[0].policy, cb[0].policy), (0, 1));
    assert_eq!((ca[1].policy, cb[1].policy), (1, 0));
    assert_eq!(
        (ca[0].local_ts.clone(), ca[0].remote_ts.clone()),
        (vec![n1], vec![n2])
    );
    assert_eq!(
        (ca[1].local_ts.clone(), ca[1].remote_ts.clone()),
        (vec![m1.clone()], vec![m2.clone()])
    );
    assert_eq!(ca[0].encr, Encr::AesGcm16(16));
    assert_eq!(ca[1].encr, Encr::AesCbc(32));
    assert_eq!(ca[1].pfs_group, Some(DhGroup::CURVE25519));
    assert_eq!(p.a.child_policies(), [0, 1]);
    assert_eq!(p.b().child_policies(), [0, 1]);

    // B rekeys its policy 0 (A's second phase2): the new SA keeps selectors and policy.
    let old = cb[1].inbound_spi;
    assert_eq!(cb[1].policy, 0);
    {
        let now = p.now;
        p.b().rekey_child(now, old).unwrap();
    }
    p.settle();
    let (ca, cb) = (Pair::children(&p.ev_a), Pair::children(&p.ev_b));
    assert_eq!((ca.len(), cb.len()), (3, 3));
    assert_child_pair(&ca[2], &cb[2]);
    assert_eq!((ca[2].policy, cb[2].policy), (1, 0));
    assert_eq!(ca[2].local_ts, vec![m1]);
    assert_eq!(ca[2].remote_ts, vec![m2]);
    assert_eq!(ca[2].pfs_group, Some(DhGroup::CURVE25519));
    assert_eq!(p.b().child_spis().len(), 2);
    assert!(!p.b().child_spis().contains(&old));
}

#[test]
fn a_new_child_takes_a_free_policy_and_unknown_selectors_are_refused() {
    let any = net("0.0.0.0", 0);
    let (n1, n2) = (net("10.1.0.0", 16), net("10.2.0.0", 16));
    let mut a = cfg(
        b"k",
        "a.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    set_first(&mut a, policy(any.clone(), any.clone(), "aes128gcm", ""));
    let mut b = cfg(
        b"k",
        "b.example",
        "aes128gcm-prfsha256",
        "19",
        "aes128gcm",
        "",
    );
    set_first(&mut b, policy(n2.clone(), n1.clone(), "aes128gcm", ""));
    b.more_children = vec![policy(
        net("10.22.0.0", 16),
        net("10.21.0.0", 16),
        "aes128gcm",
        "",
    )];
    let mut p = Pair::new(a, b);
    p.settle();
    // A asks 0/0 twice: B narrows the first to its policy 0, the second to its free policy 1.
    p.a.create_child(p.now).unwrap();
    p.settle();
    let cb = Pair::children(&p.ev_b);
    assert_eq!(cb.len(), 2);
    assert_eq!((cb[0].policy, cb[1].policy), (0, 1));
    assert_eq!(cb[1].local_ts, vec![net("10.22.0.0", 16)]);
    // A policy index that does not exist is refused locally.
    assert!(p.a.create_child_for(p.now, 5).is_err());
}

mod certificates {
    use super::*;
    use crate::cert::tests::{ec_key, rsa_key, Pki};
    use crate::cert::CertAuth;
    use openssl::nid::Nid;

    /// A gateway named `name` with a certificate from `issuer` for that name,
    /// trusting the CA of `trust`.
    fn cert_cfg(
        issuer: &Pki,
        trust: &Pki,
        name: &str,
        key: openssl::pkey::PKey<openssl::pkey::Private>,
    ) -> IkeConfig {
        let mut c = cfg(
            b"unused",
            name,
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        );
        let (local, _) = issuer.leaf(name, key);
        c.cert = Some(Arc::new(CertAuth {
            local,
            trust: trust.trust(Instant::now()),
        }));
        c
    }

    fn auth_failed(ev: &[Event]) -> Option<&'static str> {
        ev.iter().find_map(|e| match e {
            Event::AuthFailed { reason } => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn rsa_initiator_and_ecdsa_responder_authenticate_with_certificates() {
        // HDR, SAi1, KEi, Ni, N(SIGNATURE_HASH_ALGORITHMS) -->
        //   <-- HDR, SAr1, KEr, Nr, CERTREQ, N(SIGNATURE_HASH_ALGORITHMS)
        // HDR, SK {IDi, CERT, CERTREQ, AUTH(14), SAi2, TSi, TSr} -->
        //   <-- HDR, SK {IDr, CERT, AUTH(14), SAr2, TSi, TSr}
        let pki = Pki::new();
        let a = cert_cfg(&pki, &pki, "a.example", rsa_key());
        let b = cert_cfg(&pki, &pki, "b.example", ec_key(Nid::X9_62_PRIME256V1));
        let mut p = Pair::new(a, b);
        p.settle();
        assert!(p.a.is_established(), "{:?}", p.ev_a);
        assert!(p.b().is_established(), "{:?}", p.ev_b);
        check_establishment(&mut p, Encr::AesGcm16(16), None, DhGroup::ECP256);
        // The responder asked for certificates from our CA in IKE_SA_INIT.
        let init_resp = Message::decode(&p.sent_b[0]).unwrap();
        assert!(init_resp
            .payloads
            .iter()
            .any(|x| matches!(x, Payload::CertReq(_, d) if d.len() == 20)));
    }

    #[test]
    fn a_certificate_from_an_untrusted_ca_is_refused_on_both_sides() {
        let (ours, theirs) = (Pki::new(), Pki::new());
        // A's certificate comes from a CA B does not trust.
        let a = cert_cfg(&theirs, &ours, "a.example", ec_key(Nid::SECP384R1));
        let b = cert_cfg(&ours, &ours, "b.example", rsa_key());
        let mut p = Pair::new(a, b);
        p.settle();
        assert!(!p.a.is_established() && !p.b().is_established());
        assert_eq!(
            auth_failed(&p.ev_b),
            Some("peer certificate does not chain to a trusted CA")
        );
        assert_eq!(auth_failed(&p.ev_a), Some("peer rejected our AUTH"));
        assert!(Pair::children(&p.ev_a).is_empty() && Pair::children(&p.ev_b).is_empty());
    }

    #[test]
    fn an_identity_the_certificate_does_not_name_is_refused() {
        let pki = Pki::new();
        let mut a = cert_cfg(&pki, &pki, "a.example", rsa_key());
        a.local_id = IdPayload::fqdn("ceo.example");
        let b = cert_cfg(&pki, &pki, "b.example", rsa_key());
        let mut p = Pair::new(a, b);
        p.settle();
        assert!(!p.b().is_established());
        assert_eq!(
            auth_failed(&p.ev_b),
            Some("peer identity is not in its certificate")
        );
    }

    #[test]
    fn psk_against_certificates_is_refused() {
        let pki = Pki::new();
        let a = cfg(
            b"k",
            "a.example",
            "aes128gcm-prfsha256",
            "19",
            "aes128gcm",
            "",
        );
        let b = cert_cfg(&pki, &pki, "b.example", rsa_key());
        let mut p = Pair::new(a, b);
        p.settle();
        assert!(!p.a.is_established() && !p.b().is_established());
        assert_eq!(
            auth_failed(&p.ev_b),
            Some("peer used a PSK where a certificate is required")
        );
    }
}

// ---------------------------------------------------------------------------
// RFC 6311 message ID synchronisation
// ---------------------------------------------------------------------------

/// B's copy is taken, then both sides run exchanges the copy does not see (a liveness
/// check each way): the copy is one request behind in each direction.
fn stale_copy() -> (Pair, IkeSaSnapshot) {
    let mut p = established("aes256-sha256", "14", "aes256-sha256");
    assert!(p.a.peer_supports_mid_sync() && p.b().peer_supports_mid_sync());
    let now = p.now;
    let snap = p.b().snapshot(now).unwrap();
    assert!(snap.mid_sync, "support is part of the copy");
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    let now = p.now;
    p.b().start_liveness_check(now).unwrap();
    p.settle();
    assert_eq!(
        (p.b().message_ids()),
        (snap.next_send + 1, snap.next_recv + 1)
    );
    p.ev_a.clear();
    p.ev_b.clear();
    (p, snap)
}

/// Member 1's SA stays established while member 2 carries it from a copy and answers A's
/// requests; member 1 takes it back with member 2's message IDs (which may lag what it
/// answered last by one exchange): A's next request is answered. Without adopting them,
/// member 1 drops it (an ID it has not seen) and A's liveness check fails.
#[test]
fn an_sa_taken_back_while_established_adopts_the_other_members_message_ids() {
    for lag in [0u32, 1] {
        let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
        let stale = p.b.take().unwrap();
        let snap = stale.snapshot(p.now).unwrap();
        p.b = Some(IkeSa::restore(
            p.now,
            p.b_cfg.clone(),
            Box::new(OsEntropy),
            snap,
        ));
        for _ in 0..2 {
            p.a.start_liveness_check(p.now).unwrap();
            p.settle();
        }
        assert_eq!(
            p.ev_a
                .iter()
                .filter(|e| **e == Event::LivenessReply)
                .count(),
            2,
            "member 2 answers"
        );
        let (send, recv) = p.b.take().unwrap().message_ids();
        let mut back = stale;
        assert!(back.adopt_copy_message_ids(send, recv - lag));
        assert!(
            !back.adopt_copy_message_ids(send, recv - lag),
            "never down, idempotent"
        );
        p.b = Some(back);
        p.ev_a.clear();
        p.a.start_liveness_check(p.now).unwrap();
        p.settle();
        assert!(
            p.ev_a.contains(&Event::LivenessReply),
            "lag {lag}: member 1 answers A's next request: {:?}",
            p.ev_a
        );
        assert_eq!(p.b().message_ids().1, recv + 1);
    }
}

#[test]
fn a_stale_copy_without_sync_takes_the_peers_next_request_within_the_catch_up_window() {
    // No sync: the restored SA takes A's next authenticated request although its copy
    // expected an earlier ID (the previous owner answered the one between).
    let (mut p, snap) = stale_copy();
    let expected = snap.next_recv;
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap.clone(),
    ));
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);
    assert!(
        p.ev_b.contains(&Event::MessageIdsCaughtUp {
            expected,
            got: expected + 1
        }),
        "{:?}",
        p.ev_b
    );
    assert_eq!(p.b().message_ids().1, expected + 2);
    // Further requests follow the usual rule, exact IDs only.
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert_eq!(
        p.ev_a
            .iter()
            .filter(|e| **e == Event::LivenessReply)
            .count(),
        2
    );

    // The failure RFC 6311 exists for: a copy further behind than the window drops A's
    // request until A gives up on it.
    let (mut p, snap) = stale_copy();
    for _ in 0..MID_CATCH_UP {
        p.a.start_liveness_check(p.now).unwrap();
        p.settle();
    }
    p.ev_a.clear();
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    p.a.start_liveness_check(p.now).unwrap();
    p.run(Duration::from_secs(600));
    assert!(!p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);
    assert!(p.ev_a.contains(&Event::LivenessTimeout), "{:?}", p.ev_a);
}

#[test]
fn an_aead_sa_is_synced_once_even_by_a_member_whose_copy_is_older_than_the_sync() {
    // The fault run's failure: member 1 took the SA over and synced; member 2's copy,
    // made before that sync (the update was lost on the HA link), must not sync again,
    // or the peer has to encrypt a second response with message ID 0 under the same AEAD
    // key (strongSwan refuses and destroys the IKE SA).
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let now = p.now;
    let before_sync = p.b().snapshot(now).unwrap();
    assert_eq!(before_sync.next_send, 0);
    assert!(!before_sync.mid_sync_spent);

    // Member 1: reserves the sync (the cluster records it), then sends it.
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        before_sync.clone(),
    ));
    let now = p.now;
    assert_eq!(
        p.b().reserve_mid_sync(4).ok(),
        Some(MidSyncStart::Reserved { next_send: 4 })
    );
    // Reserved: counted as started in the copies, and nothing of ours leaves meanwhile.
    assert!(p.b().snapshot(now).unwrap().mid_sync_spent);
    p.b().start_liveness_check(now).unwrap();
    p.collect();
    assert!(p.ba.is_empty(), "nothing sent while the sync is reserved");
    assert_eq!(
        p.b().sync_message_ids(now, 99).ok(),
        Some(MidSyncStart::Sent)
    );
    p.settle();
    assert!(p.ev_b.iter().any(|e| matches!(
        e,
        Event::MessageIdsSynced {
            initiated: true,
            next_send: 4,
            ..
        }
    )));
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    let now = p.now;
    let after_sync = p.b().snapshot(now).unwrap();
    assert!(after_sync.mid_sync_spent);

    let synced_responses = |p: &Pair| {
        p.ev_a
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::MessageIdsSynced {
                        initiated: false,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(synced_responses(&p), 1);

    // Member 2 from a copy made after the sync: no second one.
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        after_sync.clone(),
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::AlreadySynced)
    );
    assert_eq!(
        p.b().reserve_mid_sync(4).ok(),
        Some(MidSyncStart::AlreadySynced)
    );
    p.collect();
    assert!(p.ba.is_empty(), "nothing sent");

    // Member 3 from the copy made before the sync, with the cluster's mark: no second
    // one, and it continues at the M1 the peer adopted.
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        before_sync.clone(),
    ));
    let now = p.now;
    p.b().adopt_mid_sync_mark(4);
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::AlreadySynced)
    );
    p.collect();
    assert!(p.ba.is_empty(), "nothing sent");
    assert_eq!(synced_responses(&p), 1, "the peer answered one sync only");
    // Its own request uses the ID after the liveness check member 1 sent at 4; the copy
    // says 4 (the mark): the peer answers it as the retransmission of 4, then 5 works.
    p.ev_b.clear();
    let now = p.now;
    p.b().start_liveness_check(now).unwrap();
    p.settle();
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    p.ev_b.clear();
    let now = p.now;
    p.b().start_liveness_check(now).unwrap();
    p.settle();
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    // The peer's requests reach it too.
    p.ev_a.clear();
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);

    // A rekeyed IKE SA has new keys: it may be synced once again.
    let now = p.now;
    p.b().rekey_ike(now).unwrap();
    p.settle();
    let now = p.now;
    let rekeyed = p.b().snapshot(now).unwrap();
    assert!(!rekeyed.mid_sync_spent);

    // Without the peer's response the reserved sync can be given up: held requests go.
    let mut q = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let now = q.now;
    let snap = q.b().snapshot(now).unwrap();
    q.b = Some(IkeSa::restore(
        q.now,
        q.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    let now = q.now;
    assert!(matches!(
        q.b().reserve_mid_sync(4),
        Ok(MidSyncStart::Reserved { .. })
    ));
    q.b().start_liveness_check(now).unwrap();
    q.collect();
    assert!(q.ba.is_empty());
    q.b().release_mid_sync(now).unwrap();
    q.settle();
    assert!(q.ev_b.contains(&Event::LivenessReply), "{:?}", q.ev_b);
    assert!(
        q.b().mid_sync_spent(),
        "a released reservation still counts"
    );
}

#[test]
fn a_stale_copy_is_resynced_with_message_id_sync_and_exchanges_continue() {
    let (mut p, snap) = stale_copy();
    let (a_send, a_recv) = p.a.message_ids();
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap.clone(),
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::Sent)
    );
    assert!(p.b().mid_sync_pending());
    // Nothing else is started while the sync is outstanding.
    p.b().start_liveness_check(now).unwrap();
    p.collect();
    let first = p.ba.len();
    p.settle();
    assert!(!p.b().mid_sync_pending());
    // Both sides logged the sync with the IDs now in force: B sends from M1 (its stale
    // next ID + 4, above the one A has seen), and expects A's real next ID.
    let m1 = snap.next_send + 4;
    assert!(
        p.ev_b.contains(&Event::MessageIdsSynced {
            initiated: true,
            next_send: m1 + 1, // the queued liveness check went out after the sync
            next_recv: a_send,
        }) || p.ev_b.contains(&Event::MessageIdsSynced {
            initiated: true,
            next_send: m1,
            next_recv: a_send,
        })
    );
    assert!(p.ev_a.contains(&Event::MessageIdsSynced {
        initiated: false,
        next_send: a_send,
        next_recv: m1,
    }));
    assert!(a_recv < m1);
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    assert_eq!(first, 1, "only the sync request left B before the answer");
    // The peer's requests, a CHILD rekey and an IKE rekey from each side work.
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);
    let old = p.a.child_spis()[0];
    p.a.rekey_child(p.now, old).unwrap();
    p.settle();
    let now = p.now;
    let spi = p.b().child_spis()[0];
    p.b().rekey_child(now, spi).unwrap();
    p.settle();
    assert_eq!(Pair::children(&p.ev_a).len(), 2);
    assert_eq!(Pair::children(&p.ev_b).len(), 2);
    p.a.rekey_ike(p.now).unwrap();
    p.settle();
    let now = p.now;
    p.b().rekey_ike(now).unwrap();
    p.settle();
    assert_eq!(p.a.spis(), p.b().spis());
    assert_ne!(p.a.spis(), (snap.info.spi_i, snap.info.spi_r));
    assert!(p.a.is_established() && p.b().is_established());
}

#[test]
fn a_sync_request_below_the_ids_seen_is_dropped() {
    // RFC 6311 §5.1: M1 at or below the highest ID the peer has seen from the cluster is
    // silently dropped; the asking side retransmits, then gives the SA up.
    let (mut p, snap) = stale_copy();
    let before = p.a.message_ids();
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 0).ok(),
        Some(MidSyncStart::Sent)
    );
    p.run(Duration::from_secs(600));
    assert_eq!(p.a.message_ids(), before, "A's counters unchanged");
    assert!(p
        .ev_a
        .iter()
        .all(|e| !matches!(e, Event::MessageIdsSynced { .. })));
    assert!(p.b().is_closed());
}

#[test]
fn no_sync_without_the_peers_announcement() {
    let (mut p, mut snap) = stale_copy();
    snap.mid_sync = false;
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::NotSupported)
    );
    p.collect();
    assert!(p.ba.is_empty(), "nothing sent");
    // And an SA that is not established cannot sync.
    let mut q = Pair::new(
        cfg(
            b"s",
            "a.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "",
        ),
        cfg(
            b"s",
            "b.example",
            "aes256-sha256",
            "14",
            "aes256-sha256",
            "",
        ),
    );
    assert!(matches!(
        q.a.sync_message_ids(q.now, 4),
        Err(IkeError::NotEstablished)
    ));
    q.collect();
}

#[test]
fn no_sync_where_the_peers_response_could_reuse_an_aead_iv() {
    // B (the responder) sent liveness checks with message IDs 0 and up: A has already
    // encrypted a response with ID 0 under these keys. With AES-GCM a second one could
    // reuse A's IV if A counts its IVs by message ID, so B does not ask.
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let now = p.now;
    p.b().start_liveness_check(now).unwrap();
    p.settle();
    let now = p.now;
    let snap = p.b().snapshot(now).unwrap();
    assert!(snap.next_send > 0);
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::AeadIvReuse)
    );
    p.collect();
    assert!(p.ba.is_empty(), "nothing sent");
    // Before any request of B's, the sync is safe and goes out.
    let mut q = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let now = q.now;
    let snap = q.b().snapshot(now).unwrap();
    assert_eq!(snap.next_send, 0);
    q.b = Some(IkeSa::restore(
        q.now,
        q.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    let now = q.now;
    assert_eq!(
        q.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::Sent)
    );
    q.settle();
    assert!(q.ev_b.iter().any(|e| matches!(
        e,
        Event::MessageIdsSynced {
            initiated: true,
            ..
        }
    )));
}

/// A member took an AEAD IKE SA over and synced its message IDs, but the peer's answer went
/// elsewhere (to the member that still carried the tunnel, behind a router that had not
/// moved it). The request is not sent again: strongSwan, having answered it once, would
/// have to encrypt a second response with message ID 0, which it refuses before
/// destroying the IKE SA. The SA continues at the IDs it proposed, which the peer adopted:
/// requests from both sides and a CHILD SA rekey from each work.
#[test]
fn an_unanswered_sync_on_an_aead_sa_is_not_sent_again_and_its_ids_hold() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let now = p.now;
    let snap = p.b().snapshot(now).unwrap();
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap.clone(),
    ));
    let now = p.now;
    assert_eq!(
        p.b().sync_message_ids(now, 4).ok(),
        Some(MidSyncStart::Sent)
    );
    p.collect();
    let sent_before = p.sent_b.len();
    let request = p.ba.pop_front().expect("the sync request");
    p.deliver_to_a(request).unwrap();
    p.collect();
    assert_eq!(p.ab.len(), 1, "the peer answered");
    p.ab.clear();
    let m1 = snap.next_send + 4;
    assert!(p.ev_a.contains(&Event::MessageIdsSynced {
        initiated: false,
        next_send: p.a.message_ids().0,
        next_recv: m1,
    }));
    // Past the whole retransmission schedule.
    p.run(Duration::from_secs(600));
    assert_eq!(
        p.sent_b.len(),
        sent_before,
        "the sync request went out once"
    );
    assert!(p.b().is_established(), "{:?}", p.ev_b);
    assert!(
        p.ev_b.contains(&Event::MessageIdSyncUnanswered {
            next_send: m1,
            next_recv: snap.next_recv,
        }),
        "{:?}",
        p.ev_b
    );
    assert!(!p.b().mid_sync_pending());
    // Exchanges go on under the IDs the peer adopted.
    let now = p.now;
    p.b().start_liveness_check(now).unwrap();
    p.settle();
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    p.a.start_liveness_check(p.now).unwrap();
    p.settle();
    assert!(p.ev_a.contains(&Event::LivenessReply), "{:?}", p.ev_a);
    let (a0, b0) = (Pair::children(&p.ev_a).len(), Pair::children(&p.ev_b).len());
    let old = p.a.child_spis()[0];
    p.a.rekey_child(p.now, old).unwrap();
    p.settle();
    let now = p.now;
    let spi = p.b().child_spis()[0];
    p.b().rekey_child(now, spi).unwrap();
    p.settle();
    assert_eq!(Pair::children(&p.ev_a).len(), a0 + 2);
    assert_eq!(Pair::children(&p.ev_b).len(), b0 + 2);
    assert!(p.a.is_established() && p.b().is_established());
}

/// Member 1 keeps the SA and sends a liveness check (a DPD probe) while member 2, from a
/// copy, has sent three requests of its own to the peer: the peer takes member 1's ID as
/// old and ignores it. When member 2's copy reaches member 1, the probe goes again under
/// the copy's next ID and is answered; without that it went on under its old ID until the
/// DPD gave the peer up. A CHILD SA rekey from member 1 then works too.
#[test]
fn a_request_in_flight_when_a_later_copy_arrives_goes_again_under_the_copys_id() {
    let mut p = established("aes128gcm-prfsha256", "19", "aes128gcm");
    let member1 = p.b.take().unwrap();
    let snap = member1.snapshot(p.now).unwrap();
    p.b = Some(IkeSa::restore(
        p.now,
        p.b_cfg.clone(),
        Box::new(OsEntropy),
        snap,
    ));
    for _ in 0..3 {
        let now = p.now;
        p.b().start_liveness_check(now).unwrap();
        p.settle();
    }
    assert_eq!(
        p.ev_b
            .iter()
            .filter(|e| **e == Event::LivenessReply)
            .count(),
        3
    );
    let member2 = p.b.take().unwrap();
    let (send, recv) = member2.message_ids();
    // Member 1's probe, under the ID it had: the peer ignores it.
    p.b = Some(member1);
    p.ev_b.clear();
    let now = p.now;
    let old_mid = p.b().message_ids().0;
    assert!(old_mid + 3 == send);
    p.b().start_liveness_check(now).unwrap();
    p.collect();
    let probe = p.ba.pop_front().expect("the probe");
    p.deliver_to_a(probe).ok();
    p.collect();
    assert!(p.ab.is_empty(), "the peer ignored the old ID");
    // Member 2's copy arrives: the probe goes again under its next ID, and is answered.
    assert!(p.b().adopt_copy_message_ids(send, recv));
    p.collect();
    assert_eq!(p.ba.len(), 1, "the probe again");
    p.step();
    p.step();
    assert!(p.ev_b.contains(&Event::LivenessReply), "{:?}", p.ev_b);
    assert_eq!(p.b().message_ids().0, send + 1);
    let before = Pair::children(&p.ev_b).len();
    let now = p.now;
    let spi = p.b().child_spis()[0];
    p.b().rekey_child(now, spi).unwrap();
    p.settle();
    assert_eq!(Pair::children(&p.ev_b).len(), before + 1);
    assert!(p.a.is_established() && p.b().is_established());
}
