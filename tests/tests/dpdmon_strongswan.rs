//! Dead peer detection against strongSwan with real IKEv2 tunnels (issue 5).
//!
//! Haven's dial-up gateway `vpn1` (ikemgr + espd + dpdmon in gwb, one run-dir) and a
//! strongSwan client (charon in gwa, PSK, `encap = yes`) that initiates to it:
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (Haven) - 10.99.2.2 server
//! ```
//!
//! Short DPD settings in the gateway's config (`set dpd on-idle`, `dpd-retrycount 3`,
//! `dpd-retryinterval 2`: a silent peer is dead after 2 + 3 x 2 = 8 s). The tests:
//! - (a) while the tunnel is idle our probes are answered by strongSwan and nothing is
//!   flushed; then charon is SIGKILLed: the gateway sends exactly 3 transmissions of one
//!   liveness check (one message ID, counted on the wire with tcpdump and on the bus), then
//!   flushes the tunnel: its routes are gone, and it is gone from `diagnose vpn tunnel list`
//!   (espd), `diagnose vpn ike gateway list` (ikemgr), `get vpn ipsec tunnel summary` and
//!   dpdmon's view; ikemgr's debug log tells the seed 000 story in order;
//! - (b) the link is cut (`ip link set out0 down` in gwa): the same, probes counted by an
//!   nftables counter on gwb's output (the wire itself is down);
//! - (c) strongSwan's own DPD (`dpd_delay = 2s`, with a retransmission schedule short
//!   enough that an unanswered check would close its SA within seconds) is answered, its SA
//!   stays up, and its checks are proof of life for us: our gateway sends no probe at all;
//! - (d) with traffic flowing, on-idle sends no probe (none on the bus, none on the wire);
//!   once the traffic stops, probes start (so the check can fail); this gateway uses the
//!   exponential schedule from its config, which `vpnctl` shows;
//! - (e) `periodic` probes every interval even with traffic flowing; answered, the tunnel
//!   stays up;
//! - (f) a static tunnel (Haven initiates to a strongSwan responder): the verdict takes it
//!   `down` (route and SAs gone, its DPD record back to the configured one); when strongSwan
//!   returns, Haven negotiates again and the new IKE SA is monitored afresh.
//!
//! Needs root, iproute2, tcpdump, nftables and the strongSwan packages (INTEROP.md); without
//! them the tests FAIL naming what is missing. Intervals are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_schema::{ctl_call, Body, BusSubscriber, CtlReply, CtlRequest, DaemonKind, TunnelState};
use haven_tests::daemons::{vpnctl, wait_for};
use haven_tests::gateway::{require_strongswan, tail, Gateway};
use haven_tests::member::rt;
use haven_tests::netns::{self, Netns, Proc, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-dpdmon-strongswan-psk-0123456789";
const WAIT: Duration = Duration::from_secs(25);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";
/// The dial-up instance strongSwan's tunnel becomes.
const INSTANCE: &str = "vpn1_1";
/// Metrics addresses inside gwb.
const IKEMGR_METRICS: &str = "127.0.0.1:19701";
const DPDMON_METRICS: &str = "127.0.0.1:19702";
const ESPD_METRICS: &str = "127.0.0.1:19704";
/// IKEv2 exchange type INFORMATIONAL (RFC 7296 §3.1).
const INFORMATIONAL: u8 = 37;
/// IKEv2 header flag: Response (RFC 7296 §3.1).
const FLAG_RESPONSE: u8 = 0x20;

fn require() {
    require_strongswan();
    for (tool, args, pkg) in [
        ("tcpdump", &["--version"][..], "tcpdump"),
        ("nft", &["--version"][..], "nftables"),
    ] {
        if let Err(e) = netns::require_tool(tool, args, pkg) {
            panic!("cannot run DPD interop tests: {e}");
        }
    }
}

/// Haven's dial-up gateway with DPD `mode`: `count` probes `interval_s` apart.
fn gateway_config(mode: &str, count: u32, interval_s: u32) -> String {
    gateway_config_with(mode, count, interval_s, "")
}

/// As [`gateway_config`], with more phase1 lines (`extra`, each ending in a newline).
fn gateway_config_with(mode: &str, count: u32, interval_s: u32, extra: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
        set dpd {mode}
        set dpd-retrycount {count}
        set dpd-retryinterval {interval_s}
{extra}        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

haven_tests::gateway_newtype!(
    /// ikemgr, espd and dpdmon of one gateway (killed on drop).
    Haven
);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [
            ("ikemgr", IKEMGR_METRICS),
            ("espd", ESPD_METRICS),
            ("dpdmon", DPDMON_METRICS),
        ];
        Haven(Gateway::start(ns, label, conf_text, &daemons, WAIT))
    }

    fn logs(&self) -> String {
        self.log_tails(&["ikemgr", "dpdmon", "espd"], 60)
    }

    /// `vpnctl <args>`'s standard output.
    fn text(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&vpnctl(&self.run, args).stdout).into_owned()
    }

    /// dpdmon's `tunnels` view.
    fn dpd_view(&self) -> Value {
        let req = CtlRequest::View {
            name: "tunnels".into(),
            args: vec![],
        };
        match rt().block_on(ctl_call(
            &self.run,
            DaemonKind::Dpdmon,
            &req,
            Duration::from_secs(2),
        )) {
            Ok(CtlReply::View(v)) => v,
            other => panic!("dpdmon tunnels view: {other:?}"),
        }
    }

    /// One sample of dpdmon's Prometheus series `series`.
    fn dpd_metric(&self, series: &str) -> Option<f64> {
        let text = self
            .ns
            .run("curl", &["-s", &format!("http://{DPDMON_METRICS}/metrics")])
            .ok()?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Waits for dpdmon's metrics (exported once a second) to count one dead peer.
    fn wait_dead_metric(&self) {
        wait_for(
            "dpdmon_dead_peers_total 1",
            Duration::from_secs(5),
            || match self.dpd_metric("dpdmon_dead_peers_total") {
                Some(1.0) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    fn routes(&self) -> String {
        self.ns.ip(&["route"]).unwrap_or_default()
    }
}

/// Everything dpdmon and ikemgr publish, with the time it arrived; the methods look at
/// one tunnel's bodies.
struct Tap {
    tunnel: String,
    /// (arrival, the publisher's `ts_ns`, body). Arrival order across the two publishers
    /// is not causal order (one socket, fair-queued); `ts_ns` is, on one host.
    seen: Arc<Mutex<Vec<(Instant, u64, Body)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tap {
    /// A tap for the dial-up instance.
    fn new(run: &Path) -> Tap {
        Tap::for_tunnel(run, INSTANCE)
    }

    fn for_tunnel(run: &Path, tunnel: &str) -> Tap {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, run) = (seen.clone(), stop.clone(), run.to_path_buf());
        let thread = std::thread::spawn(move || {
            rt().block_on(async move {
                let mut sub =
                    BusSubscriber::connect(&run, &[DaemonKind::Dpdmon, DaemonKind::Ikemgr])
                        .await
                        .expect("subscribe to dpdmon and ikemgr");
                while !st.load(Ordering::Relaxed) {
                    if let Ok(Ok(env)) =
                        tokio::time::timeout(Duration::from_millis(200), sub.recv()).await
                    {
                        s.lock()
                            .unwrap()
                            .push((Instant::now(), env.ts_ns, env.body));
                    }
                }
            })
        });
        Tap {
            tunnel: tunnel.to_string(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// (arrival, round, attempt) of dpdmon's probe requests for the instance after `since`.
    fn requests(&self, since: Instant) -> Vec<(Instant, u64, u32)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, _, b)| match b {
                Body::ProbeRequest {
                    tunnel,
                    round,
                    attempt,
                } if *tunnel == self.tunnel && *t >= since => Some((*t, *round, *attempt)),
                _ => None,
            })
            .collect()
    }

    /// (round, msg_id, outcome) of ikemgr's probe results for the instance after `since`.
    fn results(&self, since: Instant) -> Vec<(u64, u32, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, _, b)| match b {
                Body::ProbeResult {
                    tunnel,
                    round,
                    msg_id,
                    outcome,
                } if *tunnel == self.tunnel && *t >= since => {
                    Some((*round, *msg_id, outcome.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Arrival of the first `dpd.state` record of the instance with `state`.
    fn first_state(&self, state: &str) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find_map(|(t, _, b)| match b {
                Body::Dpd(d) if d.tunnel == self.tunnel && d.state == state => Some(*t),
                _ => None,
            })
    }

    /// Arrival of the first `dpd.state` record with `state` after `since`.
    fn state_after(&self, state: &str, since: Instant) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find_map(|(t, _, b)| match b {
                Body::Dpd(d) if d.tunnel == self.tunnel && d.state == state && *t > since => {
                    Some(*t)
                }
                _ => None,
            })
    }

    /// Arrival of the first `tunnel.state` record with `state` after `since`.
    fn tunnel_after(&self, state: TunnelState, since: Instant) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find_map(|(t, _, b)| match b {
                Body::Tunnel(x) if x.name == self.tunnel && x.state == state && *t > since => {
                    Some(*t)
                }
                _ => None,
            })
    }

    /// Publisher timestamp (`ts_ns`) of the first `dpd.state` record with `state` that
    /// arrived after `since`.
    fn state_ts_after(&self, state: &str, since: Instant) -> Option<u64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find_map(|(t, ts, b)| match b {
                Body::Dpd(d) if d.tunnel == self.tunnel && d.state == state && *t > since => {
                    Some(*ts)
                }
                _ => None,
            })
    }

    /// Whether ikemgr published a `tunnel.state` record with `state` after the publisher
    /// timestamp `since_ts` (another daemon's record: compared by the publishers' clocks).
    fn tunnel_published_after(&self, state: TunnelState, since_ts: u64) -> bool {
        self.seen.lock().unwrap().iter().any(|(_, ts, b)| {
            matches!(b, Body::Tunnel(x) if x.name == self.tunnel && x.state == state && *ts > since_ts)
        })
    }

    /// Publisher timestamps (`ts_ns`) of the first `dead` record and of the instance's
    /// removal.
    fn dead_then_removed_ts(&self) -> (Option<u64>, Option<u64>) {
        let seen = self.seen.lock().unwrap();
        let dead = seen.iter().find_map(|(_, ts, b)| match b {
            Body::Dpd(d) if d.tunnel == self.tunnel && d.state == "dead" => Some(*ts),
            _ => None,
        });
        let removed = seen.iter().find_map(|(_, ts, b)| match b {
            Body::TunnelRemoved { name } if *name == self.tunnel => Some(*ts),
            _ => None,
        });
        (dead, removed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// tcpdump on gwb's `out0`, writing every UDP 4500 packet to a pcap file as it arrives
/// (`--immediate-mode`: without it libpcap hands packets over a ring block at a time, up to a
/// second late, and a reader sees the file behind the wire).
struct Capture {
    file: PathBuf,
    _proc: Proc,
}

impl Capture {
    fn start(gw: &Haven) -> Capture {
        let file = gw.dir.path().join("out0.pcap");
        let mut cmd = gw.ns.command("tcpdump");
        cmd.args([
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "256",
            "-i",
            "out0",
            "-w",
        ])
        .arg(&file)
        .arg("udp port 4500")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let proc = gw.ns.spawn_command(cmd).expect("spawn tcpdump");
        wait_for("tcpdump writing", WAIT, || {
            file.exists()
                .then_some(())
                .ok_or_else(|| "no pcap file yet".to_string())
        });
        // tcpdump writes the file header before it has attached to the interface.
        std::thread::sleep(Duration::from_millis(500));
        Capture { file, _proc: proc }
    }

    /// IKE requests `from` sent (`INFORMATIONAL` or not) as (seconds, exchange, message ID).
    fn ike_requests(&self, from: [u8; 4]) -> Vec<(f64, u8, u32)> {
        let data = std::fs::read(&self.file).unwrap_or_default();
        parse_pcap(&data)
            .into_iter()
            .filter_map(|(ts, frame)| {
                let ike = ike_over_udp_4500(&frame, from)?;
                let exchange = *ike.get(18)?;
                let flags = *ike.get(19)?;
                let mid = u32::from_be_bytes(ike.get(20..24)?.try_into().ok()?);
                (flags & FLAG_RESPONSE == 0).then_some((ts, exchange, mid))
            })
            .collect()
    }
}

/// The records of a classic pcap file (any byte order, µs or ns): (time in s, frame).
fn parse_pcap(data: &[u8]) -> Vec<(f64, Vec<u8>)> {
    let mut out = Vec::new();
    let Some(magic) = data.get(0..4) else {
        return out;
    };
    let (le, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        _ => return out,
    };
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        let x: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        })
    };
    // Link type must be Ethernet (1): veth.
    if u32_at(data, 20) != Some(1) {
        return out;
    }
    let mut at = 24;
    while let (Some(sec), Some(frac), Some(len)) =
        (u32_at(data, at), u32_at(data, at + 4), u32_at(data, at + 8))
    {
        let start = at + 16;
        let Some(frame) = data.get(start..start + len as usize) else {
            break;
        };
        let ts = f64::from(sec) + f64::from(frac) / if nanos { 1e9 } else { 1e6 };
        out.push((ts, frame.to_vec()));
        at = start + len as usize;
    }
    out
}

/// The IKE message in an Ethernet frame carrying IPv4/UDP 4500 from `from` with the
/// non-ESP marker (RFC 3948 §2.2), or `None`.
fn ike_over_udp_4500(frame: &[u8], from: [u8; 4]) -> Option<&[u8]> {
    // Ethernet II, EtherType IPv4.
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 17 || ip.get(12..16)? != from {
        return None;
    }
    let udp = ip.get(ihl..)?;
    if udp.get(0..2)? != 4500u16.to_be_bytes() {
        return None;
    }
    let payload = udp.get(8..)?;
    // The non-ESP marker: four zero octets where ESP has its SPI.
    if payload.get(0..4)? != [0, 0, 0, 0] {
        return None;
    }
    payload.get(4..)
}

fn gwb_addr() -> [u8; 4] {
    SiteToSite::GWB_OUTER
        .parse::<std::net::Ipv4Addr>()
        .expect("address")
        .octets()
}

fn client_conf(dpd_delay: Option<Duration>) -> SwanctlConf {
    let mut conn = Conn::psk(
        "dial",
        SiteToSite::GWA_OUTER,
        SiteToSite::GWB_OUTER,
        PSK.as_bytes(),
    )
    .ids(CLIENT_ID, GW_ID)
    .proposals(&["aes128gcm16-prfsha256-ecp256"])
    .child(
        ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B).esp_proposals(&["aes128gcm16"]),
    );
    if let Some(d) = dpd_delay {
        conn = conn.dpd_delay(d);
    }
    SwanctlConf::new().conn(conn)
}

/// Brings the client's tunnel up and waits until every Haven daemon has it (ikemgr's IKE
/// SA with its CHILD SA, espd's SAs, dpdmon monitoring the instance) and ping passes.
fn tunnel_up(line: &SiteToSite, a: &Charon, gw: &Haven) {
    if let Err(e) = a.initiate("net", WAIT) {
        panic!("initiate failed: {e}\ncharon:\n{}\n{}", a.log(), gw.logs());
    }
    a.wait_child_installed("dial", "net", WAIT)
        .expect("client CHILD SA");
    wait_for("ikemgr lists the IKE SA", WAIT, || {
        let v = gw.ike_list();
        v.as_array()
            .and_then(|l| l.first())
            .filter(|s| s["name"] == INSTANCE)
            .filter(|s| s["children"].as_array().is_some_and(|c| !c.is_empty()))
            .map(|_| ())
            .ok_or_else(|| v.to_string())
    });
    wait_for("dpdmon monitors the instance", WAIT, || {
        let v = gw.dpd_view();
        v.as_array()
            .and_then(|l| l.iter().find(|t| t["name"] == INSTANCE))
            .map(|_| ())
            .ok_or_else(|| format!("{v}\n{}", gw.logs()))
    });
    wait_for("ping through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.routes(), gw.logs()))
    });
}

/// Checks that the instance is gone from every view and its route from gwb.
fn gone_everywhere(gw: &Haven) {
    wait_for("the instance gone from every view", WAIT, || {
        let ike = gw.ike_list();
        let tunnels = gw.tunnel_list();
        let dpd = gw.dpd_view();
        let summary = gw.text(&["get", "vpn", "ipsec", "tunnel", "summary"]);
        let routes = gw.routes();
        let has = |v: &Value, key: &str| {
            v.as_array()
                .is_some_and(|l| l.iter().any(|t| t[key] == INSTANCE))
        };
        let problems: Vec<&str> = [
            (has(&ike, "name"), "ike gateway list"),
            (has(&tunnels["tunnels"], "name"), "tunnel list (espd)"),
            (has(&dpd, "name"), "dpdmon tunnels view"),
            (summary.contains(INSTANCE), "tunnel summary"),
            (
                routes.contains(&format!("{} dev vpn1", SiteToSite::LAN_A)),
                "route",
            ),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "still in {problems:?}\nike: {ike}\ntunnels: {tunnels}\ndpd: {dpd}\nsummary: {summary}\nroutes: {routes}\n{}",
                gw.logs()
            ))
        }
    });
    let snap = match rt().block_on(ctl_call(
        &gw.run,
        DaemonKind::Dpdmon,
        &CtlRequest::Snapshot,
        Duration::from_secs(2),
    )) {
        Ok(CtlReply::Snapshot(s)) => s,
        other => panic!("dpdmon snapshot: {other:?}"),
    };
    assert!(
        !snap
            .items
            .iter()
            .any(|b| matches!(b, Body::Dpd(d) if d.tunnel == INSTANCE)),
        "dpd.state record left: {:?}",
        snap.items
    );
}

