//! Tunnel lifecycle of static gateways (issue 9): what happens after a dead verdict or a
//! failed negotiation, backoff while the peer stays away, `passive-mode`, backup peers.
//!
//! - **After a dead verdict** (dpdmon's `dead`), the tunnel is flushed (no exchange with the
//!   peer) and then, by the phase1's `dpd-action` ([`DpdAction`]): `restart` renegotiates,
//!   `hold` and `clear` stay down until `execute vpn ipsec tunnel up` or until the peer
//!   initiates; `hold` keeps its routes and traffic brings it back, `clear` removes them
//!   ([`super::traffic`]). Unset: `restart` when the phase1 initiates (`auto-negotiate enable`, no
//!   `passive-mode`), else `hold`. Dial-up instances are always cleared (they are removed).
//! - **Backoff.** Attempts of one static gateway are spaced by [`backoff`]: 5 s after a lost
//!   IKE SA, then 5, 10, 20, 40 s after consecutive failed attempts, at most 60 s; an
//!   established IKE SA resets the count.
//! - **`passive-mode enable`**: the gateway never initiates (neither by `auto-negotiate`,
//!   `tunnel up`, nor after a dead verdict); it answers its `remote-gw`s.
//! - **Backup peers.** A `remote-gw` list is tried in order: a failed attempt or a dead
//!   verdict moves the initiator to the next address (wrapping to the first). A phase1 with
//!   `set monitor <primary>` is a backup phase1: it initiates only while its primary has
//!   failed (a dead verdict, a lost or failed IKE SA) and has no established IKE SA; when
//!   the primary is established again, the backup's IKE SAs are deleted.
//! - **Pre-emption.** While a later `remote-gw` carries the tunnel, every
//!   `remote-gw-preempt-interval` (default 60 s; 0 disables) one earlier peer is tried, the
//!   first one first, with a full IKE SA (IKE_SA_INIT, IKE_AUTH with the CHILD SAs) beside
//!   the working one. When it is established and its first CHILD SA is up, the IKE SA to the
//!   later peer is deleted (Delete sent): make before break, the routes stay in place. A
//!   trial that fails changes nothing (no backoff, no peer change); the next waits one
//!   interval and tries the next earlier peer.
//!
//! The `lifecycle` view (`vpnctl diagnose vpn ike lifecycle`) shows per static phase1:
//! `up`, `negotiating` (an attempt is under way), `waiting` (backoff before the next
//! attempt; `next_attempt_secs`), `held` (dead verdict with `dpd-action hold|clear`),
//! `standby` (backup phase1 whose primary is fine), `passive`, or `idle` (no
//! `auto-negotiate`).
//!
//! Sans-IO like the rest of [`super::IkeManager`]: every call takes `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use haven_config::{DpdAction, Phase1, Phase1Type};

use super::{Gateway, IkeManager};

/// First wait before renegotiating a static tunnel (also after a lost IKE SA).
pub const BACKOFF_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between two attempts while the peer stays away.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Wait before the next attempt after `failures` consecutive failed attempts:
/// `min(5 s x 2^failures, 60 s)`.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

/// True when the phase1 starts negotiations by itself.
fn initiates(p: &Phase1) -> bool {
    p.kind != Phase1Type::Dynamic && p.auto_negotiate && !p.passive_mode
}

/// The `dpd-action` in force for `p` (see the module documentation for the default).
pub fn dpd_action_of(p: &Phase1) -> DpdAction {
    match p.dpd_action {
        Some(a) => a,
        None if initiates(p) => DpdAction::Restart,
        None => DpdAction::Hold,
    }
}

/// Per-gateway lifecycle state.
#[derive(Default)]
pub(super) struct Lifecycle {
    /// Consecutive failed attempts, by gateway.
    failures: BTreeMap<String, u32>,
    /// Gateways held down after a dead verdict (`dpd-action hold|clear`).
    held: BTreeSet<String>,
    /// Index of the `remote-gw` in use, by gateway.
    peer: BTreeMap<String, usize>,
    /// Gateways that failed (dead verdict, lost or failed IKE SA) and have not been
    /// established since: their backups (`set monitor`) may initiate.
    down: BTreeSet<String>,
    /// IKE SAs we initiated that are not established yet.
    initiated: BTreeSet<u64>,
    /// Time of the last state change, by gateway (shown in the `lifecycle` view).
    since: BTreeMap<String, Instant>,
    /// Pre-emption trials under way: IKE SA -> the peer index it tries.
    trials: BTreeMap<u64, usize>,
    /// Trials established whose first CHILD SA is awaited before the old SA is deleted.
    replacing: BTreeSet<u64>,
    /// Next pre-emption trial, by gateway (set while a later peer carries the tunnel).
    preempt_at: BTreeMap<String, Instant>,
    /// The earlier peer the next trial tries, by gateway.
    preempt_next: BTreeMap<String, usize>,
}

