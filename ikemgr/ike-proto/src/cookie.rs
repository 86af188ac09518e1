//! Responder-side defence of IKE_SA_INIT (RFC 7296 §2.6): half-open SA
//! bookkeeping per source address and globally, and stateless COOKIEs once
//! the number of half-open SAs passes a threshold.
//!
//! The driver calls [`CookieGuard::check`] on every IKE_SA_INIT request that
//! does not belong to an existing SA, before [`crate::sa::IkeSa::accept`];
//! it reports [`CookieGuard::half_open_started`] when `accept` created an SA
//! and [`CookieGuard::half_open_finished`] when that SA was established or
//! went away. Memory is bounded: one counter per source with half-open SAs.

use crate::crypto::CryptoError;
use crate::sa::Entropy;
use crate::wire::{
    ExchangeType, Flags, Header, Message, NotifyPayload, NotifyType, Payload, PayloadType,
    IKEV2_VERSION,
};
use openssl::sha::Sha256;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Limits of the guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardConfig {
    /// Demand a COOKIE when at least this many SAs are half-open.
    pub cookie_threshold: usize,
    /// Drop new requests from a source that already has this many half-open SAs.
    pub max_half_open_per_source: usize,
    /// Drop every new request when this many SAs are half-open.
    pub max_half_open: usize,
    /// Replace the cookie secret this often (the previous one stays valid
    /// for one more period).
    pub secret_lifetime: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            cookie_threshold: 30,
            max_half_open_per_source: 5,
            max_half_open: 10_000,
            secret_lifetime: Duration::from_secs(120),
        }
    }
}

/// What to do with an IKE_SA_INIT request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with [`crate::sa::IkeSa::accept`].
    Accept,
    /// Send this COOKIE request back to the source; keep no state.
    Reply(Vec<u8>),
    /// Drop silently.
    Drop(DropReason),
}

/// Why a request was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not an initial IKE_SA_INIT request, or undecodable.
    Malformed,
    /// The source has too many half-open SAs.
    PerSourceLimit,
    /// Too many half-open SAs overall.
    GlobalLimit,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardStats {
    /// COOKIE requests sent.
    pub cookies_sent: u64,
    /// Requests that carried a wrong or stale cookie.
    pub cookies_invalid: u64,
    /// Requests dropped by the per-source limit.
    pub dropped_per_source: u64,
    /// Requests dropped by the global limit.
    pub dropped_global: u64,
    /// Requests dropped as malformed.
    pub dropped_malformed: u64,
}

/// Cookie secret with its one-octet version (§2.6 `<VersionIDofSecret>`).
#[derive(Clone)]
struct Secret {
    version: u8,
    key: [u8; 32],
}

/// Half-open bookkeeping and COOKIE generation for one listening address.
pub struct CookieGuard {
    cfg: GuardConfig,
    current: Secret,
    previous: Option<Secret>,
    rotated_at: Instant,
    per_source: HashMap<IpAddr, usize>,
    total: usize,
    stats: GuardStats,
}

impl core::fmt::Debug for CookieGuard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieGuard")
            .field("half_open", &self.total)
            .field("sources", &self.per_source.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl Secret {
    /// Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | Secret) (§2.6).
    fn cookie(&self, ni: &[u8], ip: IpAddr, spi_i: u64) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(ni);
        h.update(&ip_bytes(ip));
        h.update(&spi_i.to_be_bytes());
        h.update(&self.key);
        let mut out = vec![self.version];
        out.extend_from_slice(&h.finish());
        out
    }
}

impl CookieGuard {
    /// A guard with a fresh secret.
    pub fn new(
        now: Instant,
        cfg: GuardConfig,
        entropy: &mut dyn Entropy,
    ) -> Result<Self, CryptoError> {
        let mut key = [0u8; 32];
        entropy.fill(&mut key)?;
        Ok(CookieGuard {
            cfg,
            current: Secret { version: 0, key },
            previous: None,
            rotated_at: now,
            per_source: HashMap::new(),
            total: 0,
            stats: GuardStats::default(),
        })
    }

