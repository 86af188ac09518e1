//! espd carrying a strongSwan dial-up client's traffic: a continuous ping through CHILD SA
//! rekeys started by each side loses nothing (counted exactly from ping's own summary), and
//! espd counts no replay or ICV drop.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (ikemgr+espd) - 10.99.2.2 server
//! ```
//!
//! Needs root, iproute2, iputils-ping and the strongSwan packages (see INTEROP.md); without
//! them the tests FAIL naming what is missing.

mod espd_common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use espd_common::parse_ping;
use haven_tests::daemons::{bin, vpnctl_json, wait_for};
use haven_tests::gateway::{require_strongswan as require, Gateway};
use haven_tests::netns::{Netns, Proc, ScratchDir, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-espd-strongswan-psk-0123456789";
const WAIT: Duration = Duration::from_secs(20);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";

haven_tests::gateway_newtype!(
    /// Our dial-up gateway in gwb: ikemgr and espd, each with its own log.
    Haven
);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [("ikemgr", "127.0.0.1:19701"), ("espd", "127.0.0.1:19704")];
        Haven(Gateway::start(ns, label, conf_text, &daemons, WAIT))
    }

    /// espd's datapath-wide drop counter for `reason`.
    fn drops(&self, reason: &str) -> u64 {
        self.tunnel_list()["drops"][reason].as_u64().unwrap_or(0)
    }

    /// How many CHILD SAs ikemgr installed as the rekey of another.
    fn rekeys(&self) -> usize {
        self.log("ikemgr").matches(", replaces ").count()
    }
}

/// Haven's dial-up gateway `vpn1` (AES-GCM), phase2 lines added as given.
fn gateway_config(phase2_extra: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
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
{phase2_extra}        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

/// Starts charon in gwa as a dial-up client with `child`, brings the tunnel up and waits for
/// a first ping to pass.
fn client_up(line: &SiteToSite, gw: &Haven, child: ChildCfg) -> Charon {
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
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(child.esp_proposals(&["aes128gcm16"])),
        ),
    )
    .expect("load client");
    if let Err(e) = a.initiate("net", WAIT) {
        panic!(
            "initiate failed: {e}\ncharon:\n{}\nikemgr:\n{}",
            a.log(),
            gw.log("ikemgr")
        );
    }
    a.wait_child_installed("dial", "net", WAIT)
        .expect("client CHILD SA");
    wait_for("first ping through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "{e}\nikemgr:\n{}\nespd:\n{}",
                    gw.log("ikemgr"),
                    gw.log("espd")
                )
            })
    });
    a
}

/// A ping of `count` echo requests every `interval_ms` from the client to the server, its
/// output kept in the scratch directory.
struct Pinger {
    proc: Proc,
    out: PathBuf,
    count: u32,
}

impl Pinger {
    fn start(line: &SiteToSite, dir: &ScratchDir, count: u32, interval_ms: u32) -> Pinger {
        let out = dir.path().join("ping.out");
        let f = std::fs::File::create(&out).expect("ping output");
        let mut cmd = line.client.command("ping");
        cmd.args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            &format!("0.{interval_ms:03}"),
            "-W",
            "2",
            SiteToSite::SERVER,
        ])
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(Stdio::null());
        Pinger {
            proc: line.client.spawn_command(cmd).expect("spawn ping"),
            out,
            count,
        }
    }

    /// Waits for ping to finish and returns (transmitted, received) from its summary line
    /// (`N packets transmitted, M received, …`).
    fn finish(mut self, limit: Duration) -> (u64, u64, String) {
        let done = self.proc.wait_timeout(limit).expect("wait for ping");
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(done.is_some(), "ping still running after {limit:?}: {text}");
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no summary in ping's output: {text:?}"))
            .to_string();
        let num = |key: &str| -> u64 {
            line.split(',')
                .find(|p| p.contains(key))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {key:?} count in {line:?}"))
        };
        let (tx, rx) = (num("transmitted"), num("received"));
        assert_eq!(tx, u64::from(self.count), "{text}");
        (tx, rx, text)
    }
}

