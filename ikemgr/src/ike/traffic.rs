//! Traffic-triggered negotiation and the phase2 knobs of seed 002 (issue 9).
//!
//! - **Acquire.** espd publishes `esp.acquire` (paced: at most one per phase1 and phase2 a
//!   second) for outbound packets routed into a phase1's TUN device that find no SA.
//!   [`IkeManager::acquire`] then: creates the phase2's CHILD SA with CREATE_CHILD_SA when
//!   the phase1 has an established IKE SA without it; starts an IKE SA for a static phase1
//!   that waits for traffic (`dpd-action hold` after a dead verdict, or `auto-negotiate
//!   disable`); ignores it for `dpd-action clear`, `passive-mode`, dial-up phase1s, a phase2
//!   the operator took down (`tunnel down`, until `tunnel up`) and while a negotiation is
//!   under way.
//! - **Routes that wait for traffic.** Traffic reaches espd only through a route. With
//!   `add-route enable`: a static phase1 with `dpd-action hold` keeps its routes when its
//!   IKE SA goes (they point at the TUN device, which stays), and one that waits for traffic
//!   from the start (`auto-negotiate disable`, `dpd-action hold`, no `passive-mode`) has
//!   routes to its phase2s' destination selectors from the start. `dpd-action clear` removes
//!   them with the IKE SA. A CHILD SA of a static phase1 that expired or that the peer
//!   deleted keeps its routes while the IKE SA stays (except with `clear`), so the next
//!   packet brings a new CHILD SA.
//! - **Phase2 knobs.** `keepalive enable`: the CHILD SA is rekeyed at its soft lifetime even
//!   when idle. `keepalive disable` (FortiOS default): a CHILD SA that carried no packet in
//!   either direction since it was installed (espd's counters, reported with the soft
//!   expiry) is not rekeyed; it is deleted at its hard lifetime (Delete sent) and traffic
//!   brings a new one. `auto-negotiate enable` on a phase2: a CHILD SA of it that expired or
//!   that the peer deleted is created again at once, without waiting for traffic.
//!   `replay disable`: the CHILD SA is published with a replay window of 0 (espd skips the
//!   anti-replay check).
//!
//! Dial-up phase1s take part only in `keepalive` and `replay`: their clients start their
//! own CHILD SAs.
//!
//! Sans-IO like the rest of [`super::IkeManager`]: every call takes `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bus_schema::AcquireInfo;
use haven_config::{DpdAction, Phase2};
use ike_proto::sa::DeleteReason;

use super::{selector, ts_cidrs, Gateway, IkeManager, RouteOp};

/// Seed 002's phase2 knobs of one phase2 (CHILD SA policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Phase2Knobs {
    pub name: String,
    /// `auto-negotiate`: re-create a lost CHILD SA without waiting for traffic.
    pub auto_negotiate: bool,
    /// `keepalive`: rekey even when idle.
    pub keepalive: bool,
    /// `replay`: anti-replay check in espd.
    pub replay: bool,
    /// The destination selector as CIDRs (routes that wait for traffic).
    pub dst: Vec<String>,
}

/// The knobs of a phase1's phase2s, in policy order.
pub(super) fn knobs_of(p2s: &[&Phase2]) -> Vec<Phase2Knobs> {
    p2s.iter()
        .map(|p| Phase2Knobs {
            name: p.name.clone(),
            auto_negotiate: p.auto_negotiate,
            keepalive: p.keepalive,
            replay: p.replay,
            dst: ts_cidrs(&[selector(&p.dst)]),
        })
        .collect()
}

/// True when a static gateway keeps its routes without an IKE SA, for traffic to bring it
/// back (`dpd-action hold`, `add-route enable`, not passive).
fn holds_traffic(g: &Gateway) -> bool {
    !g.dynamic && !g.passive && g.add_route && g.dpd_action == DpdAction::Hold
}

/// True when a gateway waits for traffic from the start (it does not initiate by itself).
fn waits_for_traffic(g: &Gateway) -> bool {
    holds_traffic(g) && !g.initiate
}