/// The last probe round before the verdict: dpdmon asked for attempts 1, 2, 3 of one
/// round, and ikemgr sent all three with one message ID. Returns that message ID.
fn one_round_of_three(tap: &Tap, since: Instant, gw: &Haven) -> u32 {
    let dead_at = tap.first_state("dead").expect("dead verdict");
    let reqs: Vec<_> = tap
        .requests(since)
        .into_iter()
        .filter(|r| r.0 <= dead_at)
        .collect();
    let last = reqs.last().map(|r| r.1).expect("probe requests");
    let round: Vec<_> = reqs.iter().filter(|r| r.1 == last).collect();
    assert_eq!(
        round.iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "one round of three transmissions before the verdict: {reqs:?}\n{}",
        gw.logs()
    );
    let sent: Vec<_> = tap
        .results(since)
        .into_iter()
        .filter(|r| r.0 == last && r.2 == "sent")
        .collect();
    assert_eq!(sent.len(), 3, "ikemgr's results: {sent:?}");
    assert!(
        sent.iter().all(|r| r.1 == sent[0].1),
        "every retry keeps the message ID: {sent:?}"
    );
    eprintln!(
        "dpd round {last}: transmissions at {:?} ms, verdict at {} ms after the first",
        round
            .iter()
            .map(|r| r.0.duration_since(round[0].0).as_millis())
            .collect::<Vec<_>>(),
        dead_at.duration_since(round[0].0).as_millis()
    );
    sent[0].1
}

