//! Engine tests with a simulated clock and a simulated ikemgr/peer.

use super::*;
use crate::settings::Schedule;
use std::collections::HashMap;

/// An epoch-milliseconds start, so the wheel runs on realistic values.
const T0: u64 = 1_700_000_000_000;
const S: u64 = 1000;

fn ns(ms: u64) -> u64 {
    ms * 1_000_000
}

/// A driver: ikemgr assigns message IDs, live peers answer after `rtt`.
struct Sim {
    dpd: Dpd<String>,
    now: u64,
    log: Vec<(u64, Event<String>)>,
    alive: HashMap<String, bool>,
    rtt: u64,
    next_msg_id: u32,
    replies: Vec<(u64, String, u32)>,
}

impl Sim {
    fn new() -> Self {
        Sim {
            dpd: Dpd::new(T0),
            now: T0,
            log: Vec::new(),
            alive: HashMap::new(),
            rtt: 30,
            next_msg_id: 100,
            replies: Vec::new(),
        }
    }

    fn add(&mut self, name: &str, settings: Settings, alive: bool) {
        self.dpd
            .handle_tunnel_upsert(self.now, name.to_string(), settings)
            .unwrap();
        self.alive.insert(name.to_string(), alive);
    }

    fn drain(&mut self) {
        while let Some(ev) = self.dpd.poll_event() {
            if let Event::SendProbe { tunnel, seqno, .. } = &ev {
                let id = match seqno {
                    Some(id) => *id,
                    None => {
                        self.next_msg_id += 1;
                        self.dpd
                            .handle_probe_sent(self.now, tunnel, self.next_msg_id);
                        self.next_msg_id
                    }
                };
                if self.alive.get(tunnel).copied().unwrap_or(false) {
                    self.replies.push((self.now + self.rtt, tunnel.clone(), id));
                }
            }
            self.log.push((self.now, ev));
        }
    }

    /// Runs the event loop until `t`, jumping from timer to timer.
    fn run_until(&mut self, t: u64) {
        loop {
            let next_reply = self.replies.iter().map(|r| r.0).min();
            let next = match (self.dpd.poll_timeout(), next_reply) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(u64::MAX),
            };
            if next > t {
                break;
            }
            assert!(next >= self.now, "time went backwards");
            self.now = next;
            let due: Vec<_> = self
                .replies
                .iter()
                .filter(|r| r.0 <= self.now)
                .cloned()
                .collect();
            self.replies.retain(|r| r.0 > self.now);
            for (_, name, id) in due {
                self.dpd.handle_probe_reply(self.now, &name, id);
            }
            self.dpd.handle_timeout(self.now);
            self.drain();
        }
        self.now = t;
        self.dpd.handle_timeout(t);
        self.drain();
    }

    fn activity(&mut self, name: &str, rx_ms: u64, tx_ms: u64) {
        let k = name.to_string();
        self.dpd.handle_datapath_activity(
            self.now,
            [Activity {
                tunnel: &k,
                last_rx_ns: ns(rx_ms),
                last_tx_ns: ns(tx_ms),
            }],
        );
    }

    /// (time since T0 in s, attempt, seqno) of every probe for `name`.
    fn probes(&self, name: &str) -> Vec<(u64, u32, Option<u32>)> {
        self.log
            .iter()
            .filter_map(|(t, e)| match e {
                Event::SendProbe {
                    tunnel,
                    seqno,
                    attempt,
                } if tunnel == name => Some(((t - T0) / S, *attempt, *seqno)),
                _ => None,
            })
            .collect()
    }

    /// (time of the verdict, detected_after_ms, probes_sent).
    fn deaths(&self, name: &str) -> Vec<(u64, u64, u32)> {
        self.log
            .iter()
            .filter_map(|(t, e)| match e {
                Event::PeerDead {
                    tunnel,
                    detected_after_ms,
                    probes_sent,
                    ..
                } if tunnel == name => Some((*t, *detected_after_ms, *probes_sent)),
                _ => None,
            })
            .collect()
    }
}

fn seed000() -> Settings {
    Settings::fortios(Mode::OnIdle, 3, 60 * S)
}

fn pan_os(mode: Mode) -> Settings {
    Settings {
        mode,
        schedule: Schedule::PAN_OS,
        role: Role::Owner,
    }
}

