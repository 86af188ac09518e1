//! The glue on a simulated clock: ticks once a second like the daemon shell.

use super::*;
use bus_schema::schema::{IkeActivityMark, TunnelActivity};
use bus_schema::{TunnelInfo, TunnelKind};

const T0: u64 = 1_700_000_000_000;

fn tunnel(name: &str, mode: &str, count: u32, interval_ms: u64, state: TunnelState) -> Body {
    Body::Tunnel(TunnelInfo {
        name: name.into(),
        phase1: name.into(),
        kind: TunnelKind::Static,
        local_gw: Some("192.168.202.31".into()),
        remote_gw: Some("192.168.4.2".into()),
        interface: Some("port1".into()),
        state,
        phase2: vec![],
        dpd: DpdSettings {
            mode: mode.into(),
            retry_count: count,
            retry_interval_ms: interval_ms,
        },
    })
}

fn store(bodies: &[Body]) -> StateStore {
    let mut s = StateStore::new();
    for b in bodies {
        s.apply(b);
    }
    s
}

fn rx(name: &str, at_ms: u64) -> Body {
    Body::EspActivity {
        tunnels: vec![TunnelActivity {
            tunnel: name.into(),
            last_rx_ns: at_ms * 1_000_000,
            last_tx_ns: at_ms * 1_000_000,
            rx_pkts: 1,
            tx_pkts: 1,
            rx_bytes: 100,
            tx_bytes: 100,
        }],
    }
}

/// Bodies published at each tick time.
type Trace = Vec<(u64, Body)>;

/// Ticks every second from `from` (exclusive) to `to` (inclusive); `inject` may feed
/// events before each tick.
fn run(
    g: &mut Glue,
    from: u64,
    to: u64,
    mut inject: impl FnMut(u64, &mut Glue, &mut Vec<Body>),
) -> Trace {
    let mut trace = Vec::new();
    let mut t = from;
    while t < to {
        t += 1000;
        let mut out = Vec::new();
        inject(t, g, &mut out);
        g.tick(t, &mut out);
        trace.extend(out.into_iter().map(|b| (t, b)));
    }
    trace
}

fn probes(trace: &Trace) -> Vec<(u64, u64, u32)> {
    trace
        .iter()
        .filter_map(|(t, b)| match b {
            Body::ProbeRequest { round, attempt, .. } => Some((*t, *round, *attempt)),
            _ => None,
        })
        .collect()
}

fn states(trace: &Trace) -> Vec<(u64, String)> {
    trace
        .iter()
        .filter_map(|(t, b)| match b {
            Body::Dpd(d) => Some((*t, d.state.clone())),
            _ => None,
        })
        .collect()
}

fn up(g: &mut Glue, now: u64, bodies: &[Body]) -> Vec<Body> {
    let mut out = Vec::new();
    g.sync_tunnels(now, &store(bodies), &mut out);
    out
}

#[test]
fn seed_000_on_idle_three_probes_then_dead_at_240_s() {
    let mut g = Glue::new(T0, 0);
    let out = up(
        &mut g,
        T0,
        &[tunnel("vpn1_2", "on-idle", 3, 60_000, TunnelState::Up)],
    );
    // The record appears with the seed's fields.
    let Some(Body::Dpd(rec)) = out.first() else {
        panic!("no dpd.state record: {out:?}")
    };
    assert_eq!(
        (
            rec.mode.as_str(),
            rec.on,
            rec.idle_ms,
            rec.retry,
            rec.count,
            rec.state.as_str()
        ),
        ("on-idle", true, 60_000, 3, 0, "idle")
    );
    let trace = run(&mut g, T0, T0 + 300_000, |t, g, out| {
        // ikemgr reports the message ID of the first transmission.
        if t == T0 + 61_000 {
            let round = g.rounds.get("vpn1_2").copied().unwrap_or(0);
            g.handle_event(
                t,
                &Body::ProbeResult {
                    tunnel: "vpn1_2".into(),
                    round,
                    msg_id: 114,
                    outcome: "sent".into(),
                },
                out,
            );
        }
    });
    let p = probes(&trace);
    assert_eq!(
        p.iter().map(|x| (x.0 - T0, x.2)).collect::<Vec<_>>(),
        vec![(60_000, 1), (120_000, 2), (180_000, 3)]
    );
    assert!(p.iter().all(|x| x.1 == p[0].1), "one round: {p:?}");
    let st = states(&trace);
    assert_eq!(
        st.last().map(|x| (x.0 - T0, x.1.as_str())),
        Some((240_000, "dead"))
    );
    assert!(st.iter().all(|x| x.0 - T0 < 240_000 || x.1 == "dead"));
    let rec = &g.published()["vpn1_2"];
    assert_eq!((rec.count, rec.seqno), (3, 114));
    let d = g.take_detections();
    assert_eq!(
        d,
        vec![Detection {
            detected_after_ms: 240_000,
            dead_after_ms: 240_000
        }]
    );
    let s = g.stats();
    assert_eq!((s.probes_sent, s.dead_peers, s.probe_replies), (3, 1, 0));
    assert_eq!(g.tunnels_by_state()["dead"], 1);
    let v = g.view_tunnels(T0 + 300_000, Some("vpn1_2"));
    assert_eq!(
        v[0]["dpd"],
        "mode=on-idle on=1 idle=60000ms retry=3 count=3 seqno=114"
    );
    assert_eq!(v[0]["dead_after_ms"], 240_000);
    assert_eq!(v[0]["state"], "dead");
}