/// True when the routes of a CHILD SA lost for `reason` stay (the IKE SA stays; traffic
/// brings a new CHILD SA).
pub(super) fn keeps_routes_of_lost_child(g: &Gateway, reason: DeleteReason) -> bool {
    !g.dynamic
        && g.dpd_action != DpdAction::Clear
        && matches!(reason, DeleteReason::Expired | DeleteReason::Peer)
}

/// State of traffic-triggered negotiation.
#[derive(Default)]
pub(super) struct Traffic {
    /// Routes kept through a static gateway's TUN device while no IKE SA owns them:
    /// gateway -> CIDRs.
    pub traps: BTreeMap<String, Vec<String>>,
    /// CREATE_CHILD_SA requested (IKE SA id, policy), until the CHILD SA is up or fails.
    pub asked: BTreeSet<(u64, usize)>,
    /// Phase2s the operator took down (gateway, phase2): traffic does not bring them back.
    pub parked: BTreeSet<(String, String)>,
    /// Static gateways whose next initiation traffic asked for (one attempt).
    pub triggered: BTreeSet<String>,
    /// IKE SAs started by traffic and not established yet.
    pub started: BTreeSet<u64>,
    /// Acquires handled, by outcome (`ikemgr_acquires_total`).
    pub counts: BTreeMap<&'static str, u64>,
}

impl Traffic {
    /// Hook from `flush`: the routes of a gone IKE SA of `g`. Returns those to delete; a
    /// gateway that holds traffic keeps them (unless its phase1 was removed).
    pub(super) fn keep_routes(
        &mut self,
        g: Option<&Gateway>,
        why: &str,
        routes: Vec<String>,
    ) -> Vec<String> {
        match g {
            Some(g) if holds_traffic(g) && why != "phase1 removed" => {
                let kept = self.traps.entry(g.name.clone()).or_default();
                for r in routes {
                    if !kept.contains(&r) {
                        kept.push(r);
                    }
                }
                tracing::debug!(
                    "ike 0:{}: routes kept for traffic (dpd-action hold): {kept:?}",
                    g.name
                );
                Vec::new()
            }
            _ => routes,
        }
    }
}

impl IkeManager {
    /// Hook from `set_config`: routes of gateways that wait for traffic from the start are
    /// added; kept routes of gateways that no longer hold traffic are removed.
    pub(super) fn traffic_config(&mut self) {
        let gws = &self.gateways;
        self.traffic.parked.retain(|(g, _)| gws.contains_key(g));
        self.traffic.triggered.retain(|g| gws.contains_key(g));
        let stale: Vec<String> = self
            .traffic
            .traps
            .keys()
            .filter(|g| !gws.get(*g).is_some_and(|g| holds_traffic(g)))
            .cloned()
            .collect();
        for gw in stale {
            let owned: Vec<String> = self
                .sas
                .values()
                .filter(|e| e.gateway == gw)
                .flat_map(|e| e.routes.iter().cloned())
                .collect();
            for dest in self.traffic.traps.remove(&gw).unwrap_or_default() {
                if !owned.contains(&dest) {
                    self.routes.push_back(RouteOp::Del {
                        dest,
                        dev: gw.clone(),
                    });
                }
            }
        }
        let waiting: Vec<(String, Vec<String>)> = self
            .gateways
            .values()
            .filter(|g| waits_for_traffic(g))
            .map(|g| {
                let mut dst: Vec<String> =
                    g.p2.iter().flat_map(|k| k.dst.iter().cloned()).collect();
                dst.dedup();
                (g.name.clone(), dst)
            })
            .collect();
        for (gw, dst) in waiting {
            let kept = self.traffic.traps.entry(gw.clone()).or_default();
            for dest in dst {
                if !kept.contains(&dest) {
                    tracing::debug!("ike 0:{gw}: route {dest} waits for traffic");
                    kept.push(dest.clone());
                    self.routes.push_back(RouteOp::Add {
                        dest,
                        dev: gw.clone(),
                    });
                }
            }
        }
    }