/// Seed 000: on-idle, 60 s, 3 retries; the peer disappears right after the
/// tunnel came up: "link is idle", three probes 60 s apart with one seqno,
/// then "retry timeout" 60 s after the third.
#[test]
fn fixed_on_idle_matches_seed_000() {
    let mut sim = Sim::new();
    sim.add("vpn1_2", seed000(), false);
    sim.run_until(T0 + 1000 * S);
    let p = sim.probes("vpn1_2");
    assert_eq!(
        p,
        vec![(60, 1, None), (120, 2, Some(101)), (180, 3, Some(101))]
    );
    assert_eq!(sim.deaths("vpn1_2"), vec![(T0 + 240 * S, 240 * S, 3)]);
    assert_eq!(dead_after_ms(&seed000()), Some(240 * S));
    let v = sim.dpd.view(&"vpn1_2".to_string()).unwrap();
    assert_eq!(
        v.phase,
        Phase::Dead {
            at_ms: T0 + 240 * S
        }
    );
    assert_eq!(
        v.to_string(),
        "mode=on-idle on=1 idle=60000ms retry=3 count=3 seqno=101"
    );
    // A verdict is final: no timer left, nothing more happens.
    assert_eq!(sim.dpd.poll_timeout(), None);
    assert_eq!(sim.dpd.stats().peers_dead, 1);
}

/// Seed 004: PAN-OS liveness check after 5 s idle, then retransmissions
/// 1, 2, 4 … 64 s apart; the SA is aborted 64 s after the 10th transmission.
#[test]
fn exponential_matches_seed_004() {
    let mut sim = Sim::new();
    sim.add("gw", pan_os(Mode::OnIdle), false);
    sim.run_until(T0 + 1000 * S);
    let times: Vec<u64> = sim.probes("gw").iter().map(|p| p.0).collect();
    assert_eq!(times, vec![5, 6, 8, 12, 20, 36, 68, 132, 196, 260]);
    let attempts: Vec<u32> = sim.probes("gw").iter().map(|p| p.1).collect();
    assert_eq!(attempts, (1..=10).collect::<Vec<_>>());
    assert!(sim.probes("gw")[1..].iter().all(|p| p.2 == Some(101)));
    assert_eq!(sim.deaths("gw"), vec![(T0 + 324 * S, 324 * S, 10)]);
}

#[test]
fn healthy_peer_answers_and_the_round_ends() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), true);
    sim.run_until(T0 + 601 * S);
    // One probe per idle interval (each reply is the last proof of life).
    let p = sim.probes("a");
    assert_eq!(p.len(), 10, "{p:?}");
    assert!(p.iter().all(|x| x.1 == 1), "never a retransmission");
    assert!(sim.deaths("a").is_empty());
    let v = sim.dpd.view(&"a".to_string()).unwrap();
    assert_eq!(v.count, 0);
    assert_eq!(v.phase, Phase::Watching);
    assert_eq!(sim.dpd.stats().stale_replies, 0);
    assert_eq!(sim.dpd.stats().rounds_answered, 10);
}

#[test]
fn on_idle_with_traffic_never_probes() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    for i in 1..=60u64 {
        sim.run_until(T0 + i * 10 * S);
        sim.activity("a", T0 + i * 10 * S - 5, T0 + i * 10 * S - 3);
    }
    assert!(sim.probes("a").is_empty());
    assert!(sim.deaths("a").is_empty());
    // IKE messages are proof of life too.
    let mut sim = Sim::new();
    sim.add("b", seed000(), false);
    for i in 1..=20u64 {
        sim.run_until(T0 + i * 59 * S);
        sim.dpd.handle_ike_activity(sim.now, &"b".to_string());
    }
    assert!(sim.probes("b").is_empty());
}

#[test]
fn traffic_between_retries_resets_the_round() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 150 * S);
    assert_eq!(sim.probes("a").len(), 2);
    assert_eq!(sim.dpd.view(&"a".to_string()).unwrap().count, 2);
    // Inbound ESP at 149 s, reported in the batch at 150 s.
    sim.activity("a", T0 + 149 * S, 0);
    let v = sim.dpd.view(&"a".to_string()).unwrap();
    assert_eq!((v.count, v.phase), (0, Phase::Watching));
    sim.run_until(T0 + 1000 * S);
    let p = sim.probes("a");
    assert_eq!(
        &p[2..],
        &[(209, 1, None), (269, 2, Some(102)), (329, 3, Some(102))]
    );
    assert_eq!(sim.deaths("a"), vec![(T0 + 389 * S, 240 * S, 3)]);
}