/// Checks the end state shared by the rekey tests: every echo answered, no replay or ICV drop
/// in espd, at least `want` rekeys seen by ikemgr.
fn assert_no_loss(gw: &Haven, a: &Charon, ping: Pinger, limit: Duration, want: usize) {
    let (tx, rx, text) = ping.finish(limit);
    let rekeys = gw.rekeys();
    let list = gw.tunnel_list();
    let ctx = || {
        format!(
            "ping: {text}\nrekeys seen by ikemgr: {rekeys}\ntunnel list: {list:#}\nikemgr:\n{}\nespd:\n{}\ncharon:\n{}",
            gw.log("ikemgr"),
            gw.log("espd"),
            a.log()
        )
    };
    assert!(rekeys >= want, "expected {want} rekeys\n{}", ctx());
    assert_eq!(rx, tx, "lost pings across rekeys\n{}", ctx());
    assert_eq!(gw.drops("replay"), 0, "replay drops\n{}", ctx());
    assert_eq!(gw.drops("icv"), 0, "ICV drops\n{}", ctx());
}

/// strongSwan rekeys the CHILD SA every 8 s (`rekey_time`, no jitter): a 30 s ping at
/// 20 packets a second loses nothing across at least three rekeys.
#[test]
fn ping_loses_nothing_across_strongswan_child_rekeys() {
    require();
    let line = SiteToSite::new("esrk").expect("topology");
    let gw = Haven::start(&line.gwb, "esrk-gw", &gateway_config(""));
    let child = ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
        .rekey_time(Duration::from_secs(8))
        .rand_time(Duration::ZERO)
        .life_time(Duration::from_secs(60));
    let a = client_up(&line, &gw, child);
    let base = gw.rekeys();
    let ping = Pinger::start(&line, &gw.dir, 600, 50);
    let t0 = Instant::now();
    assert_no_loss(&gw, &a, ping, Duration::from_secs(90), base + 3);
    eprintln!(
        "30 s of ping through strongSwan rekeys took {:?}",
        t0.elapsed()
    );
}

/// Our own lifetime (`keylifeseconds 120`, the FortiOS minimum) makes ikemgr rekey the CHILD
/// SA (ikemgr rekeys 80-90 s in); a ping running across it loses nothing.
#[test]
fn ping_loses_nothing_across_our_child_rekey() {
    require();
    let line = SiteToSite::new("esor").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "esor-gw",
        &gateway_config("        set keylifeseconds 120\n"),
    );
    let child = ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B);
    let a = client_up(&line, &gw, child);
    // 100 s at 20 a second covers ikemgr's rekey at 80-90 s.
    let ping = Pinger::start(&line, &gw.dir, 2000, 50);
    assert_no_loss(&gw, &a, ping, Duration::from_secs(170), 1);
}

/// Runs iperf3 TCP from the client to the server (`reverse`: the server sends) for `secs`
/// seconds; returns the bytes the receiver got.
fn iperf3(line: &SiteToSite, secs: u32, reverse: bool) -> u64 {
    haven_tests::member::iperf3_tcp(&line.client, SiteToSite::SERVER, secs, reverse)
}

/// The `SA … removed: in P packets B bytes, out P packets B bytes` lines of espd's log:
/// (inbound bytes, outbound bytes) per removed SA.
fn removed_sa_bytes(espd_log: &str) -> Vec<(u64, u64)> {
    espd_log
        .lines()
        .filter(|l| l.contains(" removed: in "))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str, from: usize| -> Option<u64> {
                let i = w.iter().skip(from).position(|x| *x == key)? + from;
                w.get(i + 3)?.trim_end_matches(',').parse().ok()
            };
            let i_in = w.iter().position(|x| *x == "in")?;
            let i_out = w.iter().position(|x| *x == "out")?;
            Some((after("in", i_in)?, after("out", i_out)?))
        })
        .collect()
}

