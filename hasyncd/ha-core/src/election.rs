//! FGCP membership and primary election, sans-IO and driven by `now_ms`.
//!
//! # Election order
//! As FortiOS documents it ("HA primary unit selection criteria", FortiOS 7.4 Administration
//! Guide; "Points to remember about primary unit selection", FortiOS 5.2 HA guide), compared
//! member against member, stopping at the first criterion that differs:
//!
//! | | override disabled (default) | override enabled (on **all** members) |
//! |---|---|---|
//! | 1 | fewer failed monitored interfaces | fewer failed monitored interfaces |
//! | 2 | greater HA age, if the ages differ by more than the margin | higher `priority` |
//! | 3 | higher `priority` | greater HA age, if the ages differ by more than the margin |
//! | 4 | higher serial number | higher serial number |
//! | 5 | higher member id (Haven: makes the order total when serials are equal) | same |
//!
//! The margin is FortiOS's `ha-uptime-diff-margin`, 300 s by default. HA age is the time
//! since the member started or since one of its monitored interfaces last failed (FortiOS
//! resets the age to 0 on both; a restored interface does not reset it). If members
//! disagree about `override`, it counts as disabled, so that every member computes the
//! same order from the same heartbeats. With age inside the margin the comparison is not
//! transitive across three members; members are then compared in ascending member-id
//! order, which all members do alike.
//!
//! # Liveness
//! A heartbeat is sent every `hb_interval_ms`; a peer is lost when nothing came from it (no
//! heartbeat, and no other authenticated message: [`Fgcp::handle_alive`]) for
//! `hb_interval_ms * hb_lost_threshold` (FortiOS defaults: 200 ms and 6). A starting member
//! stays in [`HaRole::Hello`] for that same span, listening, before the first election;
//! the others do not count it as a candidate until it leaves hello, so a running primary
//! keeps its role until the newcomer can take over (a takeover overlaps by at most one
//! heartbeat rather than leaving a gap).
//!
//! # Driving it
//! After every `handle_*`/`set_*` call and at every deadline: drain [`Fgcp::poll_event`],
//! send what [`Fgcp::poll_transmit`] returns on every heartbeat device, then arm a timer
//! for [`Fgcp::poll_timeout`] and call [`Fgcp::handle_timeout`] when it fires.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

use crate::error::{HaError, Result};
use crate::msg::{HaRole, Heartbeat};
use crate::wire::MemberId;

/// FortiOS `hb-interval` default: 2 ticks of 100 ms.
pub const DEFAULT_HB_INTERVAL_MS: u64 = 200;
/// FortiOS `hb-lost-threshold` default.
pub const DEFAULT_HB_LOST_THRESHOLD: u32 = 6;
/// FortiOS `ha-uptime-diff-margin` default (300 s).
pub const DEFAULT_UPTIME_MARGIN_MS: u64 = 300_000;

/// Election settings of this member (from `config system ha`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FgcpConfig {
    /// This member.
    pub me: MemberId,
    /// Serial number / host name (tie-breaker, shown in status).
    pub serial: String,
    /// `priority`.
    pub priority: u8,
    /// `override`.
    pub override_: bool,
    /// Heartbeat interval in ms (`Ha::hb_interval_ms`).
    pub hb_interval_ms: u64,
    /// `hb-lost-threshold`.
    pub hb_lost_threshold: u32,
    /// `ha-uptime-diff-margin` in ms.
    pub uptime_margin_ms: u64,
    /// Number of `monitor` interfaces.
    pub monitor_total: u16,
}

impl FgcpConfig {
    /// FortiOS defaults for everything but identity and priority.
    pub fn new(me: MemberId, serial: impl Into<String>, priority: u8) -> Self {
        FgcpConfig {
            me,
            serial: serial.into(),
            priority,
            override_: false,
            hb_interval_ms: DEFAULT_HB_INTERVAL_MS,
            hb_lost_threshold: DEFAULT_HB_LOST_THRESHOLD,
            uptime_margin_ms: DEFAULT_UPTIME_MARGIN_MS,
            monitor_total: 0,
        }
    }

    fn lost_after_ms(&self) -> u64 {
        self.hb_interval_ms
            .saturating_mul(u64::from(self.hb_lost_threshold))
    }
}