#[test]
fn stale_reply_is_still_proof_of_life() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 130 * S);
    sim.dpd.handle_probe_reply(sim.now, &"a".to_string(), 7);
    assert_eq!(sim.dpd.stats().stale_replies, 1);
    assert_eq!(sim.dpd.view(&"a".to_string()).unwrap().count, 0);
    sim.run_until(T0 + 1000 * S);
    assert_eq!(sim.deaths("a"), vec![(T0 + 370 * S, 240 * S, 3)]);
}

#[test]
fn on_demand_probes_only_for_unanswered_traffic() {
    let mut sim = Sim::new();
    let s = Settings::fortios(Mode::OnDemand, 3, 20 * S);
    sim.add("a", s, false);
    // Silent in both directions: nothing to ask about.
    sim.run_until(T0 + 500 * S);
    assert!(sim.probes("a").is_empty());
    // Two-way traffic: no probe either.
    for i in 0..30u64 {
        let t = T0 + 500 * S + i * 5 * S;
        sim.run_until(t);
        sim.activity("a", t - 10, t - 20);
    }
    assert!(sim.probes("a").is_empty());
    // We send at 700 s (reported at 700.2 s) and nothing comes back.
    sim.run_until(T0 + 700 * S + 200);
    sim.activity("a", 0, T0 + 700 * S);
    for i in 1..10u64 {
        // More outbound traffic does not move the start of silence.
        sim.run_until(T0 + 700 * S + i * S);
        sim.activity("a", 0, T0 + 700 * S + i * S);
    }
    sim.run_until(T0 + 2000 * S);
    let p = sim.probes("a");
    assert_eq!(
        p,
        vec![(720, 1, None), (740, 2, Some(101)), (760, 3, Some(101))]
    );
    assert_eq!(sim.deaths("a"), vec![(T0 + 780 * S, 80 * S, 3)]);
}

#[test]
fn on_demand_answered_traffic_then_silence() {
    let mut sim = Sim::new();
    let s = Settings::fortios(Mode::OnDemand, 2, 10 * S);
    sim.add("a", s, true);
    sim.run_until(T0 + 100 * S);
    sim.activity("a", 0, T0 + 100 * S);
    // The peer answers the probe at 110 s: the round ends, no verdict.
    sim.run_until(T0 + 200 * S);
    assert_eq!(sim.probes("a"), vec![(110, 1, None)]);
    assert!(sim.deaths("a").is_empty());
    // The reply answered the outstanding traffic: no further probes.
    sim.run_until(T0 + 400 * S);
    assert_eq!(sim.probes("a").len(), 1);
}

#[test]
fn periodic_probes_whatever_the_traffic() {
    let mut sim = Sim::new();
    let s = Settings::fortios(Mode::Periodic, 3, 10 * S);
    sim.add("a", s, true);
    for i in 1..=100u64 {
        sim.run_until(T0 + i * S);
        sim.activity("a", T0 + i * S, T0 + i * S);
    }
    let p = sim.probes("a");
    let times: Vec<u64> = p.iter().map(|x| x.0).collect();
    assert_eq!(times, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    // The peer dies at 100 s: verdict after the next round's three waits,
    // within the budget of interval + round = 40 s from the last life.
    sim.alive.insert("a".into(), false);
    sim.run_until(T0 + 1000 * S);
    let d = sim.deaths("a");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, T0 + 140 * S);
    assert!(d[0].1 <= dead_after_ms(&s).unwrap(), "{d:?}");
}

#[test]
fn disable_never_probes() {
    let mut sim = Sim::new();
    sim.add("a", Settings::fortios(Mode::Disable, 3, 5 * S), false);
    sim.run_until(T0 + 10_000 * S);
    assert!(sim.log.is_empty());
    assert_eq!(sim.dpd.poll_timeout(), None);
    let v = sim.dpd.view(&"a".to_string()).unwrap();
    assert_eq!(
        v.to_string(),
        "mode=disable on=0 idle=5000ms retry=3 count=0 seqno=0"
    );
    assert_eq!(v.dead_after_ms, None);
}