/// Phase2 `keylife-type kbs` with `keylifekbs 5120` (the FortiOS minimum): iperf3 TCP in
/// both directions through the strongSwan client and our gateway moves many times that
/// volume. espd reports the byte limits (`EspExpire`), ikemgr rekeys on them, data keeps
/// flowing, and no SA carried more than its hard limit (one packet per worker of slack: the
/// check comes before each packet).
#[test]
fn iperf3_both_ways_through_volume_lifetimes() {
    require();
    let line = SiteToSite::new("eskb").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "eskb-gw",
        &gateway_config("        set keylife-type kbs\n        set keylifekbs 5120\n"),
    );
    let child = ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B);
    let a = client_up(&line, &gw, child);
    let _server = line
        .server
        .spawn("iperf3", &["-s", "-B", SiteToSite::SERVER])
        .expect("iperf3 server");
    wait_for("iperf3 server listening", WAIT, || {
        let ss = line
            .server
            .run("ss", &["-ltn"])
            .map_err(|e| e.to_string())?;
        ss.contains(":5201").then_some(()).ok_or(ss)
    });
    let hard: u64 = 5120 * 1024;
    let up = iperf3(&line, 4, false);
    let down = iperf3(&line, 4, true);
    let log = gw.log("espd");
    let ctx = || {
        format!(
            "up {up} B, down {down} B\nikemgr:\n{}\nespd:\n{log}\ncharon:\n{}",
            gw.log("ikemgr"),
            a.log()
        )
    };
    assert!(
        up > 2 * hard && down > 2 * hard,
        "too little data\n{}",
        ctx()
    );
    assert!(
        log.contains("lifetime reached (bytes)"),
        "espd reported no byte limit\n{}",
        ctx()
    );
    assert!(
        gw.log("ikemgr")
            .contains("lifetime reached (bytes), rekeying"),
        "ikemgr did not act on espd's report\n{}",
        ctx()
    );
    assert!(gw.rekeys() >= 2, "{} rekeys\n{}", gw.rekeys(), ctx());
    let removed = removed_sa_bytes(&log);
    assert!(!removed.is_empty(), "no SA removed\n{}", ctx());
    let slack = 2 * 1500;
    for (i, o) in &removed {
        assert!(
            *i <= hard + slack && *o <= hard + slack,
            "an SA carried more than its hard limit {hard}: in {i}, out {o}\n{}",
            ctx()
        );
    }
    assert_eq!(gw.drops("replay"), 0, "replay drops\n{}", ctx());
    assert_eq!(gw.drops("icv"), 0, "ICV drops\n{}", ctx());
    let most = removed.iter().map(|(i, o)| (*i).max(*o)).max().unwrap_or(0);
    eprintln!(
        "iperf3 through volume lifetimes: up {up} B, down {down} B, {} rekeys, {} SAs removed, \
         most bytes on one SA {most} (hard {hard})",
        gw.rekeys(),
        removed.len()
    );
}

/// A stateless NAT in gwa that shows charon's UDP 4500 to the gateway as port `port` (and
/// maps replies back); applying it again with another port changes the mapping at once.
fn nat_port(line: &SiteToSite, port: u16) {
    line.gwa
        .nft(&format!(
            "table ip hvnat
flush table ip hvnat
table ip hvnat {{
  chain out {{
    type filter hook postrouting priority 0; policy accept;
    oifname \"out0\" udp sport 4500 udp sport set {port}
  }}
  chain in {{
    type filter hook prerouting priority -300; policy accept;
    iifname \"out0\" udp dport {port} udp dport set 4500
  }}
}}"
        ))
        .expect("nft NAT rules in gwa");
}

/// The dial-up instance `vpn1_1` in espd's tunnel list.
fn esp_tunnel(gw: &Haven) -> Value {
    let v = gw.tunnel_list();
    v["tunnels"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "vpn1_1"))
        .cloned()
        .unwrap_or_else(|| panic!("no vpn1_1 in {v:#}"))
}