/// What the election tells the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionEvent {
    /// A member was heard from for the first time, or again after it was lost.
    PeerJoined(MemberId),
    /// A member missed `hb_lost_threshold` heartbeats.
    PeerLost(MemberId),
    /// This member is now primary: bring up tunnels and shared addresses, announce them.
    BecamePrimary,
    /// This member is secondary under `primary` (also emitted when the primary changes
    /// while this member stays secondary).
    BecameSecondary {
        /// The new primary.
        primary: MemberId,
    },
}

#[derive(Clone, Debug)]
struct Peer {
    hb: Heartbeat,
    /// When `hb` arrived (its uptime counts from then).
    rx_at_ms: u64,
    /// When anything authenticated last came from the peer: a heartbeat, or any other
    /// message ([`Fgcp::handle_alive`]). The loss time counts from here.
    seen_at_ms: u64,
}

/// One member as the status view shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Member id.
    pub member: MemberId,
    /// Serial / host name.
    pub serial: String,
    /// `priority`.
    pub priority: u8,
    /// HA age (ms) as estimated now.
    pub age_ms: u64,
    /// Failed monitored interfaces.
    pub monitor_failed: u16,
    /// Whether it is the elected primary.
    pub primary: bool,
    /// ms since anything last came from it (0 for this member).
    pub silent_ms: u64,
}

/// Election inputs of one member at one instant.
#[derive(Clone, Debug)]
struct Candidate<'a> {
    member: MemberId,
    serial: &'a str,
    priority: u8,
    age_ms: u64,
    monitor_failed: u16,
}

/// FGCP membership and election state of one member.
#[derive(Debug)]
pub struct Fgcp {
    cfg: FgcpConfig,
    age_start_ms: u64,
    monitor_up: u16,
    hello_until_ms: u64,
    next_hb_ms: u64,
    peers: BTreeMap<MemberId, Peer>,
    role: HaRole,
    primary: Option<MemberId>,
    events: VecDeque<ElectionEvent>,
}

impl Fgcp {
    /// Start at `now_ms` with every monitored interface up, in [`HaRole::Hello`].
    pub fn new(cfg: FgcpConfig, now_ms: u64) -> Result<Fgcp> {
        if cfg.hb_interval_ms == 0 {
            return Err(HaError::Config("heartbeat interval must be positive"));
        }
        if cfg.hb_lost_threshold == 0 {
            return Err(HaError::Config("hb-lost-threshold must be at least 1"));
        }
        Ok(Fgcp {
            age_start_ms: now_ms,
            monitor_up: cfg.monitor_total,
            hello_until_ms: now_ms.saturating_add(cfg.lost_after_ms()),
            next_hb_ms: now_ms,
            peers: BTreeMap::new(),
            role: HaRole::Hello,
            primary: None,
            events: VecDeque::new(),
            cfg,
        })
    }

    /// A configuration reload (priority, override, intervals, monitored count, serial).
    /// The member id cannot change; the HA age is kept; an election runs at once (FortiOS
    /// renegotiates when the priority changes).
    pub fn reconfigure(&mut self, cfg: FgcpConfig, now_ms: u64) -> Result<()> {
        if cfg.me != self.cfg.me {
            return Err(HaError::Config("the member id cannot change on reload"));
        }
        if cfg.hb_interval_ms == 0 || cfg.hb_lost_threshold == 0 {
            return Err(HaError::Config(
                "heartbeat interval and lost threshold must be positive",
            ));
        }
        self.monitor_up = self.monitor_up.min(cfg.monitor_total);
        self.cfg = cfg;
        self.next_hb_ms = now_ms;
        self.elect(now_ms);
        Ok(())
    }

    /// Current role.
    pub fn role(&self) -> HaRole {
        self.role
    }

    /// The elected primary, if an election ran.
    pub fn primary(&self) -> Option<MemberId> {
        self.primary
    }

    /// This member's configuration.
    pub fn config(&self) -> &FgcpConfig {
        &self.cfg
    }

    /// Other members currently heard from.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Whether `member` is currently heard from (not lost).
    pub fn hears(&self, member: MemberId) -> bool {
        self.peers.contains_key(&member)
    }

    /// Members currently alive (this one first, then peers by id).
    pub fn members(&self, now_ms: u64) -> Vec<MemberStatus> {
        let mut out = vec![MemberStatus {
            member: self.cfg.me,
            serial: self.cfg.serial.clone(),
            priority: self.cfg.priority,
            age_ms: now_ms.saturating_sub(self.age_start_ms),
            monitor_failed: self.cfg.monitor_total.saturating_sub(self.monitor_up),
            primary: self.primary == Some(self.cfg.me),
            silent_ms: 0,
        }];
        for (id, p) in &self.peers {
            out.push(MemberStatus {
                member: *id,
                serial: p.hb.serial.clone(),
                priority: p.hb.priority,
                age_ms: peer_age(p, now_ms),
                monitor_failed: p.hb.monitor_total.saturating_sub(p.hb.monitor_up),
                primary: self.primary == Some(*id),
                silent_ms: now_ms.saturating_sub(p.seen_at_ms),
            });
        }
        out
    }