#[test]
fn traffic_between_retries_ends_the_round() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 3, 10_000, TunnelState::Up)],
    );
    // Silent until 25 s (probes at 10 and 20 s), then an ESP packet at 25 s, then silence.
    let trace = run(&mut g, T0, T0 + 100_000, |t, g, out| {
        if t == T0 + 25_000 {
            g.handle_event(t, &rx("t", t), out);
        }
    });
    let p: Vec<u64> = probes(&trace).iter().map(|x| x.0 - T0).collect();
    // Round 1: 10, 20 s; answered at 25 s; round 2 from 35 s: 35, 45, 55; dead at 65 s.
    assert_eq!(p, vec![10_000, 20_000, 35_000, 45_000, 55_000]);
    let rounds: Vec<u64> = probes(&trace).iter().map(|x| x.1).collect();
    assert_ne!(rounds[1], rounds[2], "a new round after the answer");
    let st = states(&trace);
    assert!(st.contains(&(T0 + 25_000, "idle".to_string())), "{st:?}");
    assert_eq!(st.last(), Some(&(T0 + 65_000, "dead".to_string())));
}

#[test]
fn steady_traffic_on_idle_sends_no_probe() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 3, 3_000, TunnelState::Up)],
    );
    let trace = run(&mut g, T0, T0 + 60_000, |t, g, out| {
        g.handle_event(t, &rx("t", t - 300), out);
    });
    assert!(probes(&trace).is_empty(), "{trace:?}");
    assert_eq!(g.stats().probes_sent, 0);
}

#[test]
fn ike_activity_and_probe_reply_are_proof_of_life() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 2, 5_000, TunnelState::Up)],
    );
    let trace = run(&mut g, T0, T0 + 30_000, |t, g, out| {
        if t == T0 + 4_000 {
            let b = Body::IkeActivity {
                tunnels: vec![IkeActivityMark {
                    tunnel: "t".into(),
                    last_rx_ns: t * 1_000_000,
                }],
            };
            g.handle_event(t, &b, out);
        }
        if t == T0 + 10_000 {
            let round = g.rounds["t"];
            let b = Body::ProbeResult {
                tunnel: "t".into(),
                round,
                msg_id: 7,
                outcome: "reply".into(),
            };
            g.handle_event(t, &b, out);
        }
    });
    let p: Vec<u64> = probes(&trace).iter().map(|x| x.0 - T0).collect();
    // Silent from 4 s: probe at 9 s, reply at 10 s; silent again: probe at 15 s
    // (the next round starts no earlier than round start + interval), 20 s, dead at 25 s.
    assert_eq!(&p[..1], &[9_000]);
    assert_eq!(g.stats().probe_replies, 1);
    assert_eq!(g.core_stats().replies, 1);
    assert!(states(&trace)
        .iter()
        .any(|s| s.0 == T0 + 10_000 && s.1 == "idle"));
    assert_eq!(g.stats().dead_peers, 1);
}