#[test]
fn standby_never_probes_and_promotion_starts_probing() {
    let mut sim = Sim::new();
    let mut s = seed000();
    s.role = Role::Standby;
    sim.add("vpn1_1", s, false);
    sim.run_until(T0 + 3600 * S);
    assert!(sim.log.is_empty());
    let v = sim.dpd.view(&"vpn1_1".to_string()).unwrap();
    // Seed 000, DC1_VM2: a standby copy shows on=1 count=0 seqno=0.
    assert_eq!(
        v.to_string(),
        "mode=on-idle on=1 idle=60000ms retry=3 count=0 seqno=0"
    );
    // Takeover: the new owner counts silence from the promotion.
    sim.dpd
        .handle_role(sim.now, &"vpn1_1".to_string(), Role::Owner);
    sim.run_until(T0 + 5000 * S);
    assert_eq!(
        sim.probes("vpn1_1").iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![3660, 3720, 3780]
    );
    assert_eq!(sim.deaths("vpn1_1"), vec![(T0 + 3840 * S, 240 * S, 3)]);
}

#[test]
fn demotion_during_probing_stops_it() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 130 * S);
    assert_eq!(sim.probes("a").len(), 2);
    sim.dpd
        .handle_role(sim.now, &"a".to_string(), Role::Standby);
    sim.run_until(T0 + 10_000 * S);
    assert_eq!(sim.probes("a").len(), 2);
    assert!(sim.deaths("a").is_empty());
    assert_eq!(
        sim.dpd.view(&"a".to_string()).unwrap().phase,
        Phase::Inactive
    );
}

#[test]
fn removal_during_probing() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.add("b", seed000(), false);
    sim.run_until(T0 + 130 * S);
    while sim.dpd.poll_view_change().is_some() {}
    sim.dpd.handle_tunnel_removed(sim.now, &"a".to_string());
    assert_eq!(
        sim.dpd.poll_view_change(),
        Some(ViewChange::Removed("a".to_string()))
    );
    assert_eq!(sim.dpd.poll_view_change(), None);
    sim.run_until(T0 + 10_000 * S);
    assert!(sim.deaths("a").is_empty());
    assert_eq!(sim.probes("a").len(), 2);
    assert_eq!(sim.deaths("b").len(), 1);
    assert!(sim.dpd.view(&"a".to_string()).is_none());
    // Inputs for the removed tunnel are counted and ignored.
    sim.dpd.handle_probe_reply(sim.now, &"a".to_string(), 101);
    assert_eq!(sim.dpd.stats().unknown_tunnel_inputs, 1);
    // A new record under the same name starts afresh.
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 20_000 * S);
    assert_eq!(sim.deaths("a"), vec![(T0 + 10_240 * S, 240 * S, 3)]);
}

#[test]
fn probe_failures_do_not_move_the_verdict() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 61 * S);
    for _ in 0..5 {
        sim.dpd.handle_probe_failed(sim.now, &"a".to_string());
    }
    sim.run_until(T0 + 1000 * S);
    assert_eq!(sim.deaths("a"), vec![(T0 + 240 * S, 240 * S, 3)]);
    assert_eq!(sim.dpd.stats().probe_failures, 5);
}

#[test]
fn settings_updates() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 50 * S);
    // Republishing the same settings changes nothing.
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 130 * S);
    assert_eq!(sim.probes("a").len(), 2);
    // A new interval abandons the round; silence still counts from T0.
    sim.add("a", Settings::fortios(Mode::OnIdle, 2, 10 * S), false);
    assert_eq!(sim.dpd.view(&"a".to_string()).unwrap().count, 0);
    sim.run_until(T0 + 1000 * S);
    assert_eq!(
        sim.probes("a").iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![60, 120, 130, 140]
    );
    assert_eq!(sim.deaths("a"), vec![(T0 + 150 * S, 150 * S, 2)]);
    // Invalid settings are refused and change nothing.
    let bad = Settings::fortios(Mode::OnIdle, 2, 0);
    assert!(sim
        .dpd
        .handle_tunnel_upsert(sim.now, "z".into(), bad)
        .is_err());
    assert!(sim.dpd.view(&"z".to_string()).is_none());
}