/// ikemgr's debug lines of the flush, in seed 000's order.
fn flush_story_in_order(gw: &Haven) {
    let log = gw.log("ikemgr");
    let mut at = 0;
    for line in [
        format!("ike 0:{INSTANCE}: DPD declared the peer dead"),
        "expiring IKE SA".to_string(),
        format!("ike 0:{INSTANCE}: deleting"),
        format!("ike 0:{INSTANCE}: flushing"),
        "deleted IPsec SA with SPI".to_string(),
        format!("del route {}", SiteToSite::LAN_A),
        "HA send IKE SA del".to_string(),
        format!("ike 0:{INSTANCE}: sending tunnel down event"),
        format!("ike 0:{INSTANCE}: flushed"),
        format!("ike 0:{INSTANCE}: delete dynamic"),
        format!("ike 0:{INSTANCE}: deleted"),
    ] {
        match log[at..].find(&line) {
            Some(i) => at += i + line.len(),
            None => panic!(
                "{line:?} missing (or out of order) after byte {at} of ikemgr's log:\n{}",
                tail(&log, 80)
            ),
        }
    }
}

/// (a) While idle, our probes are answered; charon SIGKILLed: exactly 3 transmissions of
/// one liveness check on the wire, then the flush everywhere.
#[test]
fn charon_killed_flush_after_exactly_the_configured_probes() {
    require();
    let line = SiteToSite::new("dpss-kill").expect("topology");
    let gw = Haven::start(&line.gwb, "dpss-kill-gw", &gateway_config("on-idle", 3, 2));
    let tap = Tap::new(&gw.run);
    let cap = Capture::start(&gw);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(None)).expect("load client");
    tunnel_up(&line, &a, &gw);

    // vpnctl shows the settings and the time until a silent peer is declared dead.
    let text = gw.text(&["diagnose", "vpn", "tunnel", "list", "name", INSTANCE]);
    assert!(
        text.contains("dpd: mode=on-idle on=1 idle=2000ms retry=3")
            && text.contains("dpd-schedule: fixed dead-after=8000ms"),
        "{text}"
    );

    // 1. Idle: the gateway probes every 2 s of silence and strongSwan answers.
    let t_up = Instant::now();
    wait_for("two answered probes", WAIT, || {
        let r = tap.results(t_up);
        (r.iter().filter(|r| r.2 == "reply").count() >= 2)
            .then_some(())
            .ok_or_else(|| format!("{r:?}\n{}", gw.logs()))
    });
    assert!(tap.first_state("dead").is_none(), "{}", gw.logs());
    // The tap saw the replies; tcpdump writes the packets a moment later.
    wait_for("two probes in the capture", Duration::from_secs(5), || {
        let answered = cap.ike_requests(gwb_addr());
        (answered.iter().filter(|r| r.1 == INFORMATIONAL).count() >= 2)
            .then_some(())
            .ok_or_else(|| format!("probes on the wire: {answered:?}"))
    });
    let charon_log = a.log();
    assert!(
        charon_log.contains("parsed INFORMATIONAL request"),
        "strongSwan saw no probe:\n{charon_log}"
    );
    let sas = a.list_sas().expect("list");
    assert!(
        sas.iter().any(|s| s.state == "ESTABLISHED"),
        "answered probes keep the tunnel: {sas:?}"
    );

    // 2. charon dies without a word.
    let t_kill = Instant::now();
    a.kill().expect("kill charon");
    wait_for("dead verdict", Duration::from_secs(30), || {
        tap.first_state("dead")
            .ok_or_else(|| format!("{:?}\n{}", tap.requests(t_kill), gw.logs()))
    });
    let mid = one_round_of_three(&tap, t_up, &gw);
    gone_everywhere(&gw);
    // ikemgr removed the instance because of dpdmon's verdict: by the publishers' clocks
    // (one host), the removal comes after the verdict.
    let (dead_ts, removed_ts) = tap.dead_then_removed_ts();
    let (dead_ts, removed_ts) = (
        dead_ts.expect("dead record"),
        removed_ts.expect("TunnelRemoved on the bus"),
    );
    assert!(
        removed_ts > dead_ts,
        "removal published at {removed_ts} ns, verdict at {dead_ts} ns"
    );
    eprintln!(
        "flush: ikemgr removed the instance {} ms after dpdmon's verdict",
        (removed_ts - dead_ts) / 1_000_000
    );

    // 3. On the wire: that message ID went out exactly 3 times, and after the kill nothing
    //    else was asked of the dead peer.
    let reqs = cap.ike_requests(gwb_addr());
    let of_round: Vec<_> = reqs.iter().filter(|r| r.2 == mid).collect();
    assert_eq!(
        of_round.len(),
        3,
        "transmissions of message ID {mid}: {of_round:?} (all requests: {reqs:?})"
    );
    assert!(of_round.iter().all(|r| r.1 == INFORMATIONAL));
    let last_before = reqs.iter().filter(|r| r.2 < mid).count();
    assert_eq!(
        reqs.len(),
        last_before + 3,
        "nothing after the dead round: {reqs:?}"
    );
    eprintln!(
        "dpd on the wire: message ID {mid} at {:?} s",
        of_round
            .iter()
            .map(|r| format!("{:.2}", r.0 - of_round[0].0))
            .collect::<Vec<_>>()
    );

    // 4. Metrics and the debug story.
    gw.wait_dead_metric();
    assert!(gw.dpd_metric("dpdmon_probe_replies_total").unwrap_or(0.0) >= 2.0);
    flush_story_in_order(&gw);
    let dlog = gw.log("dpdmon");
    for want in [
        format!("dpd 0:{INSTANCE}: link is idle"),
        format!("dpd 0:{INSTANCE}: send IKEv2 DPD probe, seqno {mid}"),
        "negotiation of IKE SA failed due to retry timeout".to_string(),
    ] {
        assert!(dlog.contains(&want), "{want:?} missing from dpdmon's log");
    }
    assert!(
        line.client.ping(SiteToSite::SERVER, 1).is_err(),
        "path must close with the tunnel"
    );
}