    fn rotate(&mut self, now: Instant, entropy: &mut dyn Entropy) {
        if now.saturating_duration_since(self.rotated_at) < self.cfg.secret_lifetime {
            return;
        }
        let mut key = [0u8; 32];
        if entropy.fill(&mut key).is_err() {
            return;
        }
        let next = Secret {
            version: self.current.version.wrapping_add(1),
            key,
        };
        self.previous = Some(std::mem::replace(&mut self.current, next));
        self.rotated_at = now;
    }

    /// Decides on one IKE_SA_INIT request from `remote`.
    pub fn check(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Verdict {
        self.rotate(now, entropy);
        let Ok(msg) = Message::decode(datagram) else {
            self.stats.dropped_malformed += 1;
            return Verdict::Drop(DropReason::Malformed);
        };
        let h = &msg.header;
        let ni = msg.payloads.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        });
        let (false, ExchangeType::IKE_SA_INIT, 0, 0, Some(ni)) =
            (h.flags.response(), h.exchange, h.message_id, h.spi_r, ni)
        else {
            self.stats.dropped_malformed += 1;
            return Verdict::Drop(DropReason::Malformed);
        };
        let ip = remote.ip();
        if self.per_source.get(&ip).copied().unwrap_or(0) >= self.cfg.max_half_open_per_source {
            self.stats.dropped_per_source += 1;
            return Verdict::Drop(DropReason::PerSourceLimit);
        }
        if self.total >= self.cfg.max_half_open {
            self.stats.dropped_global += 1;
            return Verdict::Drop(DropReason::GlobalLimit);
        }
        if self.total < self.cfg.cookie_threshold {
            return Verdict::Accept;
        }
        // §2.6: the COOKIE notify must be the first payload.
        if let Some(Payload::Notify(n)) = msg.payloads.first() {
            if n.ty == NotifyType::COOKIE {
                let ok = [Some(&self.current), self.previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter(|s| n.data.first() == Some(&s.version))
                    .any(|s| {
                        let want = s.cookie(ni, ip, h.spi_i);
                        want.len() == n.data.len() && openssl::memcmp::eq(&want, &n.data)
                    });
                if ok {
                    return Verdict::Accept;
                }
                self.stats.cookies_invalid += 1;
            }
        }
        self.stats.cookies_sent += 1;
        let reply = Message {
            header: Header {
                spi_i: h.spi_i,
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
                self.current.cookie(ni, ip, h.spi_i),
            ))],
            sk_offset: None,
        };
        Verdict::Reply(reply.encode())
    }

    /// `accept` created a half-open SA for `ip`.
    pub fn half_open_started(&mut self, ip: IpAddr) {
        *self.per_source.entry(ip).or_insert(0) += 1;
        self.total += 1;
    }

    /// A half-open SA of `ip` was established, failed or timed out.
    pub fn half_open_finished(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&ip);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Half-open SAs now.
    pub fn half_open(&self) -> usize {
        self.total
    }

    /// Counters.
    pub fn stats(&self) -> GuardStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proposal::{dhgrp_list, phase1_list, phase2_list};
    use crate::sa::{Accepted, Addresses, Event, IkeConfig, IkeSa, OsEntropy, Transmit};
    use crate::wire::IdPayload;
    use std::sync::Arc;

    fn cfg(id: &str) -> Arc<IkeConfig> {
        let mut c = IkeConfig::psk(b"k", IdPayload::fqdn(id));
        c.ike_proposals = phase1_list("aes128gcm-prfsha256").unwrap();
        c.ike_groups = dhgrp_list("31").unwrap();
        c.esp_proposals = phase2_list("aes128gcm").unwrap();
        Arc::new(c)
    }

    const A: &str = "192.0.2.1:500";
    const B: &str = "198.51.100.2:500";

    fn initiator(now: Instant) -> (IkeSa, Vec<u8>) {
        let mut sa = IkeSa::initiate(
            now,
            cfg("a"),
            Addresses {
                local: A.parse().unwrap(),
                remote: B.parse().unwrap(),
            },
            Box::new(OsEntropy),
        )
        .unwrap();
        let first = sa.poll_transmit().unwrap().payload;
        (sa, first)
    }

    fn to_a(sa: &mut IkeSa, now: Instant, bytes: &[u8]) {
        let path = Addresses {
            local: A.parse().unwrap(),
            remote: B.parse().unwrap(),
        };
        sa.handle_datagram(now, path, bytes).unwrap();
    }

    #[test]
    fn cookie_round_trip_then_establish() {
        let now = Instant::now();
        let mut e = OsEntropy;
        let mut g = CookieGuard::new(
            now,
            GuardConfig {
                cookie_threshold: 0,
                ..GuardConfig::default()
            },
            &mut e,
        )
        .unwrap();
        let src: SocketAddr = A.parse().unwrap();
        let (mut a, first) = initiator(now);
        // HDR(A,0), SAi1, KEi, Ni -->  <-- HDR(A,0), N(COOKIE)
        let Verdict::Reply(cookie_req) = g.check(now, src, &first, &mut e) else {
            panic!("cookie expected")
        };
        to_a(&mut a, now, &cookie_req);
        // HDR(A,0), N(COOKIE), SAi1, KEi, Ni -->
        let second = a.poll_transmit().unwrap().payload;
        assert_eq!(g.check(now, src, &second, &mut e), Verdict::Accept);
        // The cookie is bound to the source address.
        let other: SocketAddr = "203.0.113.9:500".parse().unwrap();
        assert!(matches!(
            g.check(now, other, &second, &mut e),
            Verdict::Reply(_)
        ));
        assert_eq!(g.stats().cookies_invalid, 1);
        // Still valid after one rotation, not after two.
        let later = now + Duration::from_secs(121);
        assert_eq!(g.check(later, src, &second, &mut e), Verdict::Accept);
        let much_later = later + Duration::from_secs(121);
        assert!(matches!(
            g.check(much_later, src, &second, &mut e),
            Verdict::Reply(_)
        ));
        // The accepted request makes a working SA.
        let Ok(Accepted::Sa(mut b)) = IkeSa::accept(
            now,
            cfg("b"),
            Addresses {
                local: B.parse().unwrap(),
                remote: src,
            },
            Box::new(OsEntropy),
            &second,
        ) else {
            panic!("accept")
        };
        g.half_open_started(src.ip());
        let mut flights = 0;
        loop {
            let mut moved = false;
            while let Some(Transmit { payload, .. }) = b.poll_transmit() {
                to_a(&mut a, now, &payload);
                moved = true;
            }
            while let Some(Transmit { payload, .. }) = a.poll_transmit() {
                let path = Addresses {
                    local: B.parse().unwrap(),
                    remote: src,
                };
                b.handle_datagram(now, path, &payload).unwrap();
                moved = true;
            }
            flights += 1;
            if !moved || flights > 10 {
                break;
            }
        }
        assert!(a.is_established() && b.is_established());
        assert!(
            std::iter::from_fn(|| b.poll_event()).any(|e| matches!(e, Event::IkeSaEstablished(_)))
        );
        g.half_open_finished(src.ip());
        assert_eq!(g.half_open(), 0);
    }

    #[test]
    fn limits_per_source_and_global() {
        let now = Instant::now();
        let mut e = OsEntropy;
        let mut g = CookieGuard::new(
            now,
            GuardConfig {
                cookie_threshold: 100,
                max_half_open_per_source: 2,
                max_half_open: 3,
                ..GuardConfig::default()
            },
            &mut e,
        )
        .unwrap();
        let (_, req) = initiator(now);
        let s1: SocketAddr = "192.0.2.10:500".parse().unwrap();
        let s2: SocketAddr = "192.0.2.11:500".parse().unwrap();
        assert_eq!(g.check(now, s1, &req, &mut e), Verdict::Accept);
        g.half_open_started(s1.ip());
        g.half_open_started(s1.ip());
        assert_eq!(
            g.check(now, s1, &req, &mut e),
            Verdict::Drop(DropReason::PerSourceLimit)
        );
        g.half_open_started(s2.ip());
        assert_eq!(
            g.check(now, "192.0.2.12:500".parse().unwrap(), &req, &mut e),
            Verdict::Drop(DropReason::GlobalLimit)
        );
        g.half_open_finished(s1.ip());
        assert_eq!(g.check(now, s1, &req, &mut e), Verdict::Accept);
        // Finishing an unknown source changes nothing.
        g.half_open_finished("10.0.0.1".parse().unwrap());
        assert_eq!(g.half_open(), 2);
        assert_eq!(
            g.check(now, s1, &[0u8; 10], &mut e),
            Verdict::Drop(DropReason::Malformed)
        );
    }
}