#[test]
fn view_changes_are_coalesced() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.add("b", seed000(), false);
    let mut n = 0;
    while let Some(c) = sim.dpd.poll_view_change() {
        assert!(matches!(c, ViewChange::Updated(_, v) if v.phase == Phase::Watching));
        n += 1;
    }
    assert_eq!(n, 2);
    // Probe 1 + msg id for both tunnels: one change each.
    sim.run_until(T0 + 60 * S);
    let mut got = Vec::new();
    while let Some(ViewChange::Updated(k, v)) = sim.dpd.poll_view_change() {
        got.push((k, v.count, v.seqno));
    }
    got.sort();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0.as_str(), got[1].0.as_str()), ("a", "b"));
    assert!(got.iter().all(|g| g.1 == 1));
    let mut ids: Vec<u32> = got.iter().map(|g| g.2).collect();
    ids.sort();
    assert_eq!(ids, vec![101, 102]);
    // Outbound traffic is not a view change.
    sim.activity("a", 0, T0 + 60 * S);
    sim.run_until(T0 + 61 * S);
    assert_eq!(sim.dpd.poll_view_change(), None);
}

#[test]
fn activity_timestamps_are_clamped_and_unknown_tunnels_counted() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    // A timestamp from the future counts as now, not later.
    sim.activity("a", T0 + 1_000_000 * S, 0);
    sim.activity("nobody", T0, T0);
    assert_eq!(sim.dpd.stats().unknown_tunnel_inputs, 1);
    sim.run_until(T0 + 1000 * S);
    assert_eq!(sim.deaths("a"), vec![(T0 + 240 * S, 240 * S, 3)]);
}

/// Restart half-way through the retries: the restored engine resends the
/// pending transmission with the same message ID and gives it its full wait.
#[test]
fn restore_mid_round_never_decides_early() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.add("b", seed000(), false);
    sim.add("dead", Settings::fortios(Mode::OnIdle, 1, 10 * S), false);
    sim.run_until(T0 + 125 * S);
    assert_eq!(sim.deaths("dead").len(), 1);
    assert_eq!(sim.probes("a").len(), 2);
    let id_a = sim.probes("a")[1].2;
    assert!(id_a.is_some());
    let snap = sim.dpd.snapshot(sim.now);
    let json = serde_json::to_string(&snap).unwrap();
    let snap: Snapshot<String> = serde_json::from_str(&json).unwrap();
    // dpdmon is down for 50 s (a kill -9 and a supervisor restart).
    let restart = T0 + 175 * S;
    let mut sim2 = Sim::new();
    sim2.now = restart;
    sim2.next_msg_id = 500;
    sim2.alive = sim.alive.clone();
    sim2.dpd = Dpd::restore(restart, snap).unwrap();
    // espd's snapshot says b received a packet at 170 s, while dpdmon was down.
    sim2.activity("b", T0 + 170 * S, 0);
    sim2.drain();
    assert!(sim2.log.is_empty(), "only handle_timeout produces events");
    sim2.run_until(T0 + 2000 * S);
    assert_eq!(
        sim2.deaths("dead"),
        vec![(restart, 20 * S, 1)],
        "verdicts survive a restart"
    );
    // a: transmission 2 again at restart, same message ID, then 3, then dead.
    assert_eq!(sim2.probes("a"), vec![(175, 2, id_a), (235, 3, id_a)]);
    assert_eq!(sim2.deaths("a"), vec![(T0 + 295 * S, 295 * S, 4)]);
    assert!(T0 + 295 * S >= T0 + dead_after_ms(&seed000()).unwrap());
    // b: life seen while down ended its round.
    assert_eq!(sim2.deaths("b"), vec![(T0 + 410 * S, 240 * S, 3)]);
    // A snapshot from a newer dpdmon is refused.
    let mut newer = sim2.dpd.snapshot(sim2.now);
    newer.version = SNAPSHOT_VERSION + 1;
    assert!(matches!(
        Dpd::restore(sim2.now, newer),
        Err(DpdError::SnapshotVersion { .. })
    ));
}

/// A stale snapshot (taken before the round started) only delays the verdict.
#[test]
fn restore_from_an_old_snapshot_is_late_not_early() {
    let mut sim = Sim::new();
    sim.add("a", seed000(), false);
    sim.run_until(T0 + 30 * S);
    let snap = sim.dpd.snapshot(sim.now);
    let mut sim2 = Sim::new();
    sim2.now = T0 + 200 * S;
    sim2.dpd = Dpd::restore(sim2.now, snap).unwrap();
    sim2.run_until(T0 + 2000 * S);
    assert_eq!(sim2.probes("a")[0], (200, 1, None));
    assert_eq!(sim2.deaths("a"), vec![(T0 + 380 * S, 380 * S, 3)]);
}