/// (b) The link is cut: the same verdict and flush; probes counted on gwb's output.
#[test]
fn link_cut_flush_after_exactly_the_configured_probes() {
    require();
    let line = SiteToSite::new("dpss-cut").expect("topology");
    let gw = Haven::start(&line.gwb, "dpss-cut-gw", &gateway_config("on-idle", 3, 2));
    let tap = Tap::new(&gw.run);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(None)).expect("load client");
    tunnel_up(&line, &a, &gw);
    // Count IKE INFORMATIONAL requests (non-ESP marker, exchange type 37, Response flag
    // clear) leaving gwb for UDP 4500, whatever happens to them on the link.
    gw.ns
        .nft(
            "table inet dpdcount {
               chain out {
                 type filter hook output priority 0; policy accept;
                 udp dport 4500 @th,64,32 0 @th,240,8 37 @th,248,8 & 0x20 == 0x00 counter
               }
             }",
        )
        .expect("nft counter");
    let t_up = Instant::now();
    wait_for("an answered probe", WAIT, || {
        let r = tap.results(t_up);
        r.iter()
            .any(|r| r.2 == "reply")
            .then_some(())
            .ok_or_else(|| format!("{r:?}\n{}", gw.logs()))
    });
    let counted = |gw: &Haven| -> u64 {
        let out = gw
            .ns
            .run("nft", &["list", "chain", "inet", "dpdcount", "out"])
            .unwrap_or_default();
        out.split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(counted(&gw) >= 1, "the counter sees probes");

    // Cut the link on the peer's side right after a reply (the next round is 2 s of
    // silence away, so no probe is in flight between the counter and the tap's marks);
    // wait for the verdict.
    let replies = || tap.results(t_up).iter().filter(|r| r.2 == "reply").count();
    let seen = replies();
    wait_for("a fresh reply", WAIT, || {
        (replies() > seen).then_some(()).ok_or_else(|| gw.logs())
    });
    let before_cut = counted(&gw);
    let t_cut = Instant::now();
    line.gwa
        .ip(&["link", "set", "out0", "down"])
        .expect("link down");
    wait_for("dead verdict", Duration::from_secs(30), || {
        tap.first_state("dead")
            .ok_or_else(|| format!("{:?}\n{}", tap.requests(t_cut), gw.logs()))
    });
    one_round_of_three(&tap, t_up, &gw);
    gone_everywhere(&gw);
    // Every transmission after the cut is of the dead round.
    let after: Vec<_> = tap
        .results(t_cut)
        .into_iter()
        .filter(|r| r.2 == "sent")
        .collect();
    let on_output = counted(&gw) - before_cut;
    assert_eq!(
        on_output,
        after.len() as u64,
        "every probe ikemgr reported sent left gwb: {after:?}"
    );
    assert_eq!(on_output, 3, "one round of three after the cut: {after:?}");
    gw.wait_dead_metric();
    flush_story_in_order(&gw);
    drop(a);
}