/// The `tunnels` view shows the core's current silence: IKE activity that changes no
/// bus field still resets `silent_ms`.
#[test]
fn view_shows_current_silence_after_ike_activity() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 3, 5_000, TunnelState::Up)],
    );
    run(&mut g, T0, T0 + 12_000, |t, g, out| {
        if t % 2_000 == 0 {
            let b = Body::IkeActivity {
                tunnels: vec![IkeActivityMark {
                    tunnel: "t".into(),
                    last_rx_ns: t * 1_000_000,
                }],
            };
            g.handle_event(t, &b, out);
        }
    });
    let v = g.view_tunnels(T0 + 12_500, Some("t"));
    assert_eq!(v[0]["silent_ms"], 500, "{v}");
    assert_eq!(v[0]["probes_sent"], 0, "{v}");
}

#[test]
fn disable_mode_is_published_and_never_probes() {
    let mut g = Glue::new(T0, 0);
    let out = up(&mut g, T0, &[tunnel("m", "disable", 0, 0, TunnelState::Up)]);
    assert!(
        matches!(&out[..], [Body::Dpd(d)] if !d.on && d.mode == "disable" && d.state == "idle")
    );
    let trace = run(&mut g, T0, T0 + 30_000, |_, _, _| {});
    assert!(probes(&trace).is_empty());
}

#[test]
fn tunnel_down_keeps_its_configured_record_and_removal_drops_it() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 3, 5_000, TunnelState::Up)],
    );
    let trace = run(&mut g, T0, T0 + 25_000, |_, _, _| {});
    assert_eq!(states(&trace).last().map(|s| s.1.as_str()), Some("dead"));
    // ikemgr flushes: the tunnel goes down; its record is the configured one again.
    let out = up(
        &mut g,
        T0 + 25_000,
        &[tunnel("t", "on-idle", 3, 5_000, TunnelState::Down)],
    );
    let configured = DpdSettings {
        mode: "on-idle".into(),
        retry_count: 3,
        retry_interval_ms: 5_000,
    };
    let rec = configured_record(
        "t",
        &configured,
        settings_of(&configured, Role::Owner, None),
    );
    assert_eq!(
        (rec.dead_after_ms, rec.schedule.as_str()),
        (20_000, "fixed")
    );
    assert_eq!(out, vec![Body::Dpd(rec)]);
    let trace = run(&mut g, T0 + 25_000, T0 + 60_000, |_, _, _| {});
    assert!(trace.is_empty(), "{trace:?}");
    // Up again (a new IKE SA): monitored afresh, silence counted from now; the record
    // is the same (idle, count 0), so nothing is republished.
    let out = up(
        &mut g,
        T0 + 60_000,
        &[tunnel("t", "on-idle", 3, 5_000, TunnelState::Up)],
    );
    assert!(out.is_empty(), "{out:?}");
    let trace = run(&mut g, T0 + 60_000, T0 + 90_000, |_, _, _| {});
    assert_eq!(probes(&trace).first().map(|p| p.0 - T0), Some(65_000));
    // Removed from ikemgr's table: removed from the bus.
    let out = up(&mut g, T0 + 90_000, &[]);
    assert_eq!(out, vec![Body::DpdRemoved { tunnel: "t".into() }]);
    // A tunnel that never came up has its configured record, and loses it the same way.
    let out = up(
        &mut g,
        T0 + 91_000,
        &[tunnel("d", "on-demand", 3, 20_000, TunnelState::Down)],
    );
    assert!(
        matches!(&out[..], [Body::Dpd(d)] if d.mode == "on-demand" && d.idle_ms == 20_000 && d.state == "idle")
    );
    assert!(g.view_tunnels(T0, None).as_array().unwrap().is_empty());
    let out = up(&mut g, T0 + 92_000, &[]);
    assert_eq!(out, vec![Body::DpdRemoved { tunnel: "d".into() }]);
}

