//! Traffic-triggered negotiation, espd's half (sans-IO): turns the workers' notes of
//! outbound packets without an SA ([`crate::datapath::table::AcquireSlot`], one per TUN
//! device) into `esp.acquire` events for ikemgr, at most one per phase1 and phase2 every
//! [`ACQUIRE_EVERY`], never one per packet. The phase2 is the first of the phase1's
//! phase2-interfaces (configuration order) whose source and destination selectors hold the
//! packet's inner addresses, IPv4 or IPv6; empty when none does (ikemgr then ignores it).
//!
//! Driven by the control side's tick with `now`; reads no clock, owns no socket.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bus_schema::AcquireInfo;
use haven_config::{Config, Selector};

/// Shortest interval between two `esp.acquire` events for the same phase1 and phase2.
pub const ACQUIRE_EVERY: Duration = Duration::from_secs(1);

/// One phase2's selectors.
struct Phase2Sel {
    phase1: String,
    phase2: String,
    src: Selector,
    dst: Selector,
}

/// True when selector `s` holds `ip` (a selector of the other family holds nothing).
fn holds(s: &Selector, ip: IpAddr) -> bool {
    match (s, ip) {
        (Selector::Subnet(n), IpAddr::V4(ip)) => n.contains(ip),
        (Selector::Range { start, end }, IpAddr::V4(ip)) => *start <= ip && ip <= *end,
        (Selector::Ip(a), IpAddr::V4(ip)) => *a == ip,
        (Selector::Subnet6 { addr, prefix_len }, IpAddr::V6(ip)) => {
            let bits = u32::from(*prefix_len).min(128);
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(*addr) & mask
        }
        _ => false,
    }
}

/// Paces `esp.acquire` events.
#[derive(Default)]
pub struct AcquirePacer {
    selectors: Vec<Phase2Sel>,
    /// Last event per (phase1, phase2).
    last: BTreeMap<(String, String), Instant>,
    /// Packets dropped per phase1 not yet reported in an event.
    dropped: BTreeMap<String, u64>,
}

impl AcquirePacer {
    /// Takes the phase2 selectors of a new configuration.
    pub fn set_config(&mut self, config: &Config) {
        self.selectors = config
            .phase2
            .iter()
            .map(|p| Phase2Sel {
                phase1: p.phase1name.clone(),
                phase2: p.name.clone(),
                src: p.src,
                dst: p.dst,
            })
            .collect();
        let known: std::collections::BTreeSet<&str> =
            config.phase1.iter().map(|p| p.name.as_str()).collect();
        self.last.retain(|(p1, _), _| known.contains(p1.as_str()));
        self.dropped.retain(|p1, _| known.contains(p1.as_str()));
    }

    /// The phase2 of `phase1` whose selectors hold `src` -> `dst` (empty: none).
    pub fn phase2_of(&self, phase1: &str, src: IpAddr, dst: IpAddr) -> String {
        self.selectors
            .iter()
            .find(|s| s.phase1 == phase1 && holds(&s.src, src) && holds(&s.dst, dst))
            .map(|s| s.phase2.clone())
            .unwrap_or_default()
    }