/// (c) strongSwan's own liveness checks are answered and keep its SA; they are proof of
/// life for us too, so our on-idle gateway never probes.
#[test]
fn strongswan_dpd_is_answered_and_counts_as_proof_of_life() {
    require();
    let line = SiteToSite::new("dpss-ssd").expect("topology");
    let gw = Haven::start(&line.gwb, "dpss-ssd-gw", &gateway_config("on-idle", 3, 5));
    let tap = Tap::new(&gw.run);
    let cap = Capture::start(&gw);
    // An unanswered check would close charon's SA after 1 + 1 + 1 s of retransmissions.
    let mut a = Charon::start_with(
        &line.gwa,
        "retransmit_tries = 2\nretransmit_timeout = 1\nretransmit_base = 1.0",
    )
    .expect("charon in gwa");
    a.load(&client_conf(Some(Duration::from_secs(2))))
        .expect("load client");
    tunnel_up(&line, &a, &gw);
    let spis = a.list_sas().expect("list")[0].spis();
    let t_up = Instant::now();
    std::thread::sleep(Duration::from_secs(16));

    let log = a.log();
    let requests = log.matches("generating INFORMATIONAL request").count();
    let responses = log.matches("parsed INFORMATIONAL response").count();
    eprintln!("strongSwan DPD: {requests} requests, {responses} responses in 16 s");
    assert!(requests >= 4, "strongSwan sent too few checks:\n{log}");
    assert!(
        responses + 1 >= requests,
        "unanswered checks: {requests} requests, {responses} responses\n{log}\n{}",
        gw.logs()
    );
    let sas = a.list_sas().expect("list");
    assert!(
        sas.iter()
            .any(|s| s.state == "ESTABLISHED" && s.spis() == spis),
        "strongSwan's SA must stay up: {sas:?}\n{log}"
    );
    // Our side: the checks are proof of life; no probe in 16 s with a 5 s idle interval.
    assert!(
        tap.requests(t_up).is_empty(),
        "we probed a peer that talks to us: {:?}\n{}",
        tap.requests(t_up),
        gw.logs()
    );
    let ours = cap.ike_requests(gwb_addr());
    assert!(ours.is_empty(), "our requests on the wire: {ours:?}");
    assert!(tap.first_state("dead").is_none());
    let v = gw.dpd_view();
    let row = v
        .as_array()
        .and_then(|l| l.iter().find(|t| t["name"] == INSTANCE))
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["state"], "idle", "{row}");
    assert!(
        row["silent_ms"].as_u64().unwrap_or(u64::MAX) < 5_000,
        "{row}"
    );
    line.client
        .ping(SiteToSite::SERVER, 1)
        .expect("the tunnel still carries traffic");
}