/// The client's NAT mapping changes port under a running ping: espd follows the first
/// authenticated ESP packet from the new port (RFC 3948) and the ping goes on; ikemgr follows
/// the client's next IKE message (a DPD request, RFC 7296 §2.23) and re-publishes the SAs with
/// the new port. Before that, an ESP-in-UDP packet with the right SPI but no valid ICV, from
/// another port, changes nothing; raw ESP for the UDP-encapsulated SA is refused and counted.
#[test]
fn nat_mapping_change_is_followed_after_authentication_only() {
    require();
    let line = SiteToSite::new("esnat").expect("topology");
    nat_port(&line, 14500);
    let gw = Haven::start(&line.gwb, "esnat-gw", &gateway_config(""));
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
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .dpd_delay(Duration::from_secs(2))
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
        ),
    )
    .expect("load client");
    a.initiate("net", WAIT)
        .unwrap_or_else(|e| panic!("initiate: {e}\n{}\n{}", a.log(), gw.log("ikemgr")));
    wait_for("first ping through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.log("ikemgr"), gw.log("espd")))
    });
    let t = esp_tunnel(&gw);
    assert_eq!(t["remote_port"], 14500, "{t:#}");
    let spi_in = t["sas"][0]["dec"]["spi"].as_str().expect("SPI").to_string();

    // Unauthenticated: right SPI, wrong key, from port 34500. Counted, nothing moves.
    let icv_before = gw.drops("icv");
    let inject = |dst: &str| {
        line.gwa
            .run(
                bin("esp-inject").to_str().expect("path"),
                &[
                    dst,
                    spi_in.as_str(),
                    "00112233445566778899aabbccddeeff-01020304",
                    "aes128gcm",
                    "valid",
                    "1000000",
                ],
            )
            .expect("esp-inject")
    };
    inject(&format!("{}:4500/34500", SiteToSite::GWB_OUTER));
    wait_for("forged packet counted", WAIT, || {
        (gw.drops("icv") > icv_before)
            .then_some(())
            .ok_or_else(|| gw.tunnel_list().to_string())
    });
    let t = esp_tunnel(&gw);
    assert_eq!(
        t["remote_port"], 14500,
        "a forged packet moved the peer: {t:#}"
    );
    assert_eq!(t["peer_moves"], 0, "{t:#}");
    // Raw ESP for a UDP-encapsulated SA: refused as an encapsulation mismatch.
    let mismatch_before = gw.drops("encap_mismatch");
    inject(SiteToSite::GWB_OUTER);
    wait_for("raw ESP for a UDP SA counted", WAIT, || {
        (gw.drops("encap_mismatch") > mismatch_before)
            .then_some(())
            .ok_or_else(|| gw.tunnel_list().to_string())
    });

    // The mapping changes under a running ping.
    let ping = Pinger::start(&line, &gw.dir, 100, 50);
    std::thread::sleep(Duration::from_secs(2));
    nat_port(&line, 24500);
    let (tx, rx, text) = ping.finish(Duration::from_secs(60));
    let t = esp_tunnel(&gw);
    let ctx = format!(
        "{text}\n{t:#}\nikemgr:\n{}\nespd:\n{}\ncharon:\n{}",
        gw.log("ikemgr"),
        gw.log("espd"),
        a.log()
    );
    // At most the reply in flight when the mapping changed is lost.
    assert!(rx + 1 >= tx, "ping did not survive the NAT change\n{ctx}");
    assert_eq!(t["remote_port"], 24500, "espd did not follow\n{ctx}");
    assert!(t["peer_moves"].as_u64().unwrap_or(0) >= 1, "{ctx}");

    // ikemgr follows the client's next IKE message (DPD after 2 s without traffic) and
    // re-publishes the CHILD SA with the new port.
    wait_for("ikemgr follows the new port", WAIT, || {
        let v = vpnctl_json(&gw.run, &["diagnose", "vpn", "ike", "gateway", "list"])
            .map_err(|e| e.to_string())?;
        let remote = v[0]["remote"].as_str().unwrap_or("").to_string();
        (remote == format!("{}:24500", SiteToSite::GWA_OUTER)
            && gw.log("ikemgr").contains("follows"))
        .then_some(())
        .ok_or_else(|| format!("{v:#}\n{}", gw.log("ikemgr")))
    });
    line.client
        .ping(SiteToSite::SERVER, 3)
        .expect("ping after ikemgr followed");
    let _ = &mut a;
}