impl Lifecycle {
    fn advance_peer(&mut self, g: &Gateway) {
        if g.peers.len() > 1 {
            let i = self.peer.entry(g.name.clone()).or_insert(0);
            *i = (*i + 1) % g.peers.len();
        }
    }

    /// The `remote-gw` the gateway initiates to now.
    pub(super) fn peer_of(&self, g: &Gateway) -> Option<IpAddr> {
        let i = self.peer.get(&g.name).copied().unwrap_or(0);
        g.peers.get(i).or(g.peers.first()).copied()
    }
}

impl IkeManager {
    /// True when static gateway `g` may start an IKE SA now (besides the checks of
    /// `initiate_pending`): not passive, not held, and for a backup phase1, its primary is
    /// down.
    pub(super) fn life_may_initiate(&self, g: &Gateway) -> bool {
        if g.passive || self.life.held.contains(&g.name) {
            return false;
        }
        match &g.monitor {
            None => true,
            Some(primary) => {
                self.life.down.contains(primary)
                    && !self
                        .sas
                        .values()
                        .any(|e| &e.gateway == primary && e.sa.is_established())
            }
        }
    }

    /// Hook: `initiate` started IKE SA `id` (`trial`: beside an established one, a
    /// pre-emption trial to an earlier peer).
    pub(super) fn life_initiated(&mut self, id: u64, trial: bool) {
        self.life.initiated.insert(id);
        if trial {
            let peer = self
                .sas
                .get(&id)
                .and_then(|e| {
                    let g = self.gateways.get(&e.gateway)?;
                    let remote = e.sa.addresses().remote.ip();
                    g.peers.iter().position(|p| *p == remote)
                })
                .unwrap_or(0);
            self.life.trials.insert(id, peer);
            if let Some(g) = self.sas.get(&id).map(|e| e.gateway.clone()) {
                self.life.preempt_at.remove(&g);
            }
        }
    }

    /// Pre-emption trials due at `now`: (gateway, earlier peer, local address), for
    /// [`IkeManager::initiate_pending`].
    pub(super) fn preempt_pending(&self, now: Instant) -> Vec<(String, IpAddr, Option<IpAddr>)> {
        self.life
            .preempt_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .filter_map(|(name, _)| {
                let g = self.gateways.get(name)?;
                g.preempt?;
                if g.passive || self.ha.standby() {
                    return None;
                }
                let current = self.life.peer.get(name).copied().unwrap_or(0);
                let established = self
                    .sas
                    .values()
                    .any(|e| &e.gateway == name && e.sa.is_established());
                let trying = self.sas.keys().any(|id| {
                    self.life.trials.contains_key(id)
                        && self.sas.get(id).is_some_and(|e| &e.gateway == name)
                });
                if current == 0 || !established || trying {
                    return None;
                }
                let next = self.life.preempt_next.get(name).copied().unwrap_or(0);
                let target = if next < current { next } else { 0 };
                g.peers.get(target).map(|p| (name.clone(), *p, g.local_gw))
            })
            .collect()
    }

    /// Hook after `child_up`: the first CHILD SA of a pre-empting IKE SA is up: the IKE
    /// SAs of the same gateway to the later peer are deleted now (Delete sent; make before
    /// break: the routes stay, the tunnel record moves to the new peer).
    pub(super) fn life_child_up(&mut self, now: Instant, id: u64, gateway: &str) {
        if !self.life.replacing.remove(&id) {
            return;
        }
        let old: Vec<u64> = self
            .sas
            .iter()
            .filter(|(k, e)| **k != id && e.gateway == gateway)
            .map(|(k, _)| *k)
            .collect();
        let to = self
            .sas
            .get(&id)
            .map(|e| e.sa.addresses().remote.ip().to_string())
            .unwrap_or_default();
        for o in old {
            let mut from = String::new();
            if let Some(e) = self.sas.get_mut(&o) {
                from = e.sa.addresses().remote.ip().to_string();
                if e.sa.is_established() {
                    let _ = e.sa.delete(now);
                }
            }
            tracing::info!(
                "ike 0:{gateway}: preferred peer {to} is back: tunnel moved from {from}, its IKE SA deleted"
            );
            self.pump(o, now);
            self.flush(o, now, "pre-empted");
        }
    }