/// (d) With traffic flowing, on-idle sends no probe; when it stops, probes start. The
/// gateway uses the exponential schedule from its config (`dpd-backoff exponential`,
/// initial 1 s, max 2 s: a silent peer is dead after 2 + 1 + 2 + 2 = 7 s), which
/// `vpnctl` shows.
#[test]
fn on_idle_sends_no_probe_while_traffic_flows() {
    require();
    let line = SiteToSite::new("dpss-trf").expect("topology");
    let conf = gateway_config_with(
        "on-idle",
        3,
        2,
        "        set dpd-backoff exponential\n        set dpd-backoff-initial 1\n        set dpd-backoff-max 2\n",
    );
    let gw = Haven::start(&line.gwb, "dpss-trf-gw", &conf);
    let tap = Tap::new(&gw.run);
    let cap = Capture::start(&gw);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(None)).expect("load client");
    tunnel_up(&line, &a, &gw);

    let text = gw.text(&["diagnose", "vpn", "tunnel", "list", "name", INSTANCE]);
    assert!(
        text.contains("dpd-schedule: exponential initial=1000ms max=2000ms dead-after=7000ms"),
        "{text}"
    );
    let mut cmd = line.client.command("ping");
    cmd.args(["-n", "-q", "-i", "0.2", "-W", "1", SiteToSite::SERVER])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut ping = line.client.spawn_command(cmd).expect("ping");
    // Let a probe of the idle moments before the ping started finish.
    std::thread::sleep(Duration::from_secs(3));
    let t_traffic = Instant::now();
    let wire_before = cap.ike_requests(gwb_addr()).len();
    std::thread::sleep(Duration::from_secs(12));
    let probes = tap.requests(t_traffic);
    assert!(
        probes.is_empty(),
        "probes while traffic flows (idle 2 s): {probes:?}\n{}",
        gw.logs()
    );
    assert_eq!(
        cap.ike_requests(gwb_addr()).len(),
        wire_before,
        "IKE requests on the wire while traffic flows"
    );

    // The traffic stops: within a few idle intervals the gateway probes, and strongSwan
    // answers.
    ping.kill_now().expect("stop ping");
    let t_quiet = Instant::now();
    wait_for("a probe once traffic stops", WAIT, || {
        let r = tap.results(t_quiet);
        r.iter()
            .any(|r| r.2 == "reply")
            .then_some(())
            .ok_or_else(|| format!("{r:?}\n{}", gw.logs()))
    });
    assert!(tap.first_state("dead").is_none());
    drop(a);
}

