//! The IKE responder fed whole message sequences: the body of the
//! `responder` cargo-fuzz target (`fuzz/fuzz_targets/responder.rs`) and of
//! the stable smoke test `sa::fuzz::tests` run by `cargo test`.
//!
//! The input is a program for a small interpreter. A real initiator
//! ([`IkeSa::initiate`]) talks to the responder through a driver that does
//! what `ikemgr` does (route by SPI, [`CookieGuard`] before
//! [`IkeSa::accept`]); the program chooses when its messages travel, and
//! mixes in mutated, replayed and raw datagrams, requests and responses
//! *encrypted with the SA's real keys* (so the fuzzer gets past integrity
//! checks into IKE_AUTH, CREATE_CHILD_SA and INFORMATIONAL handling),
//! degenerate KE values, time jumps, and either side's mutators.
//!
//! After every step the responder's outputs are checked: a CHILD SA is
//! never installed twice, never deleted without having been installed,
//! and none is left installed once the IKE SA is gone; the expected
//! message ID never goes back while the SPIs stay the same; the responder
//! never sends to anyone but the peer it talks to.

use super::*;
use crate::cookie::{CookieGuard, GuardConfig, Verdict};
use crate::crypto::KeyExchange;
use crate::proposal::{dhgrp_list, phase1_list, phase2_list};
use crate::wire::{TransformType, TsType};
use std::collections::BTreeMap;

/// Longest program, in steps.
const MAX_STEPS: usize = 96;
/// The initiator's and the responder's addresses.
const I_ADDR: [u8; 4] = [192, 0, 2, 1];
const R_ADDR: [u8; 4] = [198, 51, 100, 2];

/// Counter-based deterministic entropy (splitmix64), so a crashing input
/// replays the same SPIs and nonces. DH private keys still come from
/// openssl.
#[derive(Clone)]
pub(crate) struct Det(pub(crate) u64);

impl Entropy for Det {
    fn fill(&mut self, buf: &mut [u8]) -> std::result::Result<(), CryptoError> {
        for b in buf.iter_mut() {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *b = (z ^ (z >> 31)) as u8;
        }
        Ok(())
    }
}

/// Reads the program; past its end every read is 0.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// Up to `max - 1` octets, length first.
    fn blob(&mut self, max: u8) -> Vec<u8> {
        let n = usize::from(self.u8() % max);
        self.bytes(n)
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        if from.is_empty() {
            return None;
        }
        from.get(usize::from(self.u8()) % from.len()).copied()
    }
}

/// The responder with its driver, the real initiator, and the checks.
pub(crate) struct Harness {
    pub(crate) now: Instant,
    pub(crate) guard: CookieGuard,
    pub(crate) resp_cfg: Arc<IkeConfig>,
    pub(crate) init: IkeSa,
    pub(crate) resp: Option<IkeSa>,
    /// Initiator -> responder datagrams in flight.
    pub(crate) to_resp: VecDeque<Transmit>,
    /// Responder -> initiator datagrams in flight.
    pub(crate) to_init: VecDeque<Transmit>,
    /// Every datagram delivered to the responder, for replays.
    pub(crate) history: Vec<Vec<u8>>,
    /// Installed CHILD SAs of the responder: inbound -> outbound SPI.
    pub(crate) live: BTreeMap<u32, u32>,
    /// Every event the responder emitted.
    pub(crate) events: Vec<Event>,
    /// Source of the half-open SA counted in the guard.
    half_open: Option<IpAddr>,
    /// (SPIs, next expected request ID) seen last.
    last_mid: Option<((u64, u64), u32)>,
    seed: u64,
}