    /// A heartbeat authenticated as coming from `from` (the link header's sender; the
    /// body's `member` field is not trusted over it).
    pub fn handle_heartbeat(&mut self, from: MemberId, hb: &Heartbeat, now_ms: u64) {
        if from == self.cfg.me {
            return;
        }
        let mut hb = hb.clone();
        hb.member = from;
        let fresh = self
            .peers
            .insert(
                from,
                Peer {
                    hb,
                    rx_at_ms: now_ms,
                    seen_at_ms: now_ms,
                },
            )
            .is_none();
        if fresh {
            self.events.push_back(ElectionEvent::PeerJoined(from));
        }
        self.elect(now_ms);
    }

    /// Another message (sync records, a lease, a snapshot chunk) authenticated as coming
    /// from `from`: a member that sends is alive, even when its heartbeats were lost on the
    /// way. Only a member already heard (a heartbeat carries what the election needs)
    /// is refreshed; its role and age stay those of its last heartbeat.
    ///
    /// Without this, a lossy heartbeat link declared a member lost while its snapshot and
    /// leases were still arriving (a split brain in which both members forwarded, and the
    /// client dropped the lower one's packets as replays). FGSP peers were already alive
    /// on any message ([`crate::liveness`]).
    pub fn handle_alive(&mut self, from: MemberId, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.seen_at_ms = p.seen_at_ms.max(now_ms);
        }
    }

    /// The number of monitored interfaces that are up changed. A drop resets this member's
    /// HA age (FortiOS: "every time a monitored interface fails the HA age of the cluster
    /// unit is reset to 0").
    pub fn set_monitor_up(&mut self, up: u16, now_ms: u64) {
        let up = up.min(self.cfg.monitor_total);
        if up < self.monitor_up {
            self.age_start_ms = now_ms;
        }
        self.monitor_up = up;
        // Tell the peers at once rather than at the next beat.
        self.next_hb_ms = now_ms;
        self.elect(now_ms);
    }

    /// Advance time: declare silent peers lost, end the hello phase, re-elect.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let lost_after = self.cfg.lost_after_ms();
        let lost: Vec<MemberId> = self
            .peers
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.seen_at_ms) >= lost_after)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.peers.remove(&id);
            self.events.push_back(ElectionEvent::PeerLost(id));
        }
        self.elect(now_ms);
    }

    /// The heartbeat to send now, if one is due.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<Heartbeat> {
        if now_ms < self.next_hb_ms {
            return None;
        }
        self.next_hb_ms = now_ms.saturating_add(self.cfg.hb_interval_ms);
        Some(Heartbeat {
            member: self.cfg.me,
            serial: self.cfg.serial.clone(),
            priority: self.cfg.priority,
            override_: self.cfg.override_,
            uptime_ms: now_ms.saturating_sub(self.age_start_ms),
            monitor_up: self.monitor_up,
            monitor_total: self.cfg.monitor_total,
            role: self.role,
            primary: self.primary,
            fgsp_epoch: 0,
            fgsp_peers: Vec::new(),
        })
    }

    /// The next instant something is due: a heartbeat, a peer's loss, or the end of hello.
    pub fn poll_timeout(&self) -> u64 {
        let lost_after = self.cfg.lost_after_ms();
        let mut t = self.next_hb_ms;
        if self.role == HaRole::Hello {
            t = t.min(self.hello_until_ms);
        }
        for p in self.peers.values() {
            t = t.min(p.seen_at_ms.saturating_add(lost_after));
        }
        t
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<ElectionEvent> {
        self.events.pop_front()
    }

    fn elect(&mut self, now_ms: u64) {
        if self.role == HaRole::Hello && now_ms < self.hello_until_ms {
            return;
        }
        let me = Candidate {
            member: self.cfg.me,
            serial: &self.cfg.serial,
            priority: self.cfg.priority,
            age_ms: now_ms.saturating_sub(self.age_start_ms),
            monitor_failed: self.cfg.monitor_total.saturating_sub(self.monitor_up),
        };
        let override_ = self.cfg.override_ && self.peers.values().all(|p| p.hb.override_);
        let margin = self.cfg.uptime_margin_ms;
        // While a primary is running, a peer still in its hello phase is not a candidate yet:
        // electing it would leave the cluster without a primary until its hello ends. At a
        // cold start (no running primary) everyone counts, so members that start together
        // agree at once instead of each electing itself first.
        let primary_running = match self.primary {
            Some(p) if p == self.cfg.me => self.role == HaRole::Primary,
            Some(p) => self
                .peers
                .get(&p)
                .is_some_and(|peer| peer.hb.role != HaRole::Hello),
            None => false,
        };
        let mut all: Vec<Candidate<'_>> = self
            .peers
            .values()
            .filter(|p| !primary_running || p.hb.role != HaRole::Hello)
            .map(|p| Candidate {
                member: p.hb.member,
                serial: &p.hb.serial,
                priority: p.hb.priority,
                age_ms: peer_age(p, now_ms),
                monitor_failed: p.hb.monitor_total.saturating_sub(p.hb.monitor_up),
            })
            .collect();
        all.push(me);
        all.sort_by_key(|c| c.member);
        let mut best: Option<&Candidate<'_>> = None;
        for c in &all {
            best = match best {
                Some(b) if better(b, c, override_, margin) != Ordering::Less => Some(b),
                _ => Some(c),
            };
        }
        let Some(winner) = best.map(|b| b.member) else {
            return;
        };
        let role = if winner == self.cfg.me {
            HaRole::Primary
        } else {
            HaRole::Secondary
        };
        let changed = role != self.role || Some(winner) != self.primary;
        self.role = role;
        self.primary = Some(winner);
        if changed {
            self.events.push_back(match role {
                HaRole::Primary => ElectionEvent::BecamePrimary,
                _ => ElectionEvent::BecameSecondary { primary: winner },
            });
            // Announce the new role at once.
            self.next_hb_ms = now_ms;
        }
    }
}