/// (e) `set dpd periodic` (Cisco): probes every interval even while traffic flows, and
/// strongSwan's answers keep the tunnel up.
#[test]
fn periodic_probes_while_traffic_flows_and_answers_keep_the_tunnel() {
    require();
    let line = SiteToSite::new("dpss-per").expect("topology");
    let gw = Haven::start(&line.gwb, "dpss-per-gw", &gateway_config("periodic", 2, 2));
    let tap = Tap::new(&gw.run);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(None)).expect("load client");
    tunnel_up(&line, &a, &gw);
    let text = gw.text(&["diagnose", "vpn", "tunnel", "list", "name", INSTANCE]);
    assert!(
        text.contains("dpd: mode=periodic on=1 idle=2000ms retry=2")
            && text.contains("dpd-schedule: fixed dead-after=6000ms"),
        "{text}"
    );
    let mut cmd = line.client.command("ping");
    cmd.args(["-n", "-q", "-i", "0.2", "-W", "1", SiteToSite::SERVER])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ping = line.client.spawn_command(cmd).expect("ping");
    let t_traffic = Instant::now();
    wait_for("three answered probes while traffic flows", WAIT, || {
        let r = tap.results(t_traffic);
        (r.iter().filter(|r| r.2 == "reply").count() >= 3)
            .then_some(())
            .ok_or_else(|| format!("{r:?}\n{}", gw.logs()))
    });
    assert!(tap.first_state("dead").is_none(), "{}", gw.logs());
    let sas = a.list_sas().expect("list");
    assert!(sas.iter().any(|s| s.state == "ESTABLISHED"), "{sas:?}");
    line.client
        .ping(SiteToSite::SERVER, 1)
        .expect("the tunnel still carries traffic");
    drop(a);
}