    /// True when traffic asked for an initiation of gateway `gw`.
    pub(super) fn traffic_wants(&self, gw: &str) -> bool {
        self.traffic.triggered.contains(gw)
    }

    /// Hook from `initiate`: IKE SA `id` of `gw` started (by traffic, if it asked).
    pub(super) fn traffic_initiated(&mut self, id: u64, gw: &str) {
        if self.traffic.triggered.remove(gw) {
            self.traffic.started.insert(id);
        }
    }

    /// Hook from `flush`: IKE SA `id` of static gateway `g` is gone. An attempt traffic
    /// started for a held gateway that failed holds it again (the next packet tries again).
    pub(super) fn traffic_attempt_over(&mut self, id: u64, g: &Gateway, established: bool) {
        if self.traffic.started.remove(&id) && !established && g.initiate {
            self.life_set_held(&g.name, true);
        }
    }

    /// True when CHILD SA `spi_in` of IKE SA `id` belongs to a phase2 with `keepalive
    /// enable` (or to a phase1 without phase2s).
    pub(super) fn keepalive_of(&self, id: u64, spi_in: u32) -> bool {
        let Some(e) = self.sas.get(&id) else {
            return true;
        };
        let phase2 = e.children.get(&spi_in).map(|c| c.phase2.as_str());
        self.gateways
            .get(&e.gateway)
            .and_then(|g| g.p2.iter().find(|k| Some(k.name.as_str()) == phase2))
            .is_none_or(|k| k.keepalive)
    }

    /// Queues a CREATE_CHILD_SA for `policy` on IKE SA `id` unless its CHILD SA exists or
    /// was asked for already. True when queued.
    fn traffic_create(&mut self, now: Instant, id: u64, policy: usize) -> bool {
        if self.traffic.asked.contains(&(id, policy)) {
            return false;
        }
        let Some(e) = self.sas.get_mut(&id) else {
            return false;
        };
        if !e.sa.is_established() || e.sa.child_policies().contains(&policy) {
            return false;
        }
        if e.sa.create_child_for(now, policy).is_err() {
            return false;
        }
        self.traffic.asked.insert((id, policy));
        // Out now, not with the SA's next timer.
        while let Some(t) = e.sa.poll_transmit() {
            self.transmits.push_back(t);
        }
        let next = e.sa.poll_timeout();
        self.set_timer(id, next);
        true
    }

    /// Hook from a CHILD SA deletion (not a rekey): `auto-negotiate enable` on a static
    /// phase1's phase2 creates it again at once.
    pub(super) fn traffic_child_gone(
        &mut self,
        now: Instant,
        id: u64,
        g: &Gateway,
        phase2: &str,
        reason: DeleteReason,
    ) {
        // Dial-up clients bring their own CHILD SAs back (a client that deleted one meant it).
        if g.dynamic || !matches!(reason, DeleteReason::Expired | DeleteReason::Peer) {
            return;
        }
        let Some(policy) = g.p2.iter().position(|k| k.name == phase2) else {
            return;
        };
        let auto = g.p2.get(policy).is_some_and(|k| k.auto_negotiate);
        if !auto
            || self
                .traffic
                .parked
                .contains(&(g.name.clone(), phase2.to_string()))
        {
            return;
        }
        if self.traffic_create(now, id, policy) {
            tracing::info!(
                "ike 0:{}:{id}: phase2 {phase2} (auto-negotiate enable) lost its CHILD SA ({reason:?}): creating a new one",
                g.name
            );
        }
    }