/// 100 000 tunnels: 90 % keep talking, 10 % fall silent at once; exactly the
/// silent ones die, each exactly at its budget.
#[test]
fn hundred_thousand_tunnels() {
    const N: u32 = 100_000;
    let mut dpd: Dpd<u32> = Dpd::new(T0);
    let s = Settings::fortios(Mode::OnIdle, 3, 20 * S);
    for k in 0..N {
        dpd.handle_tunnel_upsert(T0, k, s).unwrap();
    }
    let mut now = T0;
    let mut dead = Vec::new();
    let mut probes = 0u64;
    let keys: Vec<u32> = (0..N).collect();
    // Jumps from timer to timer up to `until`, collecting events.
    let mut run_to = |dpd: &mut Dpd<u32>, now: &mut u64, until: u64| {
        while let Some(t) = dpd.poll_timeout() {
            if t > until {
                break;
            }
            *now = t.max(*now);
            dpd.handle_timeout(*now);
            while let Some(ev) = dpd.poll_event() {
                match ev {
                    Event::SendProbe { .. } => probes += 1,
                    Event::PeerDead {
                        tunnel,
                        detected_after_ms,
                        ..
                    } => dead.push((tunnel, detected_after_ms)),
                }
            }
        }
        *now = until;
    };
    // Activity every 5 s for everybody up to 60 s, then only for k % 10 != 0,
    // until 200 s; then stop before the healthy ones look idle (220 s).
    for step in 1..=40u64 {
        run_to(&mut dpd, &mut now, T0 + step * 5 * S);
        let talking = keys
            .iter()
            .filter(|k| step <= 12 || **k % 10 != 0)
            .map(|k| Activity {
                tunnel: k,
                last_rx_ns: ns(now - 100),
                last_tx_ns: ns(now - 50),
            });
        dpd.handle_datapath_activity(now, talking);
    }
    run_to(&mut dpd, &mut now, T0 + 210 * S);
    assert_eq!(dead.len(), (N / 10) as usize);
    assert!(dead.iter().all(|(k, d)| k % 10 == 0 && *d == 80 * S));
    assert_eq!(probes, 3 * u64::from(N / 10));
    assert_eq!(dpd.stats().peers_dead, u64::from(N / 10));
}

/// Every mode with every schedule shape: a silent peer is declared dead at
/// exactly silence start + budget (periodic: within the bound), never early,
/// and a live one never.
#[test]
fn every_mode_and_schedule() {
    let schedules = [
        Schedule::Fixed {
            retry_count: 3,
            retry_interval_ms: 7 * S,
        },
        Schedule::Fixed {
            retry_count: 1,
            retry_interval_ms: 1500,
        },
        Schedule::PAN_OS,
        Schedule::Exponential {
            idle_ms: 2 * S,
            initial_ms: 300,
            max_ms: 1000,
            tries: 4,
        },
    ];
    for mode in [Mode::OnIdle, Mode::OnDemand, Mode::Periodic, Mode::Disable] {
        for schedule in schedules {
            let settings = Settings {
                mode,
                schedule,
                role: Role::Owner,
            };
            let mut sim = Sim::new();
            sim.add("dead", settings, false);
            sim.add("live", settings, true);
            // Both talk (two-way) until 100 s; then "dead" only sends.
            for i in 1..=100u64 {
                sim.run_until(T0 + i * S);
                sim.activity("dead", T0 + i * S, T0 + i * S);
                sim.activity("live", T0 + i * S, T0 + i * S);
            }
            for i in 101..=200u64 {
                sim.run_until(T0 + i * S);
                sim.activity("dead", 0, T0 + i * S);
            }
            sim.run_until(T0 + 2000 * S);
            let what = format!("{mode:?} {schedule:?}");
            assert!(sim.deaths("live").is_empty(), "{what}");
            let Some(budget) = dead_after_ms(&settings) else {
                assert!(sim.deaths("dead").is_empty(), "{what}");
                assert!(sim.log.is_empty(), "{what}");
                continue;
            };
            let d = sim.deaths("dead");
            assert_eq!(d.len(), 1, "{what}");
            let (at, detected, probes) = d[0];
            assert_eq!(probes, schedule.tries(), "{what}");
            // Silence starts at 100 s (last inbound); on-demand: the first
            // unanswered outbound packet, at 101 s.
            let origin = T0
                + if mode == Mode::OnDemand {
                    101 * S
                } else {
                    100 * S
                };
            if mode == Mode::Periodic {
                assert!(
                    at <= origin + budget && at >= origin + schedule.round_ms(),
                    "{what}"
                );
                assert!(detected <= budget, "{what}");
            } else {
                assert_eq!(at, origin + budget, "{what}");
                assert_eq!(detected, budget, "{what}");
            }
        }
    }
}