/// Haven's static gateway `vpn1` (initiator, `auto-negotiate`, NAT-T forced for
/// kernel-libipsec) towards a strongSwan responder in gwa.
fn static_config() -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type static
        set remote-gw {}
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
        set nattraversal forced
        set dpd on-idle
        set dpd-retrycount 3
        set dpd-retryinterval 2
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::GWA_OUTER,
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

/// (f) A static tunnel: the dead verdict flushes it to `down` (route and SAs gone, DPD
/// record back to the configured one); when strongSwan comes back, Haven negotiates again
/// and dpdmon monitors the new IKE SA afresh.
#[test]
fn static_tunnel_goes_down_then_comes_back_monitored_afresh() {
    require();
    let line = SiteToSite::new("dpss-st").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(
        &SwanctlConf::new().conn(
            Conn::psk(
                "gw",
                SiteToSite::GWA_OUTER,
                SiteToSite::GWB_OUTER,
                PSK.as_bytes(),
            )
            .ids(CLIENT_ID, GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
        ),
    )
    .expect("load responder");
    let gw = Haven::start(&line.gwb, "dpss-st-gw", &static_config());
    let tap = Tap::for_tunnel(&gw.run, "vpn1");
    let monitored = |what: &str| {
        wait_for(what, WAIT, || {
            let v = gw.dpd_view();
            v.as_array()
                .and_then(|l| l.iter().find(|t| t["name"] == "vpn1"))
                .filter(|t| t["state"] != "dead")
                .cloned()
                .ok_or_else(|| format!("{v}\n{}", gw.logs()))
        })
    };
    monitored("dpdmon monitors vpn1");
    wait_for("ping through the static tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", gw.logs()))
    });

    let t_kill = Instant::now();
    a.kill().expect("kill charon");
    wait_for("dead verdict", Duration::from_secs(30), || {
        tap.state_after("dead", t_kill)
            .ok_or_else(|| format!("{:?}\n{}", tap.requests(t_kill), gw.logs()))
    });
    let dead_at = tap.state_after("dead", t_kill).unwrap();
    let dead_ts = tap.state_ts_after("dead", t_kill).unwrap();
    wait_for("tunnel down, record back to idle", WAIT, || {
        match (
            tap.tunnel_published_after(TunnelState::Down, dead_ts),
            tap.state_after("idle", dead_at),
        ) {
            (true, Some(_)) => Ok(()),
            other => Err(format!("{other:?}\n{}", gw.logs())),
        }
    });
    wait_for("route and SAs gone", WAIT, || {
        let routes = gw.routes();
        let tunnels = gw.tunnel_list();
        let sas = tunnels["tunnels"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|t| t["sas"].as_array().is_some_and(|s| !s.is_empty()))
                    .count()
            })
            .unwrap_or(0);
        (!routes.contains(&format!("{} dev vpn1", SiteToSite::LAN_A)) && sas == 0)
            .then_some(())
            .ok_or_else(|| format!("{routes}\n{tunnels}"))
    });
    let ike = gw.ike_list();
    assert!(
        ike.as_array()
            .is_some_and(|l| l.iter().all(|s| s["established"] == false)),
        "{ike}"
    );

    // strongSwan is back: Haven negotiates again; the new IKE SA is monitored afresh.
    // Haven's attempt started while strongSwan was gone retransmits its IKE_SA_INIT after
    // 2, 4, 8, 16 and 32 s, then a new attempt follows 5 s later: the restarted strongSwan
    // answers the next transmission, which can be up to ~40 s away.
    let t_back = Instant::now();
    a.restart().expect("restart charon");
    let up_at = wait_for("tunnel up again", Duration::from_secs(75), || {
        tap.tunnel_after(TunnelState::Up, t_back)
            .ok_or_else(|| gw.logs())
    });
    eprintln!(
        "static tunnel: up again {} ms after strongSwan restarted",
        up_at.duration_since(t_back).as_millis()
    );
    let row = monitored("vpn1 monitored again");
    assert_eq!(row["dead_after_ms"], 8_000, "{row}");
    wait_for("ping through the new tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", gw.logs()))
    });
    wait_for("a probe of the new SA answered", WAIT, || {
        let r = tap.results(t_back);
        r.iter()
            .any(|r| r.2 == "reply")
            .then_some(())
            .ok_or_else(|| format!("{r:?}\n{}", gw.logs()))
    });
    assert!(
        tap.state_after("dead", dead_at).is_none(),
        "declared dead again: {}",
        gw.logs()
    );
}