    /// What device `phase1`'s slot held this tick: the noted packet (if any) and the
    /// packets dropped. Returns the event to publish, if one is due.
    pub fn offer(
        &mut self,
        now: Instant,
        phase1: &str,
        packet: Option<(IpAddr, IpAddr)>,
        dropped: u64,
    ) -> Option<AcquireInfo> {
        if dropped > 0 {
            let d = self.dropped.entry(phase1.to_string()).or_insert(0);
            *d = d.saturating_add(dropped);
        }
        let (src, dst) = packet?;
        let phase2 = self.phase2_of(phase1, src, dst);
        let key = (phase1.to_string(), phase2.clone());
        if self
            .last
            .get(&key)
            .is_some_and(|t| now.saturating_duration_since(*t) < ACQUIRE_EVERY)
        {
            return None;
        }
        self.last.insert(key, now);
        Some(AcquireInfo {
            phase1: phase1.to_string(),
            phase2,
            src: src.to_string(),
            dst: dst.to_string(),
            dropped: self.dropped.remove(phase1).unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type static
        set interface \"port1\"
        set remote-gw 192.0.2.1
        set psksecret \"k\"
    next
end
config vpn ipsec phase2-interface
    edit \"p2a\"
        set phase1name \"vpn1\"
        set src-subnet 10.1.0.0/24
        set dst-subnet 10.2.0.0/24
    next
    edit \"p2b\"
        set phase1name \"vpn1\"
        set src-subnet 10.1.0.0/24
        set dst-addr-type range
        set dst-start-ip 10.3.0.10
        set dst-end-ip 10.3.0.20
    next
    edit \"p2v6\"
        set phase1name \"vpn1\"
        set src-addr-type subnet6
        set src-subnet6 fd00:99:1::/64
        set dst-addr-type subnet6
        set dst-subnet6 fd00:99:2::/48
    next
end
";

    fn pacer() -> AcquirePacer {
        let config = haven_config::parse(CONF).expect("config").config;
        let mut p = AcquirePacer::default();
        p.set_config(&config);
        p
    }

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn packets_map_to_the_phase2_whose_selectors_hold_them() {
        let p = pacer();
        assert_eq!(p.phase2_of("vpn1", a("10.1.0.5"), a("10.2.0.9")), "p2a");
        assert_eq!(p.phase2_of("vpn1", a("10.1.0.5"), a("10.3.0.15")), "p2b");
        assert_eq!(p.phase2_of("vpn1", a("10.1.0.5"), a("10.3.0.21")), "");
        assert_eq!(p.phase2_of("vpn1", a("10.9.0.5"), a("10.2.0.9")), "");
        assert_eq!(p.phase2_of("vpn2", a("10.1.0.5"), a("10.2.0.9")), "");
        // IPv6: the subnet6 selectors, by prefix; IPv4 selectors hold no IPv6 address.
        assert_eq!(
            p.phase2_of("vpn1", a("fd00:99:1::2"), a("fd00:99:2:7::9")),
            "p2v6"
        );
        assert_eq!(
            p.phase2_of("vpn1", a("fd00:99:1::2"), a("fd00:99:3::9")),
            ""
        );
        assert_eq!(
            p.phase2_of("vpn1", a("fd00:99:1:1::2"), a("fd00:99:2::9")),
            ""
        );
        assert_eq!(
            p.phase2_of("vpn1", a("::ffff:10.1.0.5"), a("::ffff:10.2.0.9")),
            ""
        );
    }

    #[test]
    fn one_event_per_phase2_and_interval_with_every_drop_counted() {
        let mut p = pacer();
        let t0 = Instant::now();
        let pkt_a = Some((a("10.1.0.5"), a("10.2.0.9")));
        let pkt_b = Some((a("10.1.0.5"), a("10.3.0.15")));
        let first = p.offer(t0, "vpn1", pkt_a, 4).expect("first event");
        assert_eq!((first.phase2.as_str(), first.dropped), ("p2a", 4));
        assert_eq!(first.dst, "10.2.0.9");
        // Within the interval: counted, not published.
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(p.offer(t1, "vpn1", pkt_a, 5), None);
        assert_eq!(p.offer(t1, "vpn1", None, 2), None);
        // Another phase2 of the same phase1 has its own pace.
        let b = p.offer(t1, "vpn1", pkt_b, 1).expect("other phase2");
        assert_eq!((b.phase2.as_str(), b.dropped), ("p2b", 8));
        let t2 = t0 + ACQUIRE_EVERY;
        let again = p.offer(t2, "vpn1", pkt_a, 3).expect("after the interval");
        assert_eq!(again.dropped, 3);
    }
}