    /// Hook: a CHILD SA negotiation of IKE SA `id` failed. A pre-empting IKE SA that cannot
    /// carry the tunnel is deleted again and the current peer stays (the next trial waits
    /// one interval and tries the next earlier peer).
    pub(super) fn life_child_failed(&mut self, now: Instant, id: u64) {
        if !self.life.replacing.remove(&id) {
            return;
        }
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        let gateway = e.gateway.clone();
        let tried = e.sa.addresses().remote.ip();
        let _ = e.sa.delete(now);
        let Some(g) = self.gateways.get(&gateway).cloned() else {
            return;
        };
        let index = |ip: IpAddr| g.peers.iter().position(|p| *p == ip);
        let current = self
            .sas
            .iter()
            .filter(|(k, o)| **k != id && o.gateway == gateway && o.sa.is_established())
            .find_map(|(_, o)| index(o.sa.addresses().remote.ip()));
        if let Some(i) = current {
            self.life.peer.insert(gateway.clone(), i);
        }
        if let Some(every) = g.preempt {
            self.life.preempt_at.insert(gateway.clone(), now + every);
            self.life
                .preempt_next
                .insert(gateway.clone(), index(tried).map_or(0, |t| t + 1));
        }
        tracing::info!(
            "ike 0:{gateway}: preferred peer {tried} refused the CHILD SA, staying with the current one"
        );
        self.pump(id, now);
        self.flush(id, now, "pre-emption without CHILD SA");
    }

    /// Hook: an IKE SA of `gateway` was established with `remote`. Resets the backoff,
    /// releases a hold, remembers which peer answered, and deletes the IKE SAs of backup
    /// phase1s watching this one.
    pub(super) fn life_established(
        &mut self,
        now: Instant,
        id: u64,
        gateway: &str,
        remote: IpAddr,
    ) {
        self.life.initiated.remove(&id);
        self.life.failures.remove(gateway);
        self.life.held.remove(gateway);
        self.life.down.remove(gateway);
        self.life.since.insert(gateway.to_string(), now);
        self.life.trials.remove(&id);
        if let Some(g) = self.gateways.get(gateway) {
            if let Some(i) = g.peers.iter().position(|p| *p == remote) {
                // Another established SA of this gateway to a later peer: this one replaces
                // it once its first CHILD SA is up (`life_child_up`).
                let later = self.sas.iter().any(|(k, e)| {
                    *k != id
                        && e.gateway == gateway
                        && e.sa.is_established()
                        && g.peers
                            .iter()
                            .position(|p| *p == e.sa.addresses().remote.ip())
                            .is_none_or(|j| j > i)
                });
                if later {
                    self.life.replacing.insert(id);
                }
                self.life.peer.insert(gateway.to_string(), i);
                match g.preempt {
                    Some(every) if i > 0 => {
                        self.life
                            .preempt_at
                            .insert(gateway.to_string(), now + every);
                        self.life.preempt_next.insert(gateway.to_string(), 0);
                    }
                    _ => {
                        self.life.preempt_at.remove(gateway);
                        self.life.preempt_next.remove(gateway);
                    }
                }
            }
        }
        let backups: Vec<String> = self
            .gateways
            .values()
            .filter(|b| b.monitor.as_deref() == Some(gateway))
            .map(|b| b.name.clone())
            .collect();
        for b in backups {
            let n = self.clear(now, Some(&b));
            if n > 0 {
                tracing::info!(
                    "ike 0:{b}: primary {gateway} is up again, backup deleted ({n} IKE SA)"
                );
            }
        }
    }

    /// Hook from `flush`: the IKE SA `id` of static gateway `g` is gone (`carried`: another
    /// established IKE SA of the gateway still carries the tunnel). Returns when the
    /// gateway may initiate again (`None`: no change).
    pub(super) fn life_gone(
        &mut self,
        now: Instant,
        id: u64,
        g: &Gateway,
        established: bool,
        carried: bool,
    ) -> Option<Instant> {
        let ours = self.life.initiated.remove(&id);
        let trial = self.life.trials.remove(&id);
        self.life.replacing.remove(&id);
        if carried {
            if let Some(tried) = trial {
                // A failed pre-emption trial: the next one tries the next earlier peer.
                tracing::info!(
                    "ike 0:{}: preferred peer {} did not answer, staying with the current one",
                    g.name,
                    g.peers
                        .get(tried)
                        .map(|p| p.to_string())
                        .unwrap_or_default()
                );
                if let Some(every) = g.preempt {
                    self.life.preempt_at.insert(g.name.clone(), now + every);
                    self.life.preempt_next.insert(g.name.clone(), tried + 1);
                }
            }
            return None;
        }
        self.life.since.insert(g.name.clone(), now);
        self.life.preempt_at.remove(&g.name);
        if established {
            self.life.down.insert(g.name.clone());
            return Some(now + backoff(0));
        }
        if !ours {
            // A peer's attempt that failed says nothing about our peer's reachability.
            return Some(now + backoff(self.life.failures.get(&g.name).copied().unwrap_or(0)));
        }
        self.life.down.insert(g.name.clone());
        let n = self.life.failures.entry(g.name.clone()).or_insert(0);
        let wait = backoff(*n);
        *n = n.saturating_add(1);
        let failures = *n;
        self.life.advance_peer(g);
        if g.initiate || self.wanted.contains(&g.name) {
            tracing::info!(
                "ike 0:{}: negotiation failed ({failures} in a row), next attempt to {} in {} s",
                g.name,
                self.life
                    .peer_of(g)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                wait.as_secs()
            );
        }
        Some(now + wait)
    }