/// A restored verdict is not re-announced for a tunnel the driver removed
/// (ikemgr no longer has it, or has a new IKE SA for it) before the first
/// timeout; IKE activity replayed from ikemgr's snapshot ends a round.
#[test]
fn restore_reconciles_before_the_first_timeout() {
    let mut sim = Sim::new();
    sim.add("gone", Settings::fortios(Mode::OnIdle, 1, 10 * S), false);
    sim.add("again", Settings::fortios(Mode::OnIdle, 1, 10 * S), false);
    sim.add("talked", seed000(), false);
    sim.run_until(T0 + 100 * S);
    assert_eq!(sim.deaths("gone").len(), 1);
    let snap = sim.dpd.snapshot(sim.now);
    let restart = T0 + 110 * S;
    let mut sim2 = Sim::new();
    sim2.now = restart;
    sim2.dpd = Dpd::restore(restart, snap).unwrap();
    sim2.dpd.handle_tunnel_removed(restart, &"gone".to_string());
    // ikemgr re-established "again" at 105 s: a new record.
    sim2.dpd
        .handle_tunnel_removed(restart, &"again".to_string());
    sim2.add("again", Settings::fortios(Mode::OnIdle, 1, 10 * S), true);
    // ikemgr's snapshot: "talked" got an authenticated message at 95 s.
    sim2.dpd
        .handle_ike_activity_at(restart, &"talked".to_string(), T0 + 95 * S);
    sim2.run_until(T0 + 1000 * S);
    assert!(sim2.deaths("gone").is_empty());
    assert!(sim2.deaths("again").is_empty());
    assert_eq!(sim2.deaths("talked"), vec![(T0 + 335 * S, 240 * S, 3)]);
}

/// xorshift64* for the randomized test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy, Default)]
struct Model {
    present: bool,
    settings: Option<Settings>,
    last_life: u64,
    dead: bool,
    reannounce: bool,
}