    fn count_acquire(&mut self, outcome: &'static str) -> &'static str {
        *self.traffic.counts.entry(outcome).or_insert(0) += 1;
        outcome
    }

    /// espd found no SA for outbound traffic of `a.phase1` / `a.phase2`: negotiate what is
    /// missing (see the module documentation). Returns the outcome (also counted):
    /// `child` (CREATE_CHILD_SA queued), `initiate` (an IKE SA will start), or why nothing
    /// was done: `unknown`, `dialup`, `no_phase2`, `parked`, `child_up`, `pending`,
    /// `negotiating`, `passive`, `clear`, `retrying`, `standby`.
    pub fn acquire(&mut self, now: Instant, a: &AcquireInfo) -> &'static str {
        let Some(g) = self.gateways.get(&a.phase1).cloned() else {
            return self.count_acquire("unknown");
        };
        if self.ha.standby() {
            // An FGCP secondary negotiates nothing (`ha`).
            return self.count_acquire("standby");
        }
        if g.dynamic {
            return self.count_acquire("dialup");
        }
        let Some(policy) = g.phase2s.iter().position(|n| *n == a.phase2) else {
            return self.count_acquire("no_phase2");
        };
        if self
            .traffic
            .parked
            .contains(&(g.name.clone(), a.phase2.clone()))
        {
            return self.count_acquire("parked");
        }
        let mine: Vec<(u64, bool)> = self
            .sas
            .iter()
            .filter(|(_, e)| e.gateway == g.name)
            .map(|(id, e)| (*id, e.sa.is_established()))
            .collect();
        if let Some((id, _)) = mine.iter().find(|(_, up)| *up) {
            let id = *id;
            let has = self
                .sas
                .get(&id)
                .is_some_and(|e| e.sa.child_policies().contains(&policy));
            if has {
                // Installing, or a selector the CHILD SA does not cover.
                return self.count_acquire("child_up");
            }
            if !self.traffic_create(now, id, policy) {
                return self.count_acquire("pending");
            }
            tracing::info!(
                "ike 0:{}:{id}: traffic {} -> {} for phase2 {} without a CHILD SA: creating it",
                g.name,
                a.src,
                a.dst,
                a.phase2
            );
            return self.count_acquire("child");
        }
        if !mine.is_empty() || self.traffic.triggered.contains(&g.name) {
            return self.count_acquire("negotiating");
        }
        if g.passive {
            return self.count_acquire("passive");
        }
        if g.dpd_action == DpdAction::Clear {
            tracing::debug!(
                "ike 0:{}: traffic {} -> {} ignored (dpd-action clear)",
                g.name,
                a.src,
                a.dst
            );
            return self.count_acquire("clear");
        }
        let held = self.life_is_held(&g.name);
        if !held && (g.initiate || self.wanted.contains(&g.name)) {
            // It renegotiates by itself (backoff).
            return self.count_acquire("retrying");
        }
        if held {
            self.life_set_held(&g.name, false);
        }
        if !self.life_may_initiate(&g) {
            if held {
                self.life_set_held(&g.name, true);
            }
            return self.count_acquire("standby");
        }
        self.traffic.triggered.insert(g.name.clone());
        tracing::info!(
            "ike 0:{}: traffic {} -> {} for phase2 {} ({}): initiating",
            g.name,
            a.src,
            a.dst,
            a.phase2,
            if held {
                "held after a dead peer, dpd-action hold"
            } else {
                "waiting for traffic"
            }
        );
        self.count_acquire("initiate")
    }