    /// Hook from `dead_peer`, before the flush: applies the gateway's `dpd-action`.
    pub(super) fn life_dead(&mut self, now: Instant, g: &Gateway) {
        self.life.down.insert(g.name.clone());
        self.life.since.insert(g.name.clone(), now);
        match g.dpd_action {
            DpdAction::Restart if !g.passive => {
                self.life.advance_peer(g);
                tracing::info!(
                    "ike 0:{}: dead peer, dpd-action restart: renegotiating with {} in {} s",
                    g.name,
                    self.life
                        .peer_of(g)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    backoff(0).as_secs()
                );
            }
            action => {
                self.life.held.insert(g.name.clone());
                self.wanted.remove(&g.name);
                tracing::info!(
                    "ike 0:{}: dead peer, dpd-action {}: down until `execute vpn ipsec tunnel up` or the peer initiates",
                    g.name,
                    if g.passive {
                        "(passive-mode)".to_string()
                    } else {
                        super::spelling(&action)
                    }
                );
            }
        }
    }

    /// Hook from `set_config`: forgets the state of phase1s that are gone (a phase1 added
    /// again starts afresh; one that stays keeps its hold, backoff and peer).
    pub(super) fn life_retain(&mut self) {
        let gws = &self.gateways;
        self.life.failures.retain(|k, _| gws.contains_key(k));
        self.life.held.retain(|k| gws.contains_key(k));
        self.life.peer.retain(|k, _| gws.contains_key(k));
        self.life.down.retain(|k| gws.contains_key(k));
        self.life.since.retain(|k, _| gws.contains_key(k));
        self.life
            .preempt_at
            .retain(|k, _| gws.get(k).is_some_and(|g| g.preempt.is_some()));
        self.life.preempt_next.retain(|k, _| gws.contains_key(k));
    }

    /// True while the gateway is held after a dead verdict.
    pub(super) fn life_is_held(&self, gateway: &str) -> bool {
        self.life.held.contains(gateway)
    }

    /// Hook from traffic-triggered negotiation ([`super::traffic`]): `hold` ends for one
    /// attempt (`release`) or starts again after that attempt failed.
    pub(super) fn life_set_held(&mut self, gateway: &str, held: bool) {
        if held {
            self.life.held.insert(gateway.to_string());
        } else {
            self.life.held.remove(gateway);
        }
    }

    /// Hook from `tunnel_up`: the operator asked for the tunnel; a hold ends.
    pub(super) fn life_release(&mut self, gateway: &str) {
        self.life.held.remove(gateway);
        self.life.failures.remove(gateway);
    }