/// Random inputs (settings changes, roles, removals, traffic, IKE activity,
/// replies, failures, restarts) against a model of the last proof of life:
/// no verdict ever comes before last life + round (on-idle and on-demand:
/// last life + the whole budget), none for a standby, disabled, removed or
/// already dead tunnel, and nothing panics.
#[test]
fn randomized_inputs_never_decide_early() {
    for seed in [7u64, 99, 12345, 0xfeed] {
        let mut rng = Rng(seed);
        let mut sim = Sim::new();
        let names: Vec<String> = (0..24).map(|i| format!("t{i}")).collect();
        let mut model = vec![Model::default(); names.len()];
        let mut verdicts = 0;
        let random_settings = |rng: &mut Rng| Settings {
            mode: [Mode::Disable, Mode::OnIdle, Mode::OnDemand, Mode::Periodic]
                [rng.below(4) as usize],
            schedule: if rng.below(2) == 0 {
                Schedule::Fixed {
                    retry_count: rng.below(4) as u32,
                    retry_interval_ms: 100 + rng.below(3000),
                }
            } else {
                let initial = 50 + rng.below(500);
                Schedule::Exponential {
                    idle_ms: 100 + rng.below(3000),
                    initial_ms: initial,
                    max_ms: initial + rng.below(2000),
                    tries: 1 + rng.below(5) as u32,
                }
            },
            role: if rng.below(5) == 0 {
                Role::Standby
            } else {
                Role::Owner
            },
        };
        for _step in 0..4000 {
            let i = rng.below(names.len() as u64) as usize;
            let name = names[i].clone();
            let now = sim.now;
            let m = &mut model[i];
            match rng.below(12) {
                0 => {
                    let s = random_settings(&mut rng);
                    sim.dpd.handle_tunnel_upsert(now, name.clone(), s).unwrap();
                    if !m.present {
                        *m = Model {
                            present: true,
                            settings: Some(s),
                            last_life: now,
                            dead: false,
                            reannounce: false,
                        };
                    } else if !m.dead {
                        let was_standby = m.settings.is_some_and(|o| o.role == Role::Standby);
                        if was_standby && s.role == Role::Owner {
                            m.last_life = m.last_life.max(now);
                        }
                        m.settings = Some(s);
                    } else {
                        m.settings = Some(s);
                    }
                }
                1 => {
                    sim.dpd.handle_tunnel_removed(now, &name);
                    *m = Model::default();
                }
                2 | 3 => {
                    let rx = now.saturating_sub(rng.below(500));
                    sim.activity(&name, rx, now);
                    if m.present && !m.dead {
                        m.last_life = m.last_life.max(rx);
                    }
                }
                4 => sim.activity(&name, 0, now.saturating_sub(rng.below(500))),
                5 => {
                    sim.dpd.handle_ike_activity(now, &name);
                    if m.present && !m.dead {
                        m.last_life = m.last_life.max(now);
                    }
                }
                6 => {
                    let alive = rng.below(3) == 0;
                    sim.alive.insert(name.clone(), alive);
                }
                7 => sim.dpd.handle_probe_failed(now, &name),
                8 if rng.below(4) == 0 => {
                    // kill -9 and restart after some downtime; in-flight
                    // replies are lost with the process.
                    let snap = sim.dpd.snapshot(now);
                    let json = serde_json::to_vec(&snap).unwrap();
                    let snap: Snapshot<String> = serde_json::from_slice(&json).unwrap();
                    let downtime = if rng.below(2) == 0 { 100 } else { 5000 };
                    let restart = now + rng.below(downtime);
                    sim.dpd = Dpd::restore(restart, snap).unwrap();
                    sim.now = restart;
                    sim.replies.clear();
                    for m in model.iter_mut() {
                        m.reannounce = m.present && m.dead;
                    }
                }
                _ => {}
            }
            // Replies the peer sends count as life in the model too.
            let target = sim.now + rng.below(2000);
            let log_start = sim.log.len();
            let replies_before: Vec<(u64, String, u32)> = sim.replies.clone();
            sim.run_until(target);
            // Re-derive life from delivered replies: every reply scheduled
            // at or before `target` was delivered.
            let delivered: Vec<(u64, String)> = replies_before
                .into_iter()
                .filter(|r| r.0 <= target)
                .map(|r| (r.0, r.1))
                .collect();
            let mut events: Vec<(u64, Event<String>)> = sim.log[log_start..].to_vec();
            events.sort_by_key(|e| e.0);
            // Replies scheduled during this run were delivered too, if due.
            let mut all_delivered = delivered;
            for (t, ev) in &events {
                if let Event::SendProbe { tunnel, .. } = ev {
                    if sim.alive.get(tunnel).copied().unwrap_or(false) && t + sim.rtt <= target {
                        all_delivered.push((t + sim.rtt, tunnel.clone()));
                    }
                }
            }
            // Check verdicts in time order, applying life before each one.
            for (t, ev) in events {
                for (at, who) in &all_delivered {
                    if *at <= t {
                        if let Some(j) = names.iter().position(|n| n == who) {
                            let m = &mut model[j];
                            if m.present && !m.dead {
                                m.last_life = m.last_life.max(*at);
                            }
                        }
                    }
                }
                if let Event::PeerDead { tunnel, .. } = ev {
                    let j = names.iter().position(|n| *n == tunnel).unwrap();
                    let m = &mut model[j];
                    assert!(m.present, "seed {seed}: verdict for a removed tunnel");
                    if m.dead {
                        assert!(m.reannounce, "seed {seed}: second verdict for {tunnel}");
                        m.reannounce = false;
                        continue;
                    }
                    let s = m.settings.unwrap();
                    assert_eq!(s.role, Role::Owner, "seed {seed}: standby decided");
                    let budget = dead_after_ms(&s).expect("disable never decides");
                    let floor = if s.mode == Mode::Periodic {
                        s.schedule.round_ms()
                    } else {
                        budget
                    };
                    assert!(
                        t >= m.last_life + floor,
                        "seed {seed}: {tunnel} {s:?} decided at {t}, life {} floor {floor}",
                        m.last_life
                    );
                    m.dead = true;
                    verdicts += 1;
                }
            }
            for (at, who) in &all_delivered {
                if let Some(j) = names.iter().position(|n| n == who) {
                    let m = &mut model[j];
                    if m.present && !m.dead {
                        m.last_life = m.last_life.max(*at);
                    }
                }
            }
        }
        assert!(verdicts > 10, "seed {seed}: only {verdicts} verdicts");
    }
}