fn peer_age(p: &Peer, now_ms: u64) -> u64 {
    p.hb.uptime_ms
        .saturating_add(now_ms.saturating_sub(p.rx_at_ms))
}

/// `Greater` when `a` should be primary rather than `b`.
fn better(a: &Candidate<'_>, b: &Candidate<'_>, override_: bool, margin: u64) -> Ordering {
    let monitors = b.monitor_failed.cmp(&a.monitor_failed);
    let age = if a.age_ms.abs_diff(b.age_ms) > margin {
        a.age_ms.cmp(&b.age_ms)
    } else {
        Ordering::Equal
    };
    let prio = a.priority.cmp(&b.priority);
    let (second, third) = if override_ { (prio, age) } else { (age, prio) };
    monitors
        .then(second)
        .then(third)
        .then_with(|| a.serial.cmp(b.serial))
        .then(a.member.cmp(&b.member))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In-memory cluster: members exchange heartbeats through a lossless bus whose links can
    /// be cut; time jumps to the next deadline.
    struct Sim {
        now: u64,
        nodes: Vec<Option<Fgcp>>,
        /// cut[i][j]: heartbeats from i do not reach j.
        cut: Vec<Vec<bool>>,
        log: Vec<(usize, ElectionEvent)>,
    }

    impl Sim {
        fn new(cfgs: Vec<FgcpConfig>) -> Sim {
            let n = cfgs.len();
            Sim {
                now: 0,
                nodes: cfgs
                    .into_iter()
                    .map(|c| Some(Fgcp::new(c, 0).unwrap()))
                    .collect(),
                cut: vec![vec![false; n]; n],
                log: Vec::new(),
            }
        }

        fn step(&mut self) {
            let n = self.nodes.len();
            for i in 0..n {
                let Some(node) = self.nodes[i].as_mut() else {
                    continue;
                };
                node.handle_timeout(self.now);
                let mut out = Vec::new();
                while let Some(hb) = node.poll_transmit(self.now) {
                    out.push(hb);
                }
                let from = node.config().me;
                for hb in out {
                    for j in 0..n {
                        if j != i && !self.cut[i][j] {
                            if let Some(peer) = self.nodes[j].as_mut() {
                                peer.handle_heartbeat(from, &hb, self.now);
                            }
                        }
                    }
                }
            }
            for i in 0..n {
                if let Some(node) = self.nodes[i].as_mut() {
                    while let Some(e) = node.poll_event() {
                        self.log.push((i, e));
                    }
                }
            }
        }

        /// Run until `until`, jumping from deadline to deadline.
        fn run_until(&mut self, until: u64) {
            while self.now <= until {
                self.step();
                let next = self
                    .nodes
                    .iter()
                    .flatten()
                    .map(|n| n.poll_timeout())
                    .min()
                    .unwrap_or(u64::MAX);
                self.now = next.max(self.now + 1);
            }
        }

        fn roles(&self) -> Vec<Option<HaRole>> {
            self.nodes
                .iter()
                .map(|n| n.as_ref().map(|n| n.role()))
                .collect()
        }

        fn primaries(&self) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&i| self.roles()[i] == Some(HaRole::Primary))
                .collect()
        }

        fn node(&mut self, i: usize) -> &mut Fgcp {
            self.nodes[i].as_mut().unwrap()
        }

        fn kill(&mut self, i: usize) {
            self.nodes[i] = None;
        }

        fn start(&mut self, i: usize, cfg: FgcpConfig) {
            self.nodes[i] = Some(Fgcp::new(cfg, self.now).unwrap());
        }

        fn events_of(&self, i: usize) -> Vec<ElectionEvent> {
            self.log
                .iter()
                .filter(|(n, _)| *n == i)
                .map(|(_, e)| e.clone())
                .collect()
        }
    }

    fn cfg(id: u32, prio: u8) -> FgcpConfig {
        FgcpConfig::new(MemberId(id), format!("FGVM02TM2200000{id}"), prio)
    }

    const LOST: u64 = DEFAULT_HB_INTERVAL_MS * DEFAULT_HB_LOST_THRESHOLD as u64;

    #[test]
    fn two_members_same_age_priority_decides_then_primary_lost() {
        let mut s = Sim::new(vec![cfg(1, 200), cfg(2, 100)]);
        s.run_until(LOST - 1);
        assert_eq!(s.roles(), vec![Some(HaRole::Hello), Some(HaRole::Hello)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![0]);
        assert_eq!(s.node(1).primary(), Some(MemberId(1)));
        assert!(s.events_of(0).contains(&ElectionEvent::BecamePrimary));
        assert!(s.events_of(1).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(1)
        }));
        for i in 0..2 {
            let becomes: Vec<_> = s
                .events_of(i)
                .into_iter()
                .filter(|e| !matches!(e, ElectionEvent::PeerJoined(_)))
                .collect();
            assert_eq!(
                becomes.len(),
                1,
                "member {i}: one role at a cold start: {becomes:?}"
            );
        }
        // Primary dies: after hb_lost_threshold missed beats the other takes over.
        let t_kill = s.now;
        s.kill(0);
        s.log.clear();
        s.run_until(t_kill + LOST - DEFAULT_HB_INTERVAL_MS - 1);
        assert_eq!(
            s.roles()[1],
            Some(HaRole::Secondary),
            "not before the threshold"
        );
        s.run_until(t_kill + LOST + DEFAULT_HB_INTERVAL_MS);
        assert_eq!(s.roles()[1], Some(HaRole::Primary));
        assert_eq!(
            s.events_of(1),
            vec![
                ElectionEvent::PeerLost(MemberId(1)),
                ElectionEvent::BecamePrimary
            ]
        );
    }

    /// A member whose heartbeats are lost while its other messages arrive (a lossy link
    /// during a snapshot or a burst of leases) is not declared lost; its age goes on from
    /// its last heartbeat; once nothing at all comes, it is lost after the loss time.
    #[test]
    fn any_message_from_a_member_keeps_it_alive() {
        let mut s = Sim::new(vec![cfg(1, 200), cfg(2, 100)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![0]);
        let age = |s: &mut Sim| {
            let now = s.now;
            s.node(1).members(now)[1].age_ms
        };
        let before = (s.now, age(&mut s));
        s.cut[0][1] = true;
        s.log.clear();
        let until = s.now + 3 * LOST;
        let mut last = s.now;
        while s.now < until {
            last = s.now;
            s.node(1).handle_alive(MemberId(1), last);
            s.run_until(last + DEFAULT_HB_INTERVAL_MS);
        }
        assert_eq!(s.roles()[1], Some(HaRole::Secondary));
        assert!(s.events_of(1).is_empty(), "{:?}", s.events_of(1));
        assert_eq!(age(&mut s), before.1 + (s.now - before.0));
        let now = s.now;
        assert!(s.node(1).members(now)[1].silent_ms < LOST);
        // A member never heard is not made up from a stray message.
        s.node(1).handle_alive(MemberId(9), now);
        assert_eq!(s.node(1).peer_count(), 1);
        // Silent on every message: lost after the loss time.
        s.run_until(last + LOST - 1);
        assert_eq!(
            s.roles()[1],
            Some(HaRole::Secondary),
            "not before the loss time"
        );
        s.run_until(last + LOST + 1);
        assert_eq!(s.roles()[1], Some(HaRole::Primary));
        assert_eq!(
            s.events_of(1),
            vec![
                ElectionEvent::PeerLost(MemberId(1)),
                ElectionEvent::BecamePrimary
            ]
        );
    }

    #[test]
    fn override_disabled_rejoining_high_priority_stays_secondary() {
        let mut s = Sim::new(vec![cfg(1, 200), cfg(2, 100)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![0]);
        s.kill(0);
        s.run_until(s.now + 2 * LOST);
        assert_eq!(s.primaries(), vec![1]);
        // Let member 2 age beyond the margin, then bring member 1 (priority 200) back.
        s.run_until(s.now + DEFAULT_UPTIME_MARGIN_MS + 1000);
        s.start(0, cfg(1, 200));
        s.log.clear();
        s.run_until(s.now + 3 * LOST);
        assert_eq!(s.primaries(), vec![1], "greater age wins over priority");
        assert_eq!(
            s.events_of(0),
            vec![
                ElectionEvent::PeerJoined(MemberId(2)),
                ElectionEvent::BecameSecondary {
                    primary: MemberId(2)
                }
            ]
        );
        assert!(!s.events_of(1).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(1)
        }));
    }

    #[test]
    fn override_enabled_high_priority_takes_back() {
        let mk = |id, p| FgcpConfig {
            override_: true,
            ..cfg(id, p)
        };
        let mut s = Sim::new(vec![mk(1, 200), mk(2, 100)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![0]);
        s.kill(0);
        s.run_until(s.now + 2 * LOST);
        s.run_until(s.now + DEFAULT_UPTIME_MARGIN_MS + 1000);
        assert_eq!(s.primaries(), vec![1]);
        s.start(0, mk(1, 200));
        s.log.clear();
        s.run_until(s.now + 3 * LOST);
        assert_eq!(s.primaries(), vec![0], "priority before age");
        assert!(s.events_of(1).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(1)
        }));
    }

    #[test]
    fn override_must_be_on_everywhere() {
        let mut s = Sim::new(vec![
            FgcpConfig {
                override_: true,
                ..cfg(1, 200)
            },
            cfg(2, 100),
        ]);
        s.run_until(LOST + 10);
        s.kill(0);
        s.run_until(s.now + 2 * LOST + DEFAULT_UPTIME_MARGIN_MS + 1000);
        s.start(
            0,
            FgcpConfig {
                override_: true,
                ..cfg(1, 200)
            },
        );
        s.run_until(s.now + 3 * LOST);
        assert_eq!(s.primaries(), vec![1], "mixed override counts as disabled");
    }

    #[test]
    fn three_members_serial_breaks_ties_and_failover_picks_next() {
        let mut s = Sim::new(vec![cfg(1, 128), cfg(2, 128), cfg(3, 128)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![2], "highest serial");
        for i in 0..3 {
            assert_eq!(s.node(i).primary(), Some(MemberId(3)));
        }
        s.kill(2);
        s.run_until(s.now + 2 * LOST);
        assert_eq!(s.primaries(), vec![1]);
        assert_eq!(s.node(0).primary(), Some(MemberId(2)));
        assert!(s.events_of(0).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(2)
        }));
    }

    #[test]
    fn monitored_link_failure_fails_over_and_flapping_does_not_flip_back() {
        let mk = |id, p| FgcpConfig {
            monitor_total: 2,
            ..cfg(id, p)
        };
        let mut s = Sim::new(vec![mk(1, 200), mk(2, 100)]);
        // Run the cluster past the age margin.
        s.run_until(DEFAULT_UPTIME_MARGIN_MS + 10_000);
        assert_eq!(s.primaries(), vec![0]);
        // Primary's port flaps ten times.
        for k in 0..10 {
            let now = s.now;
            s.node(0).set_monitor_up(1, now);
            s.run_until(now + 500);
            assert_eq!(s.primaries(), vec![1], "flap {k}: down");
            let now = s.now;
            s.node(0).set_monitor_up(2, now);
            s.run_until(now + 500);
            assert_eq!(
                s.primaries(),
                vec![1],
                "flap {k}: restored, age reset keeps the new primary"
            );
        }
        let flips = s
            .log
            .iter()
            .filter(|(i, e)| *i == 1 && *e == ElectionEvent::BecamePrimary)
            .count();
        assert_eq!(flips, 1, "one failover, no ping-pong");
        // The new primary's own link failure with the old one healthy moves it back.
        let now = s.now;
        s.node(1).set_monitor_up(0, now);
        s.run_until(now + 500);
        assert_eq!(s.primaries(), vec![0]);
    }

    #[test]
    fn split_brain_heals_to_one_primary() {
        let mut s = Sim::new(vec![cfg(1, 100), cfg(2, 200), cfg(3, 150)]);
        s.run_until(DEFAULT_UPTIME_MARGIN_MS + 10_000);
        assert_eq!(s.primaries(), vec![1]);
        // Partition {0} | {1, 2}.
        for j in 1..3 {
            s.cut[0][j] = true;
            s.cut[j][0] = true;
        }
        s.run_until(s.now + 2 * LOST);
        assert_eq!(
            s.primaries(),
            vec![0, 1],
            "each side elects its own primary"
        );
        // Heal.
        s.cut = vec![vec![false; 3]; 3];
        s.log.clear();
        s.run_until(s.now + 2 * LOST);
        assert_eq!(s.primaries(), vec![1]);
        for i in 0..3 {
            assert_eq!(s.node(i).primary(), Some(MemberId(2)), "member {i} agrees");
        }
        assert!(s
            .events_of(0)
            .contains(&ElectionEvent::PeerJoined(MemberId(2))));
        assert!(s.events_of(0).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(2)
        }));
        assert!(!s.events_of(1).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(1)
        }));
    }

    #[test]
    fn lone_member_becomes_primary_after_hello_and_heartbeats_are_periodic() {
        let mut f = Fgcp::new(cfg(1, 128), 1000).unwrap();
        assert!(f.poll_transmit(1000).is_some());
        assert!(f.poll_transmit(1000).is_none());
        assert_eq!(f.poll_timeout(), 1000 + DEFAULT_HB_INTERVAL_MS);
        f.handle_timeout(1000 + LOST - 1);
        assert_eq!(f.role(), HaRole::Hello);
        f.handle_timeout(1000 + LOST);
        assert_eq!(f.role(), HaRole::Primary);
        assert_eq!(f.poll_event(), Some(ElectionEvent::BecamePrimary));
        let hb = f.poll_transmit(1000 + LOST).unwrap();
        assert_eq!(hb.role, HaRole::Primary);
        assert_eq!(hb.uptime_ms, LOST);
        assert!(Fgcp::new(
            FgcpConfig {
                hb_interval_ms: 0,
                ..cfg(1, 1)
            },
            0
        )
        .is_err());
    }

    #[test]
    fn hostile_link_cannot_revive_a_dead_primary_or_forge_one() {
        use crate::link::{ClusterKind, HaLink, LinkKey};
        use crate::msg::Message;
        let key = LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"pw"), 10).unwrap();
        let mut l1 = HaLink::new(key.clone(), MemberId(1), 1).unwrap();
        let mut l2 = HaLink::new(key, MemberId(2), 1).unwrap();
        let mut e1 = Fgcp::new(cfg(1, 200), 0).unwrap();
        let mut e2 = Fgcp::new(cfg(2, 100), 0).unwrap();
        let mut captured = Vec::new();
        let mut now = 0;
        while now <= 2 * LOST {
            e1.handle_timeout(now);
            e2.handle_timeout(now);
            if let Some(hb) = e1.poll_transmit(now) {
                let d = l1.seal(&Message::Heartbeat(hb)).unwrap();
                let r = l2.open(&d).unwrap();
                let Message::Heartbeat(hb) = r.message else {
                    panic!()
                };
                e2.handle_heartbeat(r.sender, &hb, now);
                captured.push(d);
            }
            while e2.poll_transmit(now).is_some() {}
            now += DEFAULT_HB_INTERVAL_MS;
        }
        assert_eq!(e2.role(), HaRole::Secondary);
        // Member 1 dies; 2 takes over.
        now += LOST;
        e2.handle_timeout(now);
        assert_eq!(e2.role(), HaRole::Primary);
        // An attacker replays every captured heartbeat, then forges one with its own key.
        for d in &captured {
            assert_eq!(l2.open(d).err(), Some(crate::DropReason::Replayed));
        }
        let evil = LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"guess"), 10).unwrap();
        let mut le = HaLink::new(evil, MemberId(1), 99).unwrap();
        let mut hb = e1.poll_transmit(now).unwrap();
        hb.priority = 255;
        let forged = le.seal(&Message::Heartbeat(hb)).unwrap();
        assert_eq!(l2.open(&forged).err(), Some(crate::DropReason::AuthFailed));
        e2.handle_timeout(now + 1);
        assert_eq!(e2.role(), HaRole::Primary, "nothing reached the election");
        assert_eq!(e2.members(now).len(), 1);
        assert_eq!(l2.stats().drops_total(), captured.len() as u64 + 1);
    }

    #[test]
    fn cold_start_elects_once_whoever_ends_hello_first() {
        // Member 1 ends its hello first (stepped first) but member 2 wins on priority.
        let mut s = Sim::new(vec![cfg(1, 100), cfg(2, 200)]);
        s.run_until(LOST + 10 * DEFAULT_HB_INTERVAL_MS);
        assert_eq!(s.primaries(), vec![1]);
        assert_eq!(
            s.events_of(0),
            vec![
                ElectionEvent::PeerJoined(MemberId(2)),
                ElectionEvent::BecameSecondary {
                    primary: MemberId(2)
                }
            ]
        );
        assert_eq!(
            s.events_of(1),
            vec![
                ElectionEvent::PeerJoined(MemberId(1)),
                ElectionEvent::BecamePrimary
            ]
        );
    }

    #[test]
    fn a_member_in_hello_does_not_unseat_the_primary_early() {
        // Young cluster (ages inside the margin): the newcomer's priority will win, but only
        // once its hello phase is over.
        let mut s = Sim::new(vec![cfg(1, 100), cfg(2, 100)]);
        s.run_until(LOST + 10);
        assert_eq!(s.primaries(), vec![1]);
        s.kill(0);
        s.run_until(s.now + 2 * LOST);
        let t = s.now;
        s.start(0, cfg(1, 250));
        s.log.clear();
        s.run_until(t + LOST - 2 * DEFAULT_HB_INTERVAL_MS);
        assert_eq!(s.roles()[0], Some(HaRole::Hello));
        assert_eq!(
            s.primaries(),
            vec![1],
            "still primary while the newcomer says hello"
        );
        assert!(!s
            .events_of(1)
            .iter()
            .any(|e| matches!(e, ElectionEvent::BecameSecondary { .. })));
        s.run_until(t + 2 * LOST);
        assert_eq!(s.primaries(), vec![0]);
        assert!(s.events_of(1).contains(&ElectionEvent::BecameSecondary {
            primary: MemberId(1)
        }));
    }

    #[test]
    fn reload_with_override_and_higher_priority_takes_over() {
        let mut s = Sim::new(vec![cfg(1, 100), cfg(2, 150)]);
        s.run_until(DEFAULT_UPTIME_MARGIN_MS + 5_000);
        assert_eq!(s.primaries(), vec![1]);
        // Kill and restart member 2 so member 1 is far older; then raise member 2's priority.
        s.kill(1);
        s.run_until(s.now + 2 * LOST);
        s.start(1, cfg(2, 150));
        s.run_until(s.now + 3 * LOST);
        assert_eq!(s.primaries(), vec![0], "age wins while override is off");
        let now = s.now;
        for (i, p) in [(0usize, 100u8), (1, 250)] {
            let c = FgcpConfig {
                override_: true,
                ..cfg(i as u32 + 1, p)
            };
            s.node(i).reconfigure(c, now).unwrap();
        }
        s.run_until(now + 3 * LOST);
        assert_eq!(
            s.primaries(),
            vec![1],
            "override on everywhere: priority first"
        );
        let bad = cfg(9, 1);
        assert!(s.node(0).reconfigure(bad, now).is_err());
    }

    #[test]
    fn body_member_field_is_not_trusted() {
        let mut f = Fgcp::new(cfg(1, 128), 0).unwrap();
        let mut other = Fgcp::new(cfg(2, 128), 0).unwrap();
        let mut hb = other.poll_transmit(0).unwrap();
        hb.member = MemberId(1);
        f.handle_heartbeat(MemberId(2), &hb, 0);
        assert_eq!(f.poll_event(), Some(ElectionEvent::PeerJoined(MemberId(2))));
        assert_eq!(f.members(0).len(), 2);
        f.handle_heartbeat(MemberId(1), &hb, 0);
        assert_eq!(f.members(0).len(), 2, "own id from the wire is ignored");
    }
}