    /// The `lifecycle` view: one object per static gateway.
    pub fn lifecycle_view(&self, now: Instant) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .gateways
            .values()
            .filter(|g| !g.dynamic)
            .map(|g| {
                let up = self
                    .sas
                    .values()
                    .any(|e| e.gateway == g.name && e.sa.is_established());
                let trying = self.sas.values().any(|e| e.gateway == g.name);
                let state = if up {
                    "up"
                } else if trying {
                    "negotiating"
                } else if g.passive {
                    "passive"
                } else if self.life.held.contains(&g.name) {
                    "held"
                } else if g.monitor.is_some() && !self.life_may_initiate(g) {
                    "standby"
                } else if g.initiate || self.wanted.contains(&g.name) {
                    "waiting"
                } else {
                    "idle"
                };
                serde_json::json!({
                    "name": g.name,
                    "state": state,
                    "dpd_action": super::spelling(&g.dpd_action),
                    "passive": g.passive,
                    "monitor": g.monitor,
                    "peers": g.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "peer": self.life.peer_of(g).map(|p| p.to_string()),
                    "failures": self.life.failures.get(&g.name).copied().unwrap_or(0),
                    "preempt_interval_secs": g.preempt.map(|d| d.as_secs()),
                    "next_preempt_secs": self.life.preempt_at.get(&g.name)
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                    "next_attempt_secs": self.retry_at.get(&g.name)
                        .filter(|_| state == "waiting")
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                    "trap_routes": self.trap_routes(&g.name),
                    "since_secs": self.life.since.get(&g.name)
                        .map(|t| now.saturating_duration_since(*t).as_secs()),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::{Body, TunnelState};

    /// A static phase1 `name` to `peers` with `extra` lines, its phase2, and a dial-up
    /// responder config for the peers.
    fn static_p1(name: &str, peers: &str, extra: &str) -> String {
        format!(
            "config vpn ipsec phase1-interface
    edit \"{name}\"
        set type static
        set interface \"port1\"
        set remote-gw {peers}
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret \"k\"
{extra}    next
end
config vpn ipsec phase2-interface
    edit \"{name}\"
        set phase1name \"{name}\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.1.0.0/24
        set dst-subnet 10.2.0.0/24
    next
end
"
        )
    }

    const DIAL: &str = "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"port2\"
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret \"k\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.2.0.0/24
        set dst-subnet 10.1.0.0/24
    next
end
";

    use crate::ike::tests::mgr;

    const LOCAL: &str = "192.0.2.1";

    /// Starts what `initiate_pending` asks for, like the driver; returns (gateway, peer).
    pub(super) fn drive(m: &mut IkeManager, now: Instant) -> Vec<(String, IpAddr)> {
        let pending = m.initiate_pending(now);
        for (g, remote, _) in &pending {
            m.initiate(now, g, LOCAL.parse().unwrap(), *remote);
        }
        pending.into_iter().map(|(g, r, _)| (g, r)).collect()
    }

    /// Carries datagrams between `a` and the responders by destination address; datagrams
    /// to any other address are lost.
    pub(super) fn shuttle(a: &mut IkeManager, peers: &mut [(&str, &mut IkeManager)], now: Instant) {
        for _ in 0..50 {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                let to = t.destination.ip().to_string();
                if let Some((_, b)) = peers.iter_mut().find(|(ip, _)| *ip == to) {
                    b.handle_datagram(now, t.destination, t.source, &t.payload);
                    moved = true;
                }
            }
            for (_, b) in peers.iter_mut() {
                while let Some(t) = b.poll_transmit() {
                    a.handle_datagram(now, t.destination, t.source, &t.payload);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the managers never went quiet");
    }

    /// Runs timers until every half-open SA has given up; returns the time then.
    fn give_up(m: &mut IkeManager, mut now: Instant) -> Instant {
        for _ in 0..100 {
            if m.sas.is_empty() {
                return now;
            }
            now = m
                .sas
                .values()
                .filter_map(|e| e.sa.poll_timeout())
                .min()
                .unwrap_or(now);
            m.handle_timeout(now);
            while m.poll_transmit().is_some() {}
        }
        panic!("the attempt never gave up");
    }

    fn up(m: &IkeManager, gw: &str) -> bool {
        m.sas
            .values()
            .any(|e| e.gateway == gw && e.sa.is_established())
    }

    fn view(m: &IkeManager, now: Instant, gw: &str) -> serde_json::Value {
        m.lifecycle_view(now)
            .as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == gw).cloned())
            .unwrap_or_default()
    }

    #[test]
    fn restart_renegotiates_after_a_dead_verdict_and_hold_waits_for_the_operator() {
        let t0 = Instant::now();
        let mut gw = mgr(&static_p1("t", "192.0.2.2", ""), t0);
        let mut peer = mgr(DIAL, t0);
        assert_eq!(
            drive(&mut gw, t0),
            [("t".into(), "192.0.2.2".parse().unwrap())]
        );
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t0);
        assert!(up(&gw, "t"));
        gw.drain_bodies();

        gw.dead_peer(t0, "t");
        assert!(gw.poll_transmit().is_none(), "a dead peer gets no Delete");
        assert!(gw.drain_bodies().iter().any(
            |b| matches!(b, Body::Tunnel(t) if t.name == "t" && t.state == TunnelState::Down)
        ));
        assert!(drive(&mut gw, t0).is_empty(), "not at once");
        assert_eq!(view(&gw, t0, "t")["state"], "waiting");
        let t1 = t0 + BACKOFF_FIRST;
        assert_eq!(drive(&mut gw, t1).len(), 1, "restart after 5 s");
        let mut peer = mgr(DIAL, t1);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t1);
        assert!(up(&gw, "t"), "back by itself");

        // dpd-action hold: flushed, then nothing until `tunnel up`.
        let mut gw = mgr(
            &static_p1("t", "192.0.2.2", "        set dpd-action hold\n"),
            t0,
        );
        let mut peer = mgr(DIAL, t0);
        drive(&mut gw, t0);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t0);
        gw.dead_peer(t0, "t");
        let later = t0 + Duration::from_secs(3600);
        assert!(drive(&mut gw, later).is_empty(), "held");
        assert_eq!(view(&gw, later, "t")["state"], "held");
        // A reload that keeps the phase1 keeps the hold; removing it forgets it.
        let held_cfg = haven_config::parse(&static_p1(
            "t",
            "192.0.2.2",
            "        set dpd-action hold\n",
        ))
        .map(|p| p.config)
        .unwrap_or_default();
        gw.set_config(later, &held_cfg);
        assert!(
            drive(&mut gw, later).is_empty(),
            "still held after a reload"
        );
        gw.set_config(later, &haven_config::Config::default());
        gw.set_config(later, &held_cfg);
        assert_eq!(
            drive(&mut gw, later).len(),
            1,
            "a phase1 added again starts afresh"
        );
        let mut gw = mgr(
            &static_p1("t", "192.0.2.2", "        set dpd-action hold\n"),
            t0,
        );
        let mut peer = mgr(DIAL, t0);
        drive(&mut gw, t0);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t0);
        gw.dead_peer(t0, "t");
        assert!(drive(&mut gw, later).is_empty(), "held");
        assert!(gw.tunnel_up(later, "t", None).is_ok());
        assert_eq!(drive(&mut gw, later).len(), 1, "the operator brings it up");
    }