/// `set dpd-backoff exponential` (seed 004's PAN-OS schedule: `dpd-retryinterval 5`,
/// `dpd-retrycount 10`, initial 1 s, max 64 s): probes after 5 s of silence, then 1, 2,
/// 4 … 64 s apart; dead at 5 + 319 = 324 s; the record carries the budget and schedule.
#[test]
fn exponential_schedule_from_the_config() {
    let mut g = Glue::new(T0, 0);
    let ike = store(&[tunnel("t", "on-idle", 10, 5_000, TunnelState::Up)]);
    let mut out = Vec::new();
    g.sync_tunnels(T0, &ike, &mut out);
    let backoff = BTreeMap::from([(
        "t".to_string(),
        Backoff {
            initial_ms: 1_000,
            max_ms: 64_000,
        },
    )]);
    let mut out = Vec::new();
    g.set_backoff(T0, backoff, &mut out);
    assert!(
        matches!(&out[..], [Body::Dpd(d)] if d.dead_after_ms == 324_000
            && d.schedule == "exponential initial=1000ms max=64000ms"),
        "{out:?}"
    );
    let trace = run(&mut g, T0, T0 + 400_000, |_, _, _| {});
    let at: Vec<u64> = probes(&trace).iter().map(|p| (p.0 - T0) / 1000).collect();
    assert_eq!(at, vec![5, 6, 8, 12, 20, 36, 68, 132, 196, 260]);
    let dead: Vec<u64> = states(&trace)
        .iter()
        .filter(|s| s.1 == "dead")
        .map(|s| (s.0 - T0) / 1000)
        .collect();
    assert_eq!(dead, vec![324]);
    let v = g.view_tunnels(T0 + 400_000, Some("t"));
    assert_eq!(v[0]["dead_after_ms"], 324_000);
    assert_eq!(v[0]["schedule"], "exponential initial=1000ms max=64000ms");
    // Back to fixed: 5 s x (1 + 10) = 55 s.
    let mut out = Vec::new();
    g.set_backoff(T0 + 400_000, BTreeMap::new(), &mut out);
    let v = g.view_tunnels(T0 + 400_000, Some("t"));
    assert_eq!(v[0]["dead_after_ms"], 55_000, "{v}");
    assert_eq!(v[0]["schedule"], "fixed");
}

/// The incremental sync: an unchanged table publishes nothing; one tunnel replaced by
/// another (same count) removes the first and adds the second.
#[test]
fn resync_touches_only_changed_tunnels() {
    let mut g = Glue::new(T0, 0);
    let a = tunnel("a", "on-idle", 3, 5_000, TunnelState::Up);
    let b = tunnel("b", "on-idle", 3, 5_000, TunnelState::Up);
    let c = tunnel("c", "on-demand", 2, 7_000, TunnelState::Up);
    assert_eq!(up(&mut g, T0, &[a.clone(), b.clone()]).len(), 2);
    assert!(up(&mut g, T0 + 1, &[a.clone(), b.clone()]).is_empty());
    let out = up(&mut g, T0 + 2, &[a.clone(), c]);
    assert!(
        out.contains(&Body::DpdRemoved { tunnel: "b".into() }),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|x| matches!(x, Body::Dpd(d) if d.tunnel == "c" && d.idle_ms == 7_000)),
        "{out:?}"
    );
    assert_eq!(out.len(), 2, "{out:?}");
    let names: Vec<String> = g
        .view_tunnels(T0 + 2, None)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "c"]);
}

#[test]
fn standby_never_probes_and_promotion_counts_from_then() {
    let mut g = Glue::new(T0, 0);
    let mut out = Vec::new();
    g.sync_roles(
        T0,
        &store(&[Body::TunnelRole {
            tunnel: "t".into(),
            role: "standby".into(),
        }]),
        &mut out,
    );
    up(
        &mut g,
        T0,
        &[tunnel("t", "on-idle", 2, 5_000, TunnelState::Up)],
    );
    let trace = run(&mut g, T0, T0 + 60_000, |_, _, _| {});
    assert!(probes(&trace).is_empty());
    assert_eq!(g.view_tunnels(T0, None)[0]["role"], "standby");
    // Takeover at 60 s: probing starts 5 s later.
    g.sync_roles(
        T0 + 60_000,
        &store(&[Body::TunnelRole {
            tunnel: "t".into(),
            role: "sync-primary".into(),
        }]),
        &mut out,
    );
    let trace = run(&mut g, T0 + 60_000, T0 + 90_000, |_, _, _| {});
    let p: Vec<u64> = probes(&trace).iter().map(|x| x.0 - T0).collect();
    assert_eq!(p, vec![65_000, 70_000]);
    assert_eq!(
        states(&trace).last(),
        Some(&(T0 + 75_000, "dead".to_string()))
    );
}