    /// Acquires handled, by outcome.
    pub fn acquire_counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.traffic.counts
    }

    /// Routes kept for traffic of gateway `gw` (the `lifecycle` view).
    pub(super) fn trap_routes(&self, gw: &str) -> Vec<String> {
        self.traffic.traps.get(gw).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bus_schema::schema::ChildSaInfo as BusChild;
    use bus_schema::{AcquireInfo, Body};

    use crate::ike::tests::{mgr, shuttle, DIAL, HUB};
    use crate::ike::{IkeManager, RouteOp};

    const LOCAL: &str = "192.0.2.1";
    const PEER: &str = "192.0.2.2";

    /// HUB with `p1` lines added to its phase1 and `p2` lines to its phase2.
    fn hub(p1: &str, p2: &str) -> String {
        HUB.replacen(
            "        set psksecret \"k\"\n",
            &format!("        set psksecret \"k\"\n{p1}"),
            1,
        )
        .replacen(
            "        set pfs disable\n",
            &format!("        set pfs disable\n{p2}"),
            1,
        )
    }

    fn acq() -> AcquireInfo {
        AcquireInfo {
            phase1: "hub".into(),
            phase2: "hub".into(),
            src: "10.1.0.5".into(),
            dst: "10.2.0.9".into(),
            dropped: 2,
        }
    }

    /// Starts what `initiate_pending` asks for, like the driver; how many.
    fn drive(m: &mut IkeManager, now: Instant) -> usize {
        let pending = m.initiate_pending(now);
        for (g, remote, _) in &pending {
            m.initiate(now, g, LOCAL.parse().unwrap(), *remote);
        }
        pending.len()
    }

    fn routes(m: &mut IkeManager) -> Vec<RouteOp> {
        std::iter::from_fn(|| m.poll_route()).collect()
    }

    fn children(bodies: &[Body]) -> Vec<BusChild> {
        bodies
            .iter()
            .filter_map(|b| match b {
                Body::ChildSa(c) if c.outbound => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn up(m: &IkeManager) -> bool {
        m.sas.values().any(|e| e.sa.is_established())
    }

    /// Brings `hub` (config `text`) up with a dial-up peer; returns both, bodies drained.
    fn connected(text: &str, now: Instant) -> (IkeManager, IkeManager) {
        let mut a = mgr(text, now);
        let mut b = mgr(DIAL, now);
        a.initiate(now, "hub", LOCAL.parse().unwrap(), PEER.parse().unwrap());
        shuttle(&mut a, &mut b, now);
        assert!(up(&a));
        a.drain_bodies();
        b.drain_bodies();
        routes(&mut a);
        (a, b)
    }

    #[test]
    fn traffic_brings_back_a_child_sa_the_peer_deleted_and_keeps_its_route() {
        let now = Instant::now();
        let (mut a, mut b) = connected(HUB, now);
        // The peer deletes its CHILD SA; the IKE SA stays.
        b.tunnel_down(now, "vpn1", None).expect("tunnel down");
        shuttle(&mut a, &mut b, now);
        assert!(up(&a));
        assert!(a.sas.values().all(|e| e.children.is_empty()));
        assert_eq!(routes(&mut a), [], "the route stays for traffic");
        a.drain_bodies();
        assert_eq!(a.acquire(now, &acq()), "child");
        // Paced by espd, but a second acquire while the exchange runs changes nothing.
        assert_eq!(a.acquire(now, &acq()), "pending");
        shuttle(&mut a, &mut b, now);
        let c = children(&a.drain_bodies());
        assert_eq!(c.len(), 1, "a new CHILD SA");
        assert_eq!(c[0].phase2, "hub");
        assert_eq!(a.acquire(now, &acq()), "child_up");
        // Unknown phase2s and phase1s are counted, nothing else.
        let mut other = acq();
        other.phase2 = String::new();
        assert_eq!(a.acquire(now, &other), "no_phase2");
        other.phase1 = "nope".into();
        assert_eq!(a.acquire(now, &other), "unknown");
        assert_eq!(a.acquire_counts().get("child"), Some(&1));
    }

    #[test]
    fn a_phase2_the_operator_took_down_ignores_traffic_until_tunnel_up() {
        let now = Instant::now();
        let (mut a, mut b) = connected(HUB, now);
        a.tunnel_down(now, "hub", None).expect("down");
        shuttle(&mut a, &mut b, now);
        assert!(
            routes(&mut a)
                .iter()
                .any(|r| matches!(r, RouteOp::Del { .. })),
            "a local delete removes the route"
        );
        assert_eq!(a.acquire(now, &acq()), "parked");
        a.tunnel_up(now, "hub", None).expect("up");
        shuttle(&mut a, &mut b, now);
        assert_eq!(children(&a.drain_bodies()).len(), 1);
    }

    #[test]
    fn hold_keeps_routes_after_a_dead_peer_and_traffic_renegotiates_clear_does_not() {
        let now = Instant::now();
        let (mut a, _) = connected(&hub("        set dpd-action hold\n", ""), now);
        a.dead_peer(now, "hub");
        assert_eq!(routes(&mut a), [], "hold keeps the route");
        assert_eq!(
            a.lifecycle_view(now)[0]["trap_routes"],
            serde_json::json!(["10.2.0.0/24"])
        );
        let later = now + Duration::from_secs(60);
        assert_eq!(drive(&mut a, later), 0, "held");
        assert_eq!(a.acquire(later, &acq()), "initiate");
        assert_eq!(a.acquire(later, &acq()), "negotiating");
        assert_eq!(drive(&mut a, later), 1, "traffic initiates");
        let mut b = mgr(DIAL, later);
        shuttle(&mut a, &mut b, later);
        assert!(up(&a), "back on traffic");

        let (mut c, _) = connected(&hub("        set dpd-action clear\n", ""), now);
        c.dead_peer(now, "hub");
        assert_eq!(
            routes(&mut c),
            [RouteOp::Del {
                dest: "10.2.0.0/24".into(),
                dev: "hub".into()
            }],
            "clear removes the route"
        );
        assert_eq!(c.acquire(later, &acq()), "clear");
        assert_eq!(drive(&mut c, later), 0);
    }

    #[test]
    fn a_static_tunnel_without_auto_negotiate_routes_and_waits_for_traffic() {
        let now = Instant::now();
        let mut a = mgr(&hub("        set auto-negotiate disable\n", ""), now);
        assert_eq!(
            routes(&mut a),
            [RouteOp::Add {
                dest: "10.2.0.0/24".into(),
                dev: "hub".into()
            }]
        );
        assert_eq!(drive(&mut a, now), 0, "no traffic, no attempt");
        assert_eq!(a.acquire(now, &acq()), "initiate");
        assert_eq!(drive(&mut a, now), 1);
        let mut b = mgr(DIAL, now);
        shuttle(&mut a, &mut b, now);
        assert!(up(&a));
        // Without auto-negotiate (or dpd-action hold) nothing routes ahead of the tunnel.
        let mut plain = mgr(HUB, now);
        assert_eq!(routes(&mut plain), []);
    }

    #[test]
    fn keepalive_decides_whether_an_idle_child_sa_is_rekeyed() {
        let now = Instant::now();
        for (knob, packets, rekeyed) in [
            ("disable", 0, false),
            ("disable", 3, true),
            ("enable", 0, true),
        ] {
            let (mut a, _) = connected(&hub("", &format!("        set keepalive {knob}\n")), now);
            let spi = *a
                .sas
                .values()
                .next()
                .unwrap()
                .children
                .keys()
                .next()
                .unwrap();
            a.esp_expired(now, "hub", spi, false, "time", packets);
            assert_eq!(
                a.poll_transmit().is_some(),
                rekeyed,
                "keepalive {knob}, {packets} packets"
            );
        }
    }

    #[test]
    fn replay_disable_publishes_a_zero_window_and_keepalive_disable_leaves_rekeys_to_espd() {
        let now = Instant::now();
        let mut a = mgr(&hub("", "        set replay disable\n"), now);
        let mut b = mgr(DIAL, now);
        a.initiate(now, "hub", LOCAL.parse().unwrap(), PEER.parse().unwrap());
        shuttle(&mut a, &mut b, now);
        let c = children(&a.drain_bodies());
        assert_eq!(c[0].replay_window, 0);
        assert_eq!(children(&b.drain_bodies())[0].replay_window, 2048);
        let g = a.gateways.get("hub").unwrap();
        assert_eq!(g.cfg.driver_rekeys, [0], "keepalive disable is the default");
        let k = mgr(&hub("", "        set keepalive enable\n"), now);
        assert!(k.gateways.get("hub").unwrap().cfg.driver_rekeys.is_empty());
    }

    #[test]
    fn auto_negotiate_phase2_recreates_a_child_sa_the_peer_deleted() {
        let now = Instant::now();
        let (mut a, mut b) = connected(&hub("", "        set auto-negotiate enable\n"), now);
        b.tunnel_down(now, "vpn1", None).expect("tunnel down");
        shuttle(&mut a, &mut b, now);
        let c = children(&a.drain_bodies());
        assert_eq!(c.len(), 1, "created again without traffic");
    }
}