    #[test]
    fn failed_attempts_back_off_and_move_along_the_remote_gw_list() {
        let t0 = Instant::now();
        // 192.0.2.9 never answers; 192.0.2.2 does.
        let mut gw = mgr(&static_p1("t", "192.0.2.9 192.0.2.2", ""), t0);
        let mut peer = mgr(DIAL, t0);
        assert_eq!(drive(&mut gw, t0)[0].1.to_string(), "192.0.2.9");
        let failed = give_up(&mut gw, t0);
        assert_eq!(view(&gw, failed, "t")["failures"], 1);
        assert_eq!(view(&gw, failed, "t")["next_attempt_secs"], 5);
        assert!(drive(&mut gw, failed).is_empty());
        let t1 = failed + backoff(0);
        assert_eq!(
            drive(&mut gw, t1)[0].1.to_string(),
            "192.0.2.2",
            "next peer"
        );
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t1);
        assert!(up(&gw, "t"));
        assert_eq!(view(&gw, t1, "t")["failures"], 0, "reset when established");

        // A single silent peer: 5, 10, 20 s between attempts.
        let mut gw = mgr(&static_p1("t", "192.0.2.9", ""), t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..3 {
            assert_eq!(drive(&mut gw, now).len(), 1);
            let failed = give_up(&mut gw, now);
            let next = failed
                + Duration::from_secs(
                    view(&gw, failed, "t")["next_attempt_secs"]
                        .as_u64()
                        .unwrap(),
                );
            assert!(drive(&mut gw, next - Duration::from_millis(1)).is_empty());
            waits.push(next.duration_since(failed).as_secs());
            now = next;
        }
        assert_eq!(waits, [5, 10, 20]);
    }

    #[test]
    fn passive_mode_never_initiates() {
        let t0 = Instant::now();
        let mut gw = mgr(
            &static_p1("t", "192.0.2.2", "        set passive-mode enable\n"),
            t0,
        );
        assert!(drive(&mut gw, t0).is_empty());
        let e = gw.tunnel_up(t0, "t", None).unwrap_err();
        assert!(e.contains("passive-mode"), "{e}");
        assert!(drive(&mut gw, t0 + Duration::from_secs(600)).is_empty());
        assert_eq!(view(&gw, t0, "t")["state"], "passive");
        assert_eq!(view(&gw, t0, "t")["dpd_action"], "hold");
    }