/// Many dial-up clients' routes on one device: [`CLIENTS`] (24) IKE SAs from charon in
/// gwa, each with its own identity and a CHILD SA for one address of gwa's
/// (`10.99.1.<10+i>/32`, inside the gateway's `10.99.1.0/24`). Every instance puts its
/// host route on vpn1, more than espd scans linearly (16), so the server's pings to the
/// client addresses are routed through espd's route index. Each address gets its own count
/// of echo requests; each instance's SA must have sent exactly its address's requests and
/// received as many replies (a request sent on another client's SA would be counted there,
/// and strongSwan would not deliver it: its selectors do not hold the address).
#[test]
fn each_of_many_dial_up_clients_on_one_device_gets_its_own_traffic() {
    require();
    let line = SiteToSite::new("esmany").expect("topology");
    let gw = Haven::start(&line.gwb, "esmany-gw", &gateway_config(""));
    let addr = |i: usize| format!("10.99.1.{}", 10 + i);
    let mut conf = SwanctlConf::new();
    for i in 0..CLIENTS {
        // On the client gateway itself: charon installs a CHILD SA's route only with a
        // local address inside its selector, and the echo replies start there.
        line.gwa
            .add_addr("lo", &format!("{}/32", addr(i)))
            .expect("client address");
        let child = ChildCfg::new(
            &format!("c{i}"),
            &format!("{}/32", addr(i)),
            SiteToSite::LAN_B,
        )
        .esp_proposals(&["aes128gcm16"]);
        conf = conf.conn(
            Conn::psk(
                &format!("dial{i}"),
                SiteToSite::GWA_OUTER,
                SiteToSite::GWB_OUTER,
                PSK.as_bytes(),
            )
            .ids(&format!("client{i}.haven.test"), GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(child),
        );
    }
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&conf).expect("load clients");
    for i in 0..CLIENTS {
        if let Err(e) = a.initiate(&format!("c{i}"), WAIT) {
            panic!(
                "initiate c{i} failed: {e}\ncharon:\n{}\nikemgr:\n{}",
                a.log(),
                gw.log("ikemgr")
            );
        }
        a.wait_child_installed(&format!("dial{i}"), &format!("c{i}"), WAIT)
            .expect("client CHILD SA");
    }
    // The SA whose outbound selector is exactly client address `i`.
    let sa_of = |list: &Value, i: usize| -> Option<Value> {
        let want = format!("{a}-{a}", a = addr(i));
        list["tunnels"].as_array()?.iter().find_map(|t| {
            t["sas"]
                .as_array()?
                .iter()
                .find(|s| s["dst"].to_string().contains(&want))
                .cloned()
        })
    };
    wait_for("an SA per client address in espd", WAIT, || {
        let list = gw.tunnel_list();
        match (0..CLIENTS).find(|i| sa_of(&list, *i).is_none()) {
            None => Ok(()),
            Some(i) => Err(format!("none for {}: {list:#}", addr(i))),
        }
    });
    // 1, 2 or 3 requests per address: a route to the wrong SA shows in the counts.
    let count = |i: usize| 1 + (i % 3) as u32;
    for i in 0..CLIENTS {
        let out = line.server.ping(&addr(i), count(i)).unwrap_or_else(|e| {
            panic!(
                "ping {}: {e}\nespd:\n{}\ncharon:\n{}",
                addr(i),
                gw.log("espd"),
                a.log()
            )
        });
        let (sent, got) = parse_ping(&out);
        assert_eq!((sent, got), (count(i), count(i)), "ping {}: {out}", addr(i));
    }
    let list = gw.tunnel_list();
    for i in 0..CLIENTS {
        let sa = sa_of(&list, i).unwrap_or_else(|| panic!("no SA for {}", addr(i)));
        let n = u64::from(count(i));
        assert_eq!(
            (sa["enc_pkts"].as_u64(), sa["dec_pkts"].as_u64()),
            (Some(n), Some(n)),
            "SA for {}: {sa:#}",
            addr(i)
        );
    }
    assert_eq!(gw.drops("icv"), 0);
}

/// More dial-up clients than espd searches linearly on one device.
const CLIENTS: usize = 24;