#[test]
fn override_monitors_a_manual_key_tunnel_and_clears() {
    let mut g = Glue::new(T0, 0);
    let ike = store(&[tunnel("vpn1", "disable", 0, 0, TunnelState::Up)]);
    let mut out = Vec::new();
    g.sync_tunnels(T0, &ike, &mut out);
    assert!(g
        .set_override(
            T0,
            "vpn1",
            Some(DpdSettings {
                mode: "bogus".into(),
                retry_count: 1,
                retry_interval_ms: 1
            }),
            &mut out
        )
        .is_err());
    assert!(g
        .set_override(
            T0,
            "vpn1",
            Some(DpdSettings {
                mode: "on-idle".into(),
                retry_count: 3,
                retry_interval_ms: 0
            }),
            &mut out
        )
        .is_err());
    g.set_override(
        T0,
        "vpn1",
        Some(DpdSettings {
            mode: "on-idle".into(),
            retry_count: 3,
            retry_interval_ms: 2_000,
        }),
        &mut out,
    )
    .unwrap();
    assert_eq!(g.view_tunnels(T0, None)[0]["override"], true);
    let trace = run(&mut g, T0, T0 + 5_000, |_, _, _| {});
    assert_eq!(probes(&trace).len(), 2);
    // ikemgr republishes the tunnel: the override stays.
    g.sync_tunnels(T0 + 5_000, &ike, &mut out);
    assert_eq!(g.published()["vpn1"].mode, "on-idle");
    g.set_override(T0 + 5_000, "vpn1", None, &mut out).unwrap();
    assert_eq!(g.published()["vpn1"].mode, "disable");
    let trace = run(&mut g, T0 + 5_000, T0 + 30_000, |_, _, _| {});
    assert!(probes(&trace).is_empty());
}

#[test]
fn invalid_settings_are_not_monitored() {
    let mut g = Glue::new(T0, 0);
    let out = up(
        &mut g,
        T0,
        &[
            tunnel("t", "on-idle", 3, 0, TunnelState::Up),
            tunnel("u", "sometimes", 3, 1000, TunnelState::Up),
        ],
    );
    // Published as configured, not monitored.
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|b| matches!(b, Body::Dpd(d) if d.state == "idle")));
    assert_eq!(g.stats().invalid_settings, 1);
    assert!(g.view_tunnels(T0, None).as_array().unwrap().is_empty());
}

/// A restarted dpdmon knows nothing of the previous process: it rebuilds from ikemgr's
/// table and counts silence from the moment it learns a tunnel, so a peer half-way
/// through its retries is never declared dead before restart + budget.
#[test]
fn restart_mid_round_never_decides_early() {
    let ike = [tunnel("t", "on-idle", 3, 10_000, TunnelState::Up)];
    let mut first = Glue::new(T0, 0);
    up(&mut first, T0, &ike);
    let trace = run(&mut first, T0, T0 + 25_000, |_, _, _| {});
    assert_eq!(
        probes(&trace).len(),
        2,
        "half-way: two of three probes sent"
    );
    // kill -9 at 25 s; back at 27 s. The old process would have decided at 40 s.
    let restart = T0 + 27_000;
    let mut g = Glue::new(restart, (restart) << 16);
    up(&mut g, restart, &ike);
    let trace = run(&mut g, restart, T0 + 120_000, |_, _, _| {});
    let dead_at = states(&trace)
        .into_iter()
        .find(|s| s.1 == "dead")
        .map(|s| s.0)
        .expect("a verdict");
    assert!(
        dead_at >= restart + 40_000,
        "dead at {dead_at}, restart {restart}"
    );
    assert_eq!(dead_at, restart + 40_000);
    // Rounds of the new process do not repeat the old ones.
    assert!(probes(&trace).iter().all(|p| p.1 > (restart << 16)));
}