    #[test]
    fn a_backup_phase1_takes_over_while_its_primary_is_down_and_yields_when_it_returns() {
        let t0 = Instant::now();
        let primary = static_p1("p", "192.0.2.9", "");
        let backup = static_p1("b", "192.0.2.2", "        set monitor \"p\"\n")
            .replace("10.1.0.0/24", "10.1.0.0/25");
        let text = format!("{primary}{backup}");
        let mut gw = mgr(&text, t0);
        let mut p_peer = mgr(DIAL, t0);
        let mut b_peer = mgr(DIAL, t0);
        // At first only the primary tries.
        assert_eq!(
            drive(&mut gw, t0),
            [("p".into(), "192.0.2.9".parse().unwrap())]
        );
        assert_eq!(view(&gw, t0, "b")["state"], "standby");
        // The primary's peer is silent: its attempt fails, the backup comes up.
        let failed = give_up(&mut gw, t0);
        let started = drive(&mut gw, failed);
        assert_eq!(started, [("b".into(), "192.0.2.2".parse().unwrap())]);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut b_peer)], failed);
        assert!(up(&gw, "b"));
        // The primary keeps trying with backoff; when it answers, the backup is deleted.
        let t1 = failed + BACKOFF_FIRST;
        assert_eq!(
            drive(&mut gw, t1),
            [("p".into(), "192.0.2.9".parse().unwrap())]
        );
        shuttle(
            &mut gw,
            &mut [("192.0.2.9", &mut p_peer), ("192.0.2.2", &mut b_peer)],
            t1,
        );
        assert!(up(&gw, "p"));
        assert!(!up(&gw, "b"), "the backup yields to its primary");
        assert!(drive(&mut gw, t1 + Duration::from_secs(600)).is_empty());
        assert_eq!(view(&gw, t1, "b")["state"], "standby");
    }

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_a_minute() {
        let s: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [5, 10, 20, 40, 60, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn dpd_action_defaults_follow_auto_negotiate_and_passive_mode() {
        let mut p = Phase1::new("t");
        assert_eq!(dpd_action_of(&p), DpdAction::Restart);
        p.auto_negotiate = false;
        assert_eq!(dpd_action_of(&p), DpdAction::Hold);
        p.auto_negotiate = true;
        p.passive_mode = true;
        assert_eq!(dpd_action_of(&p), DpdAction::Hold);
        p.dpd_action = Some(DpdAction::Clear);
        assert_eq!(dpd_action_of(&p), DpdAction::Clear);
    }
}

#[cfg(test)]
mod monitor_and_preempt_tests {
    use super::tests::{drive, shuttle};
    use super::*;
    use crate::ike::tests::mgr;
    use crate::ike::RouteOp;
    use bus_schema::{Body, TunnelState};

    fn config(peers: &str, extra: &str) -> String {
        format!(
            "config vpn ipsec phase1-interface
    edit \"t\"
        set type static
        set interface \"port1\"
        set remote-gw {peers}
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret \"k\"
{extra}    next
end
config vpn ipsec phase2-interface
    edit \"t\"
        set phase1name \"t\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.1.0.0/24
        set dst-subnet 10.2.0.0/24
    next
end
"
        )
    }

    const DIAL: &str = "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"port2\"
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret \"k\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.2.0.0/24
        set dst-subnet 10.1.0.0/24
    next
end
";

    const MON: &str = "        set tunnel-monitor enable
        set tunnel-monitor-destination-ip 10.2.0.1
        set tunnel-monitor-source-ip 10.1.0.1
";

    /// Runs timers until `m` has `n` IKE SAs left; returns the time then.
    fn run_until(m: &mut IkeManager, mut now: Instant, n: usize) -> Instant {
        for _ in 0..100 {
            if m.sas.len() == n {
                return now;
            }
            now = m
                .sas
                .values()
                .filter_map(|e| e.sa.poll_timeout())
                .min()
                .unwrap_or(now);
            m.handle_timeout(now);
            while m.poll_transmit().is_some() {}
        }
        panic!("the attempt never gave up");
    }

    fn remotes(m: &IkeManager) -> Vec<String> {
        m.sas
            .values()
            .filter(|e| e.sa.is_established())
            .map(|e| e.sa.addresses().remote.ip().to_string())
            .collect()
    }

    fn routes(m: &mut IkeManager) -> Vec<RouteOp> {
        std::iter::from_fn(|| m.poll_route()).collect()
    }

    fn add(d: &str) -> RouteOp {
        RouteOp::Add {
            dest: d.into(),
            dev: "t".into(),
        }
    }

    fn del(d: &str) -> RouteOp {
        RouteOp::Del {
            dest: d.into(),
            dev: "t".into(),
        }
    }

    #[test]
    fn wait_recover_withdraws_the_routes_and_gives_them_back() {
        let t0 = Instant::now();
        let mut gw = mgr(&config("192.0.2.2", MON), t0);
        let mut peer = mgr(DIAL, t0);
        drive(&mut gw, t0);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut peer)], t0);
        assert_eq!(routes(&mut gw), [add("10.2.0.0/24")]);
        gw.drain_bodies();
        gw.monitor_down(t0, "t");
        assert_eq!(routes(&mut gw), [del("10.2.0.0/24")], "withdrawn");
        assert_eq!(remotes(&gw), ["192.0.2.2"], "the SAs stay (wait-recover)");
        gw.monitor_down(t0, "t");
        assert!(routes(&mut gw).is_empty(), "once");
        assert!(gw.drain_bodies().is_empty(), "the tunnel stays up");
        gw.monitor_up("t");
        assert_eq!(routes(&mut gw), [add("10.2.0.0/24")], "back");
        gw.monitor_up("t");
        assert!(routes(&mut gw).is_empty(), "once");
        // Withdrawn, then flushed by DPD: nothing left to delete twice.
        gw.monitor_down(t0, "t");
        routes(&mut gw);
        gw.dead_peer(t0, "t");
        assert!(routes(&mut gw).is_empty(), "{:?}", gw.routes);
    }

    #[test]
    fn fail_over_moves_to_the_next_remote_gw_like_a_dead_verdict() {
        let t0 = Instant::now();
        // Two peers: fail-over by default.
        let mut gw = mgr(&config("192.0.2.2 192.0.2.3", MON), t0);
        let mut a = mgr(DIAL, t0);
        let mut b = mgr(DIAL, t0);
        assert_eq!(drive(&mut gw, t0)[0].1.to_string(), "192.0.2.2");
        shuttle(&mut gw, &mut [("192.0.2.2", &mut a)], t0);
        routes(&mut gw);
        gw.drain_bodies();
        gw.monitor_down(t0, "t");
        assert_eq!(routes(&mut gw), [del("10.2.0.0/24")]);
        assert!(gw.drain_bodies().iter().any(
            |x| matches!(x, Body::Tunnel(t) if t.name == "t" && t.state == TunnelState::Down)
        ));
        let t1 = t0 + BACKOFF_FIRST;
        assert_eq!(drive(&mut gw, t1)[0].1.to_string(), "192.0.2.3");
        shuttle(&mut gw, &mut [("192.0.2.3", &mut b)], t1);
        assert_eq!(remotes(&gw), ["192.0.2.3"]);
        assert_eq!(routes(&mut gw), [add("10.2.0.0/24")]);
    }

    #[test]
    fn a_later_peer_preempts_back_to_the_first_make_before_break() {
        let t0 = Instant::now();
        let mut gw = mgr(
            &config(
                "192.0.2.9 192.0.2.2",
                "        set remote-gw-preempt-interval 10\n",
            ),
            t0,
        );
        let mut second = mgr(DIAL, t0);
        // The first peer is silent: the tunnel comes up with the second.
        assert_eq!(drive(&mut gw, t0)[0].1.to_string(), "192.0.2.9");
        let failed = run_until(&mut gw, t0, 0);
        let t1 = failed + backoff(0);
        assert_eq!(drive(&mut gw, t1)[0].1.to_string(), "192.0.2.2");
        shuttle(&mut gw, &mut [("192.0.2.2", &mut second)], t1);
        assert_eq!(remotes(&gw), ["192.0.2.2"]);
        let view = gw.lifecycle_view(t1);
        assert_eq!(view[0]["next_preempt_secs"], 10, "{view}");
        routes(&mut gw);

        // A trial every 10 s while the first stays silent: no change, no backoff.
        assert!(drive(&mut gw, t1 + Duration::from_secs(9)).is_empty());
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(
            drive(&mut gw, t2),
            [("t".into(), "192.0.2.9".parse().unwrap())]
        );
        assert!(drive(&mut gw, t2).is_empty(), "one trial at a time");
        let t3 = run_until(&mut gw, t2, 1);
        assert_eq!(remotes(&gw), ["192.0.2.2"], "still with the second");
        assert!(
            routes(&mut gw).is_empty(),
            "a failed trial touches no route"
        );
        assert_eq!(gw.lifecycle_view(t3)[0]["failures"], 0);
        assert_eq!(gw.lifecycle_view(t3)[0]["peer"], "192.0.2.2");

        // The first answers: established beside the second, then the second is deleted.
        let t4 = t3 + Duration::from_secs(10);
        let mut first = mgr(DIAL, t4);
        assert_eq!(drive(&mut gw, t4)[0].1.to_string(), "192.0.2.9");
        gw.drain_bodies();
        shuttle(
            &mut gw,
            &mut [("192.0.2.9", &mut first), ("192.0.2.2", &mut second)],
            t4,
        );
        assert_eq!(
            remotes(&gw),
            ["192.0.2.9"],
            "moved back, the old SA deleted"
        );
        assert!(
            second.sas.is_empty(),
            "the second peer got our Delete and dropped its SA"
        );
        let r = routes(&mut gw);
        assert!(!r.contains(&del("10.2.0.0/24")), "make before break: {r:?}");
        let bodies = gw.drain_bodies();
        let last_tunnel = bodies
            .iter()
            .rev()
            .filter_map(|x| match x {
                Body::Tunnel(t) => Some(t.clone()),
                _ => None,
            })
            .next()
            .unwrap();
        assert_eq!(last_tunnel.state, TunnelState::Up);
        assert_eq!(last_tunnel.remote_gw.as_deref(), Some("192.0.2.9"));
        assert!(gw.lifecycle_view(t4)[0]["next_preempt_secs"].is_null());
        assert!(drive(&mut gw, t4 + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn a_preferred_peer_that_refuses_the_child_sa_does_not_take_the_tunnel() {
        let t0 = Instant::now();
        let mut gw = mgr(
            &config(
                "192.0.2.9 192.0.2.2",
                "        set remote-gw-preempt-interval 10\n",
            ),
            t0,
        );
        let mut second = mgr(DIAL, t0);
        drive(&mut gw, t0);
        let failed = run_until(&mut gw, t0, 0);
        let t1 = failed + backoff(0);
        drive(&mut gw, t1);
        shuttle(&mut gw, &mut [("192.0.2.2", &mut second)], t1);
        assert_eq!(remotes(&gw), ["192.0.2.2"]);
        // The first peer answers IKE but accepts no CHILD SA of ours.
        let mut first = mgr(
            &DIAL.replace("set proposal aes128gcm\n", "set proposal aes256gcm\n"),
            t1,
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(drive(&mut gw, t2)[0].1.to_string(), "192.0.2.9");
        shuttle(
            &mut gw,
            &mut [("192.0.2.9", &mut first), ("192.0.2.2", &mut second)],
            t2,
        );
        assert_eq!(
            remotes(&gw),
            ["192.0.2.2"],
            "the tunnel stays with the second"
        );
        assert!(!second.sas.is_empty(), "the second peer's SA is kept");
        let v = gw.lifecycle_view(t2);
        assert_eq!(v[0]["peer"], "192.0.2.2", "{v}");
        assert_eq!(v[0]["next_preempt_secs"], 10, "{v}");
    }
}