fn sock(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

impl Harness {
    /// `flags`: bit 0 PFS, bit 1 CBC + HMAC instead of AES-GCM, bit 2
    /// forced NAT-T, bit 3 COOKIE from the first request.
    pub(crate) fn new(flags: u8) -> Option<Harness> {
        let now = Instant::now();
        let (ike, esp) = if flags & 2 != 0 {
            ("aes128-sha256", "aes128-sha256")
        } else {
            ("aes128gcm-prfsha256", "aes128gcm")
        };
        let mk = |id: &str| -> Option<IkeConfig> {
            let mut c = IkeConfig::psk(b"fuzz-psk", IdPayload::fqdn(id));
            c.ike_proposals = phase1_list(ike).ok()?;
            c.ike_groups = dhgrp_list("31 19").ok()?;
            c.esp_proposals = phase2_list(esp).ok()?;
            c.pfs_groups = if flags & 1 != 0 {
                dhgrp_list("31").ok()?
            } else {
                Vec::new()
            };
            c.rekey_jitter = Duration::ZERO;
            if flags & 4 != 0 {
                c.nat_traversal = NatTraversal::Forced;
            }
            Some(c)
        };
        let seed = u64::from(flags);
        let init = IkeSa::initiate(
            now,
            Arc::new(mk("initiator.example")?),
            Addresses {
                local: sock(I_ADDR, 500),
                remote: sock(R_ADDR, 500),
            },
            Box::new(Det(seed.wrapping_add(1) << 32)),
        )
        .ok()?;
        let guard = CookieGuard::new(
            now,
            GuardConfig {
                cookie_threshold: if flags & 8 != 0 { 0 } else { 30 },
                max_half_open_per_source: 2,
                max_half_open: 4,
                secret_lifetime: Duration::from_secs(120),
            },
            &mut Det(seed),
        )
        .ok()?;
        let mut h = Harness {
            now,
            guard,
            resp_cfg: Arc::new(mk("responder.example")?),
            init,
            resp: None,
            to_resp: VecDeque::new(),
            to_init: VecDeque::new(),
            history: Vec::new(),
            live: BTreeMap::new(),
            events: Vec::new(),
            half_open: None,
            last_mid: None,
            seed,
        };
        h.pump();
        Some(h)
    }

    /// What `ikemgr` does with a datagram at the responder's address.
    pub(crate) fn deliver(&mut self, from: SocketAddr, to_port: u16, d: &[u8]) -> Result<()> {
        self.history.push(d.to_vec());
        let local = sock(R_ADDR, to_port);
        let path = Addresses {
            local,
            remote: from,
        };
        let hdr = Header::decode(&mut crate::wire::reader::Reader::new(d));
        let routed = match (&self.resp, &hdr) {
            (Some(r), Ok(h)) if !r.is_closed() => {
                let (spi_i, _) = r.spis();
                r.local_spis().contains(&h.spi_r)
                    || (h.spi_r == 0 && h.spi_i == spi_i && from.ip() == r.addresses().remote.ip())
            }
            _ => false,
        };
        if routed {
            let r = self.resp.as_mut().ok_or(IkeError::Internal("no SA"))?;
            let out = r.handle_datagram(self.now, path, d);
            self.pump();
            return out;
        }
        let h = hdr.map_err(IkeError::Decode)?;
        if h.spi_r != 0 || h.exchange != ExchangeType::IKE_SA_INIT || h.flags.response() {
            return Err(IkeError::WrongSa);
        }
        self.seed = self.seed.wrapping_add(1);
        let mut ent = Det(self.seed << 40);
        match self.guard.check(self.now, from, d, &mut ent) {
            Verdict::Accept => {}
            Verdict::Reply(payload) => {
                self.to_init.push_back(Transmit {
                    source: local,
                    destination: from,
                    payload,
                });
                return Ok(());
            }
            Verdict::Drop(_) => return Err(IkeError::Unexpected("dropped by the guard")),
        }
        if self.resp.as_ref().is_some_and(|r| !r.is_closed()) {
            // One responder SA per harness; ikemgr would make another.
            return Err(IkeError::Unexpected("harness holds one SA"));
        }
        match IkeSa::accept(self.now, self.resp_cfg.clone(), path, Box::new(ent), d)? {
            Accepted::Sa(sa) => {
                self.finish_half_open();
                self.guard.half_open_started(from.ip());
                self.half_open = Some(from.ip());
                self.live.clear();
                self.last_mid = None;
                self.resp = Some(*sa);
            }
            Accepted::Reply(t) => self.to_init.push_back(t),
        }
        self.pump();
        Ok(())
    }

    fn finish_half_open(&mut self) {
        if let Some(ip) = self.half_open.take() {
            self.guard.half_open_finished(ip);
        }
    }

    /// Moves outputs into the queues and checks the responder's events.
    pub(crate) fn pump(&mut self) {
        while let Some(t) = self.init.poll_transmit() {
            self.to_resp.push_back(t);
        }
        while self.init.poll_event().is_some() {}
        let Some(r) = self.resp.as_mut() else {
            return;
        };
        let peer = r.addresses().remote;
        let mut evs = Vec::new();
        while let Some(t) = r.poll_transmit() {
            assert!(
                t.destination.ip() == peer.ip() || t.destination.ip() == IpAddr::from(I_ADDR),
                "responder sent to {} while its peer is {peer}",
                t.destination
            );
            self.to_init.push_back(t);
        }
        while let Some(e) = r.poll_event() {
            evs.push(e);
        }
        let spis = r.spis();
        let (_, next_recv) = r.message_ids();
        let closed = r.is_closed();
        let children: Vec<u32> = r.child_spis();
        for e in evs {
            match &e {
                Event::ChildSaEstablished(c) => {
                    let dup = self.live.insert(c.inbound_spi, c.outbound_spi);
                    assert!(
                        dup.is_none(),
                        "CHILD SA {:08x} installed twice",
                        c.inbound_spi
                    );
                }
                Event::ChildSaDeleted { inbound_spi, .. } => {
                    assert!(
                        self.live.remove(inbound_spi).is_some(),
                        "CHILD SA {inbound_spi:08x} deleted but never installed"
                    );
                }
                Event::IkeSaEstablished(_) => self.finish_half_open(),
                _ => {}
            }
            self.events.push(e);
        }
        if closed {
            self.finish_half_open();
            assert!(
                self.live.is_empty(),
                "IKE SA closed with CHILD SAs installed: {:x?}",
                self.live
            );
        }
        for spi in self.live.keys() {
            assert!(
                children.contains(spi),
                "installed CHILD SA {spi:08x} unknown to the SA"
            );
        }
        if let Some((s, m)) = self.last_mid {
            if s == spis {
                assert!(
                    next_recv >= m,
                    "expected message ID went back: {m} -> {next_recv}"
                );
            }
        }
        self.last_mid = Some((spis, next_recv));
    }

    /// Delivers every honest datagram in flight, both ways, a few rounds.
    pub(crate) fn settle(&mut self) {
        for _ in 0..8 {
            if self.to_resp.is_empty() && self.to_init.is_empty() {
                return;
            }
            while let Some(t) = self.to_resp.pop_front() {
                let _ = self.deliver(t.source, t.destination.port(), &t.payload);
            }
            self.deliver_all_deliver_to_initiator();
        }
    }

    fn deliver_all_deliver_to_initiator(&mut self) {
        while let Some(t) = self.to_init.pop_front() {
            self.deliver_to_initiator(t);
        }
    }

    fn deliver_to_initiator(&mut self, t: Transmit) {
        let path = Addresses {
            local: t.destination,
            remote: t.source,
        };
        let _ = self.init.handle_datagram(self.now, path, &t.payload);
        self.pump();
    }

    /// Runs both sides' timers due by `now`.
    pub(crate) fn advance(&mut self, by: Duration) {
        self.now += by;
        for _ in 0..16 {
            let mut any = false;
            if self.init.poll_timeout().is_some_and(|t| t <= self.now) {
                self.init.handle_timeout(self.now);
                any = true;
            }
            if let Some(r) = self.resp.as_mut() {
                if r.poll_timeout().is_some_and(|t| t <= self.now) {
                    r.handle_timeout(self.now);
                    any = true;
                }
            }
            self.pump();
            if !any {
                break;
            }
        }
    }

    /// A message from the peer's side of the responder's current (or old)
    /// IKE SA, encrypted and authenticated with the SA's real keys.
    pub(crate) fn forge(
        &self,
        old: bool,
        exchange: ExchangeType,
        mid: u32,
        response: bool,
        first: PayloadType,
        inner: &[u8],
    ) -> Option<Vec<u8>> {
        let r = self.resp.as_ref()?;
        let ch = if old { r.old.as_ref()? } else { &r.chan };
        let keys = ch.keys.as_ref()?;
        // The peer's direction: its I flag and keys are the opposite of ours.
        let peer_is_initiator = !ch.initiator;
        let sk = &keys.sk;
        let (e, a) = if peer_is_initiator {
            (&sk.sk_ei, &sk.sk_ai)
        } else {
            (&sk.sk_er, &sk.sk_ar)
        };
        let cipher = SkCipher::new(keys.suite.encr, keys.suite.integ, e.clone(), a.clone());
        let header = Header {
            spi_i: ch.spi_i,
            spi_r: ch.spi_r,
            next_payload: PayloadType::NONE,
            version: IKEV2_VERSION,
            exchange,
            flags: Flags::new(peer_is_initiator, response),
            message_id: mid,
            length: 0,
        };
        let iv = vec![0x5a; keys.suite.encr.iv_len()];
        cipher.seal(&header, first, inner, &iv).ok()
    }

    /// [`Harness::forge`] of a payload list.
    pub(crate) fn forge_payloads(
        &self,
        old: bool,
        exchange: ExchangeType,
        mid: u32,
        response: bool,
        payloads: &[Payload],
    ) -> Option<Vec<u8>> {
        let mut inner = Vec::new();
        let first = encode_chain(payloads, &mut inner);
        self.forge(old, exchange, mid, response, first, &inner)
    }

    /// The responder's (next expected request ID, ID of its outstanding request).
    pub(crate) fn mids(&self, old: bool) -> (u32, u32) {
        let Some(r) = self.resp.as_ref() else {
            return (0, 0);
        };
        let ch = if old { r.old.as_ref() } else { Some(&r.chan) };
        ch.map_or((0, 0), |c| {
            (
                c.next_recv,
                c.outstanding
                    .as_ref()
                    .map_or(c.next_send.wrapping_sub(1), |o| o.mid),
            )
        })
    }
}

/// Degenerate and honest KE public values (RFC 7296 §3.4, RFC 6989).
fn ke_value(c: &mut Cursor<'_>, group: DhGroup) -> Vec<u8> {
    let len = crate::crypto::public_len(group).unwrap_or(32);
    match c.u8() % 8 {
        0 => Vec::new(),
        1 => vec![0; len],
        2 => {
            let mut v = vec![0; len];
            if let Some(x) = v.last_mut() {
                *x = 1;
            }
            v
        }
        3 => vec![0xff; len],
        4 => {
            // p - 1 for MODP groups (p is all ones in its top and bottom 64 bits).
            let mut v = vec![0xff; len];
            if let Some(x) = v.last_mut() {
                *x = 0xfe;
            }
            v
        }
        5 => {
            // A Curve25519 point of small order (RFC 7748 §6.1 lists them).
            let mut v = vec![0; len];
            if let Some(x) = v.first_mut() {
                *x = 0xe0;
            }
            v
        }
        6 => KeyExchange::generate(group)
            .map(|k| k.public_value().to_vec())
            .unwrap_or_default(),
        _ => {
            let n = usize::from(c.u8());
            c.bytes(n)
        }
    }
}

fn spi_from(c: &mut Cursor<'_>, h: &Harness) -> Vec<u8> {
    let known: Vec<u32> = h.live.iter().flat_map(|(i, o)| [*i, *o]).collect();
    match c.u8() % 4 {
        0 | 1 => c
            .pick(&known)
            .map_or_else(|| vec![0; 4], |s| s.to_be_bytes().to_vec()),
        2 => c.u32().to_be_bytes().to_vec(),
        _ => {
            let n = usize::from(c.u8() % 12);
            c.bytes(n)
        }
    }
}

fn payload(c: &mut Cursor<'_>, h: &Harness) -> Payload {
    let groups = [
        DhGroup::CURVE25519,
        DhGroup::ECP256,
        DhGroup::MODP2048,
        DhGroup::MODP1024,
        DhGroup::NONE,
    ];
    match c.u8() % 12 {
        0 | 1 => {
            let ty = c
                .pick(&[
                    NotifyType::REKEY_SA,
                    NotifyType::TEMPORARY_FAILURE,
                    NotifyType::NO_PROPOSAL_CHOSEN,
                    NotifyType::INVALID_KE_PAYLOAD,
                    NotifyType::AUTHENTICATION_FAILED,
                    NotifyType::CHILD_SA_NOT_FOUND,
                    NotifyType::TS_UNACCEPTABLE,
                    NotifyType::USE_TRANSPORT_MODE,
                    NotifyType::COOKIE,
                    NotifyType::INVALID_SPI,
                ])
                .unwrap_or(NotifyType::REKEY_SA);
            let ty = if c.u8() < 16 { NotifyType(c.u16()) } else { ty };
            let protocol = ProtocolId(c.u8() % 5);
            let spi = spi_from(c, h);
            let n = usize::from(c.u8() % 8);
            Payload::Notify(NotifyPayload {
                protocol,
                spi,
                ty,
                data: c.bytes(n),
            })
        }
        2 | 3 => {
            let protocol = ProtocolId(c.u8() % 5);
            let n = usize::from(c.u8() % 4);
            let spis: Vec<Vec<u8>> = (0..n).map(|_| spi_from(c, h)).collect();
            let spi_size = match c.u8() % 4 {
                0 => 0,
                1 => 8,
                2 => c.u8(),
                _ => 4,
            };
            Payload::Delete(DeletePayload {
                protocol,
                spi_size,
                spis,
            })
        }
        4 | 5 => {
            // An SA payload built from the responder's own proposals, then bent.
            let ike = c.u8() % 2 == 0;
            let group = c.pick(&groups).unwrap_or(DhGroup::CURVE25519);
            let mut props = if ike {
                let spi = c.bytes(8);
                crate::proposal::ike_proposals(&h.resp_cfg.ike_proposals, &[group], &spi)
            } else {
                let pfs = if c.u8() % 2 == 0 {
                    vec![group]
                } else {
                    Vec::new()
                };
                crate::proposal::esp_proposals(&h.resp_cfg.esp_proposals, &pfs, c.u32())
            };
            if let Some(p) = props.first_mut() {
                match c.u8() % 6 {
                    0 => p.transforms.retain(|t| t.ty != TransformType::DH),
                    1 => p.spi = c.blob(10),
                    2 => p.protocol = ProtocolId(c.u8() % 5),
                    3 => p.transforms.clear(),
                    _ => {}
                }
            }
            Payload::Sa(props)
        }
        6 => {
            let group = if c.u8() < 8 {
                DhGroup(c.u16())
            } else {
                c.pick(&groups).unwrap_or(DhGroup::CURVE25519)
            };
            let data = ke_value(c, group);
            Payload::Ke(KePayload { group, data })
        }
        7 => {
            let n = c.pick(&[32usize, 16, 15, 0, 257]).unwrap_or(32);
            Payload::Nonce(c.bytes(n))
        }
        8 => {
            let (a, b) = (c.u32(), c.u32());
            let ts = TrafficSelector {
                ts_type: if c.u8() < 16 {
                    TsType(c.u8())
                } else {
                    TsType::IPV4_ADDR_RANGE
                },
                ip_proto: c.u8() % 18,
                start_port: 0,
                end_port: c.u16() | 0xff00,
                start: a.min(b).to_be_bytes().to_vec(),
                end: a.max(b).to_be_bytes().to_vec(),
            };
            if c.u8() % 2 == 0 {
                Payload::TsI(vec![ts])
            } else {
                Payload::TsR(vec![ts])
            }
        }
        9 => Payload::Auth(AuthPayload {
            method: AuthMethod(c.u8() % 4),
            data: c.bytes(32),
        }),
        10 => Payload::Skf {
            first_inner: PayloadType(c.u8()),
            fragment: c.u16() % 4,
            total: c.u16() % 4,
            body: c.blob(64),
        },
        _ => Payload::Unknown {
            ty: PayloadType(c.u8()),
            critical: c.u8() % 2 == 0,
            data: c.blob(16),
        },
    }
}

/// Fuzz body: runs the program in `data` (see the module documentation).
/// Panics only when a check of the module documentation fails.
pub fn fuzz_responder(data: &[u8]) {
    let mut c = Cursor { data, pos: 0 };
    let Some(mut h) = Harness::new(c.u8()) else {
        return;
    };
    for _ in 0..MAX_STEPS {
        if c.done() {
            break;
        }
        step(&mut h, &mut c);
    }
    // Whatever happened, an hour later every timer has run out cleanly.
    h.advance(Duration::from_secs(3600));
    h.advance(Duration::from_secs(100_000));
}

fn step(h: &mut Harness, c: &mut Cursor<'_>) {
    let peer = sock(I_ADDR, 500);
    match c.u8() % 12 {
        0 => {
            if let Some(t) = h.to_resp.pop_front() {
                let _ = h.deliver(t.source, t.destination.port(), &t.payload);
            }
        }
        1 => {
            if let Some(t) = h.to_init.pop_front() {
                h.deliver_to_initiator(t);
            }
        }
        2 => h.settle(),
        3 => {
            if let Some(t) = h.to_resp.pop_front() {
                let mut d = t.payload;
                for _ in 0..=(c.u8() % 4) {
                    let i = usize::from(c.u16());
                    let x = c.u8();
                    let n = d.len();
                    if let Some(b) = d.get_mut(i.checked_rem(n).unwrap_or(0)) {
                        *b ^= x;
                    }
                }
                if c.u8() % 4 == 0 {
                    let n = usize::from(c.u16());
                    d.truncate(n);
                }
                let _ = h.deliver(t.source, t.destination.port(), &d);
            }
        }
        4 => {
            let n = usize::from(c.u8());
            let d = c.bytes(n);
            let from = if c.u8() % 2 == 0 {
                peer
            } else {
                sock([203, 0, 113, c.u8()], 500)
            };
            let _ = h.deliver(from, 500, &d);
        }
        5 => {
            let n = h.history.len();
            let i = usize::from(c.u8());
            if let Some(d) = h.history.get(i.checked_rem(n).unwrap_or(0)).cloned() {
                let port = if c.u8() % 2 == 0 { 500 } else { NAT_T_PORT };
                let _ = h.deliver(peer, port, &d);
            }
        }
        6 | 7 => {
            let old = c.u8() % 4 == 0;
            let exchange = match c.u8() % 6 {
                0 | 1 => ExchangeType::CREATE_CHILD_SA,
                2 | 3 => ExchangeType::INFORMATIONAL,
                4 => ExchangeType::IKE_AUTH,
                _ => ExchangeType(c.u8()),
            };
            let response = c.u8() % 3 == 0;
            let (next_recv, ours) = h.mids(old);
            let mid = match c.u8() % 5 {
                0 | 1 if response => ours,
                0 | 1 => next_recv,
                2 => next_recv.wrapping_sub(1),
                3 => next_recv.wrapping_add(1),
                _ => c.u32(),
            };
            let n = c.u8() % 5;
            let payloads: Vec<Payload> = (0..n).map(|_| payload(c, h)).collect();
            if let Some(d) = h.forge_payloads(old, exchange, mid, response, &payloads) {
                let port = if c.u8() % 4 == 0 { NAT_T_PORT } else { 500 };
                let _ = h.deliver(peer, port, &d);
            }
        }
        8 => {
            // Authenticated bytes that need not parse.
            let exchange = ExchangeType(34 + c.u8() % 5);
            let (next_recv, _) = h.mids(false);
            let first = PayloadType(c.u8());
            let n = usize::from(c.u8());
            let inner = c.bytes(n);
            if let Some(d) = h.forge(false, exchange, next_recv, false, first, &inner) {
                let _ = h.deliver(peer, 500, &d);
            }
        }
        9 => {
            let s = c.u8();
            let by = if s < 200 {
                Duration::from_secs(u64::from(s))
            } else {
                Duration::from_secs(u64::from(s) * 600)
            };
            h.advance(by);
        }
        10 => {
            let now = h.now;
            let child = h.init.child_spis().first().copied().unwrap_or(0);
            let _ = mutate(&mut h.init, now, c.u8(), child);
            h.pump();
        }
        _ => {
            let now = h.now;
            let k = c.u8();
            let pick = usize::from(c.u8());
            let live: Vec<u32> = h.live.keys().copied().collect();
            let child = live
                .get(pick.checked_rem(live.len()).unwrap_or(0))
                .copied()
                .unwrap_or(0);
            if let Some(r) = h.resp.as_mut() {
                let _ = mutate(r, now, k, child);
            }
            h.pump();
        }
    }
}

fn mutate(sa: &mut IkeSa, now: Instant, k: u8, child: u32) -> Result<()> {
    match k % 6 {
        0 => sa.create_child(now),
        1 => sa.rekey_child(now, child),
        2 => sa.rekey_ike(now),
        3 => sa.delete_child(now, child),
        4 => sa.delete(now),
        _ => sa.start_liveness_check(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programs that reach each exchange: establishment, then a rekey,
    /// a new CHILD SA, a liveness check and a delete from either side.
    pub(crate) fn seeds() -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        for flags in [0u8, 1, 2, 3, 4, 8, 9] {
            v.push(vec![flags, 2, 2]);
            for k in 0..6u8 {
                // initiator mutator, settle; responder mutator, settle.
                v.push(vec![flags, 2, 2, 10, k, 2, 2, 11, k, 0, 2, 2, 9, 250, 2]);
            }
        }
        v
    }

    #[test]
    fn seed_programs_establish_and_run_exchanges() {
        // The seeds really get through: the SA is established and a CHILD
        // SA installed, then the exchanges run.
        let mut h = Harness::new(1).unwrap();
        h.settle();
        assert!(h.resp.as_ref().unwrap().is_established());
        assert_eq!(h.live.len(), 1);
        let child = h.init.child_spis()[0];
        mutate(&mut h.init, h.now, 1, child).unwrap();
        h.pump();
        h.settle();
        assert_eq!(h.live.len(), 1, "rekeyed: one CHILD SA left");
        assert!(h.events.iter().any(|e| matches!(
            e,
            Event::ChildSaDeleted {
                reason: DeleteReason::Rekeyed,
                ..
            }
        )));
        for s in seeds() {
            fuzz_responder(&s);
        }
    }

    #[test]
    fn forged_requests_reach_the_exchange_handlers() {
        // A forged, correctly encrypted INFORMATIONAL request is answered
        // (so the fuzzer's forgeries get past decryption).
        let mut h = Harness::new(0).unwrap();
        h.settle();
        let (mid, _) = h.mids(false);
        let d = h
            .forge_payloads(false, ExchangeType::INFORMATIONAL, mid, false, &[])
            .unwrap();
        h.deliver(sock(I_ADDR, 500), 500, &d).unwrap();
        assert_eq!(h.mids(false).0, mid + 1);
        assert_eq!(h.to_init.len(), 1);
    }

    /// splitmix64 for the stable pass.
    fn next(s: &mut u64) -> u64 {
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn fuzz_body_over_seeds_and_mutations() {
        // The cargo-fuzz target's body on stable: every seed, each with
        // deterministic byte mutations and splices, plus random programs.
        let seeds = seeds();
        let mut s = 0x1234_5678u64;
        for seed in &seeds {
            for _ in 0..6 {
                let mut m = seed.clone();
                for _ in 0..(1 + next(&mut s) % 4) {
                    let i = (next(&mut s) as usize) % m.len();
                    m[i] = next(&mut s) as u8;
                }
                let extra = (next(&mut s) % 24) as usize;
                m.extend((0..extra).map(|_| next(&mut s) as u8));
                fuzz_responder(&m);
            }
        }
        for _ in 0..150 {
            let n = 8 + (next(&mut s) % 120) as usize;
            let mut m: Vec<u8> = vec![next(&mut s) as u8 & 0x0f, 2, 2];
            m.extend((0..n).map(|_| next(&mut s) as u8));
            fuzz_responder(&m);
        }
    }
}