#[test]
fn unknown_tunnels_and_other_bodies_are_ignored() {
    let mut g = Glue::new(T0, 0);
    let mut out = Vec::new();
    g.handle_event(T0, &rx("nope", T0), &mut out);
    g.handle_event(T0, &Body::Heartbeat { uptime_ms: 1 }, &mut out);
    g.handle_event(
        T0,
        &Body::ProbeResult {
            tunnel: "nope".into(),
            round: 1,
            msg_id: 1,
            outcome: "weird".into(),
        },
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(g.core_stats().unknown_tunnel_inputs, 1);
}

#[test]
fn esp_after_the_verdict_revives_a_tunnel_ikemgr_kept() {
    let mut g = Glue::new(T0, 0);
    up(
        &mut g,
        T0,
        &[tunnel("vpn1", "on-idle", 2, 1_000, TunnelState::Up)],
    );
    let trace = run(&mut g, T0, T0 + 10_000, |_, _, _| {});
    assert_eq!(states(&trace).last().map(|s| s.1.as_str()), Some("dead"));
    // A late batch with a packet from before the verdict (3 s) changes nothing.
    let mut out = Vec::new();
    g.handle_event(T0 + 10_000, &rx("vpn1", T0 + 500), &mut out);
    assert!(out.is_empty(), "{out:?}");
    // A packet after it: monitored afresh, one update and no removal on the bus.
    g.handle_event(T0 + 11_000, &rx("vpn1", T0 + 10_500), &mut out);
    assert!(
        matches!(&out[..], [Body::Dpd(d)] if d.state == "idle" && d.count == 0),
        "{out:?}"
    );
    let trace = run(&mut g, T0 + 11_000, T0 + 20_000, |_, _, _| {});
    // Silence counted from the re-add at 11 s: the next round starts at 12 s.
    assert_eq!(
        probes(&trace).first().map(|p| p.0 - T0),
        Some(12_000),
        "{trace:?}"
    );
}

/// Scale figures of the glue (not a pass/fail test): 100 000 tunnels through
/// `sync_tunnels`, one espd batch for all of them, and ticks, beside a reference (the same
/// names put into a bare `BTreeMap`). Run with
/// `cargo test --release -p dpdmon -- --ignored --nocapture glue_scale`.
#[test]
#[ignore]
fn glue_scale_figures() {
    use std::time::Instant;
    const N: usize = 100_000;
    let bodies: Vec<Body> = (0..N)
        .map(|i| tunnel(&format!("t{i}"), "on-idle", 3, 20_000, TunnelState::Up))
        .collect();
    let ike = store(&bodies);
    let t = Instant::now();
    let mut reference = BTreeMap::new();
    for i in 0..N {
        reference.insert(format!("t{i}"), i);
    }
    let reference_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut g = Glue::new(T0, 0);
    let mut out = Vec::new();
    let t = Instant::now();
    g.sync_tunnels(T0, &ike, &mut out);
    let first_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    let published = out.len();
    out.clear();
    let t = Instant::now();
    g.sync_tunnels(T0 + 1, &ike, &mut out);
    let resync_ms = t.elapsed().as_secs_f64() * 1e3;
    let batch = Body::EspActivity {
        tunnels: (0..N)
            .map(|i| TunnelActivity {
                tunnel: format!("t{i}"),
                last_rx_ns: (T0 + 500) * 1_000_000,
                last_tx_ns: (T0 + 500) * 1_000_000,
                rx_pkts: 1,
                tx_pkts: 1,
                rx_bytes: 1,
                tx_bytes: 1,
            })
            .collect(),
    };
    let t = Instant::now();
    g.handle_event(T0 + 1_000, &batch, &mut out);
    let batch_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for s in 2..=10 {
        g.tick(T0 + s * 1_000, &mut out);
    }
    let idle_tick_ms = t.elapsed().as_secs_f64() * 1e3 / 9.0;
    // All silent since 0.5 s: every tunnel starts a round at 20.5 s.
    out.clear();
    let t = Instant::now();
    g.tick(T0 + 21_000, &mut out);
    let round_tick_ms = t.elapsed().as_secs_f64() * 1e3;
    let probes = out
        .iter()
        .filter(|b| matches!(b, Body::ProbeRequest { .. }))
        .count();
    eprintln!(
        "glue, {N} tunnels: first sync {first_sync_ms:.1} ms ({published} records), re-sync \
         {resync_ms:.1} ms, espd batch {batch_ms:.1} ms, idle tick {idle_tick_ms:.2} ms, tick \
         starting {probes} rounds {round_tick_ms:.1} ms; reference: {N} names into a BTreeMap \
         {reference_ms:.1} ms"
    );
    assert_eq!(probes, N);
}
