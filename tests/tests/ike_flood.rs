//! IKE_SA_INIT flood (issue 8, ops/ATTACKS.md): while a flooder in gwa sends IKE_SA_INIT
//! requests with valid proposals and x25519 KE values from 4096 spoofed source addresses at
//! Haven's dial-up gateway (ikemgr + espd in gwb), a strongSwan client in gwa connects,
//! gets its tunnel and disconnects again, over and over.
//!
//! Checks: at least 99% of the client's attempts succeed, COOKIEs engage
//! (`ikemgr_cookies_sent_total` grows), half-open SAs stay at the COOKIE threshold
//! (`ikemgr_half_open_sas`), and ikemgr's memory stays bounded. Prints the flood rate reached
//! and the counters.
//!
//! ```text
//! client - gwa (charon + flooder, sources 100.64.0.0/20) 172.31.0.1 ==== 172.31.0.2 gwb (ikemgr+espd)
//! ```
//!
//! Needs root, iproute2, python3 and the strongSwan packages (INTEROP.md).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use haven_tests::daemons::{bin, vpnctl_json, wait_for};
use haven_tests::netns::{Netns, Proc, ScratchDir, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};

const PSK: &str = "haven-ike-flood-psk-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";
const METRICS_PORT: u16 = 19741;
/// Client connect/disconnect rounds under the flood.
const ATTEMPTS: usize = 100;
/// Flood packets per second asked of the flooder (the machine is shared: keep it modest).
const FLOOD_PPS: u32 = 3000;
/// ikemgr's COOKIE threshold (ike_proto::cookie::GuardConfig::default).
const COOKIE_THRESHOLD: u64 = 30;

/// Spoofed IKE_SA_INIT requests over a raw socket: AES-GCM-16/128, PRF-HMAC-SHA256,
/// x25519 (RFC 7296 §3.3, RFC 8031), a fresh SPI, nonce and KE value each time. Writes the
/// number sent to argv[4] every second.
const FLOODER: &str = r#"
import os, socket, struct, sys, time
dst, rate, secs, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def transform(last, ttype, tid, attrs=b""):
    return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), ttype, 0, tid) + attrs
ts = transform(False, 1, 20, struct.pack("!HH", 0x800E, 128)) + transform(False, 2, 5) + transform(True, 4, 31)
prop = struct.pack("!BBHBBBB", 0, 0, 8 + len(ts), 1, 1, 0, 3) + ts
sa = struct.pack("!BBH", 34, 0, 4 + len(prop)) + prop
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
dst_b = socket.inet_aton(dst)
sent, start, last_report = 0, time.time(), 0.0
while time.time() - start < secs:
    for _ in range(100):
        i = sent % 4096
        src = bytes([100, 64, i >> 8, i & 255])
        ke = struct.pack("!BBHHH", 40, 0, 8 + 32, 31, 0) + os.urandom(32)
        nonce = struct.pack("!BBH", 0, 0, 4 + 32) + os.urandom(32)
        body = sa + ke + nonce
        ike = os.urandom(8) + bytes(8) + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28 + len(body)) + body
        udp = struct.pack("!HHHH", 500, 500, 8 + len(ike), 0) + ike
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst_b) + udp
        try:
            s.sendto(ip, (dst, 0))
            sent += 1
        except OSError:
            pass
    ahead = sent / rate - (time.time() - start)
    if ahead > 0:
        time.sleep(ahead)
    if time.time() - last_report >= 1.0:
        last_report = time.time()
        with open(out + ".tmp", "w") as f:
            f.write("%d %f\n" % (sent, time.time() - start))
        os.replace(out + ".tmp", out)
"#;

struct Haven {
    ns: Netns,
    dir: ScratchDir,
    run: PathBuf,
    procs: Vec<Proc>,
}

impl Haven {
    fn start(ns: &Netns) -> Haven {
        let dir = ScratchDir::new("ikflood-gw").expect("scratch dir");
        let run = dir.path().join("run");
        let conf = dir.path().join("haven.conf");
        std::fs::write(
            &conf,
            format!(
                "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 31
        set localid \"{GW_ID}\"
        set dpd disable
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
                SiteToSite::LAN_B,
                SiteToSite::LAN_A
            ),
        )
        .expect("write config");
        let mut procs = Vec::new();
        for (daemon, port) in [("ikemgr", METRICS_PORT), ("espd", METRICS_PORT + 3)] {
            let f = std::fs::File::create(dir.path().join(format!("{daemon}.log"))).expect("log");
            let mut cmd: Command = ns.command(bin(daemon));
            cmd.arg("--config")
                .arg(&conf)
                .arg("--run-dir")
                .arg(&run)
                .args(["--log-level", "info"])
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(f);
            procs.push(ns.spawn_command(cmd).expect("spawn daemon"));
        }
        Haven {
            ns: ns.clone(),
            dir,
            run,
            procs,
        }
    }

    fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log"))).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        self.ns
            .run(
                "curl",
                &["-s", &format!("http://127.0.0.1:{METRICS_PORT}/metrics")],
            )
            .unwrap_or_default()
    }

    /// ikemgr's resident memory in KiB.
    fn ikemgr_rss_kib(&mut self) -> u64 {
        let pid = self.procs[0].id();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn ike_sa_init_flood_from_spoofed_sources_while_strongswan_reconnects() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let line = SiteToSite::new("ikflood").expect("topology");
    // Replies to the spoofed sources go back to gwa (where nobody listens), and strict
    // reverse-path filtering in gwb accepts them.
    line.gwb
        .add_route("100.64.0.0/20", SiteToSite::GWA_OUTER)
        .expect("route");
    let mut gw = Haven::start(&line.gwb);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(
        &SwanctlConf::new().conn(
            Conn::psk(
                "dial",
                SiteToSite::GWA_OUTER,
                SiteToSite::GWB_OUTER,
                PSK.as_bytes(),
            )
            .ids(CLIENT_ID, GW_ID)
            .proposals(&["aes128gcm16-prfsha256-x25519"])
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
        ),
    )
    .expect("load client");
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    // Baseline: one connection without the flood.
    a.initiate("net", WAIT).expect("baseline connection");
    a.terminate_ike("dial", WAIT).expect("terminate");
    let rss_before = gw.ikemgr_rss_kib();

    let scratch = ScratchDir::new("ikflood-flooder").expect("scratch");
    let script = scratch.path().join("flood.py");
    let count_file = scratch.path().join("sent");
    std::fs::write(&script, FLOODER).expect("write flooder");
    let mut flooder = line
        .gwa
        .spawn(
            "python3",
            &[
                script.to_str().unwrap(),
                SiteToSite::GWB_OUTER,
                &FLOOD_PPS.to_string(),
                "600",
                count_file.to_str().unwrap(),
            ],
        )
        .expect("spawn flooder");
    wait_for("COOKIEs engage", WAIT, || {
        let m = gw.metrics();
        (metric(&m, "ikemgr_cookies_sent_total") > 0)
            .then_some(())
            .ok_or_else(|| format!("{m}\n{}", gw.log("ikemgr")))
    });

    let t0 = Instant::now();
    let mut ok = 0;
    let mut failures = Vec::new();
    let mut max_half_open = 0;
    for i in 0..ATTEMPTS {
        match a.initiate("net", WAIT) {
            Ok(_) => ok += 1,
            Err(e) => failures.push(format!("attempt {i}: {e}")),
        }
        max_half_open = max_half_open.max(metric(&gw.metrics(), "ikemgr_half_open_sas"));
        let _ = a.terminate_ike("dial", WAIT);
    }
    let client_time = t0.elapsed();
    let m = gw.metrics();
    let rss_after = gw.ikemgr_rss_kib();
    let (sent, secs) = std::fs::read_to_string(&count_file)
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace();
            Some((
                it.next()?.parse::<u64>().ok()?,
                it.next()?.parse::<f64>().ok()?,
            ))
        })
        .unwrap_or((0, 1.0));
    assert!(flooder.is_running(), "flooder stopped early");
    let _ = flooder.kill_now();
    let cookies = metric(&m, "ikemgr_cookies_sent_total");
    let half_open = metric(&m, "ikemgr_half_open_sas");
    println!(
        "IKE flood: {sent} spoofed IKE_SA_INIT in {secs:.1} s ({:.0}/s asked {FLOOD_PPS}/s) from 4096 sources; \
         strongSwan: {ok}/{ATTEMPTS} connections in {:.1} s; COOKIE replies {cookies}; \
         half-open now {half_open}, max seen {max_half_open}; ikemgr RSS {rss_before} -> {rss_after} KiB; \
         drops: {}",
        sent as f64 / secs.max(0.001),
        client_time.as_secs_f64(),
        m.lines()
            .filter(|l| l.starts_with("ikemgr_drops_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        failures.len() * 100 <= ATTEMPTS,
        "{} of {ATTEMPTS} connections failed under the flood: {failures:?}\ncharon:\n{}",
        failures.len(),
        a.log()
    );
    assert!(
        cookies > sent / 2,
        "COOKIEs did not answer the flood: {cookies} for {sent}"
    );
    // The client's own half-open SA can come on top of the threshold.
    assert!(
        max_half_open <= COOKIE_THRESHOLD + 1,
        "half-open SAs not bounded: {max_half_open}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "ikemgr memory grew from {rss_before} to {rss_after} KiB"
    );
    // After the flood the gateway still serves, and lists no stale instance.
    a.initiate("net", WAIT).expect("connection after the flood");
    let v = vpnctl_json(&gw.run, &["diagnose", "vpn", "ike", "gateway", "list"]).expect("list");
    assert!(
        v.as_array()
            .is_some_and(|l| l.iter().filter(|s| s["established"] == true).count() == 1),
        "{v}"
    );
}
