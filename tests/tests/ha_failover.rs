//! FGCP takeover of a strongSwan dial-up tunnel without renegotiation and without replay
//! drops (issue 6, DESIGN.md §6; seed 001's FGCP pair, seed 002's rekey bug).
//!
//! Two Haven members (ikemgr, dpdmon, hasyncd and espd each, their own run-dir and bus)
//! form an FGCP pair over a heartbeat link and share the phase1's `local-gw`
//! 192.168.129.254, which the primary holds on `port2` and announces with gratuitous ARP.
//! A strongSwan client behind a router dials in; a server on the members' LAN answers a
//! continuous ping through the tunnel.
//!
//! ```text
//! client 192.168.7.2 (charon, 10.10.1.2 inside) - 192.168.7.1 router 192.168.129.1 [br0]
//!     br0: gw1 port2 / gw2 port2 (shared 192.168.129.254), server 192.168.129.50
//!     gw1 port4 169.254.0.1 ---- 169.254.0.2 gw2 port4 (FGCP heartbeats and sync)
//! ```
//!
//! The primary's daemons are all killed (`kill -9`) and its LAN port goes down (the box is
//! gone). The secondary becomes primary, takes the address, restores the synced IKE SA
//! (same SPIs, keys, message IDs) and installs the CHILD SA beyond the synced sequence
//! lease. Asserted: strongSwan's IKE and CHILD SA keep their SPIs (no renegotiation), the
//! ping resumes, strongSwan logs no ESP sequence-number (replay) failure, and a CHILD SA
//! rekey and an IKE SA rekey started by each side complete on the taken-over tunnel. The
//! outage is printed, not asserted.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use haven_tests::daemons::{bin, vpnctl_json, wait_for};
use haven_tests::netns::{veth, Netns, Proc, ScratchDir};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, IkeSa, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-ha-failover-psk-0123456789";
const GW_ID: &str = "gw.haven.test";
const CLIENT_ID: &str = "client.haven.test";
const SHARED: &str = "192.168.129.254";
const SERVER: &str = "192.168.129.50";
const CLIENT_INNER: &str = "10.10.1.2";
const WAIT: Duration = Duration::from_secs(30);

fn config(priority: u8) -> String {
    format!(
        "config system ha
    set group-id 5
    set group-name \"HV_PAIR\"
    set mode a-p
    set password \"ha-pair-password\"
    set hbdev \"port4\" 50
    set priority {priority}
    set hb-interval 1
    set hb-lost-threshold 3
end
config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"port2\"
        set ike-version 2
        set local-gw {SHARED}
        set peertype any
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
        set dpd disable
        set nattraversal enable
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {SERVER} 255.255.255.255
        set dst-subnet 10.10.1.0 255.255.255.0
    next
end
"
    )
}

struct Member {
    ns: Netns,
    dir: PathBuf,
    run: PathBuf,
    procs: Vec<Proc>,
}

impl Member {
    fn start(ns: Netns, dir: &Path, name: &str, priority: u8) -> Member {
        let dir = dir.join(name);
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let conf = dir.join("haven.conf");
        std::fs::write(&conf, config(priority)).unwrap();
        let mut procs = Vec::new();
        for (d, port) in [
            ("hasyncd", 9703),
            ("espd", 9704),
            ("ikemgr", 9701),
            ("dpdmon", 9702),
        ] {
            let log = std::fs::File::create(dir.join(format!("{d}.log"))).unwrap();
            let mut cmd: Command = ns.command(bin(d));
            cmd.arg("--config")
                .arg(&conf)
                .arg("--run-dir")
                .arg(&run)
                .args(["--log-level", "debug"])
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            procs.push(ns.spawn_command(cmd).expect("spawn daemon"));
        }
        Member {
            ns,
            dir,
            run,
            procs,
        }
    }

    fn log(&self, d: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{d}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ["hasyncd", "ikemgr", "espd"]
            .iter()
            .map(|d| {
                let l = self.log(d);
                let tail: Vec<&str> = l.lines().rev().take(60).collect();
                format!(
                    "--- {} {d} ---\n{}",
                    self.ns.label(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn role(&self) -> Option<String> {
        vpnctl_json(&self.run, &["diagnose", "sys", "ha", "status"])
            .ok()?
            .get("role")?
            .as_str()
            .map(str::to_string)
    }

    fn holds_shared(&self) -> bool {
        self.ns
            .run("ip", &["-4", "-o", "addr", "show", "dev", "port2"])
            .is_ok_and(|o| o.contains(SHARED))
    }

    fn view(&self, daemon: DaemonKind, name: &str) -> Result<Value, String> {
        let req = CtlRequest::View {
            name: name.into(),
            args: vec![],
        };
        match rt().block_on(ctl_call(&self.run, daemon, &req, Duration::from_secs(2))) {
            Ok(CtlReply::View(v)) => Ok(v),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn command(&self, name: &str, args: &[&str]) -> Result<Value, String> {
        let req = CtlRequest::Command {
            name: name.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        match rt().block_on(ctl_call(
            &self.run,
            DaemonKind::Ikemgr,
            &req,
            Duration::from_secs(2),
        )) {
            Ok(CtlReply::View(v)) => Ok(v),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// ikemgr's IKE SA of vpn1_1: (spi_i, spi_r, child inbound SPIs).
    fn ike_sa(&self) -> Option<(u64, u64, Vec<u32>)> {
        let v = self.view(DaemonKind::Ikemgr, "ike-gateways").ok()?;
        let sa = v.as_array()?.iter().find(|s| s["name"] == "vpn1_1")?;
        let children = sa["children"]
            .as_array()?
            .iter()
            .map(|c| hex_u32(&c["spi_in"]))
            .collect();
        Some((hex_u64(&sa["spi_i"]), hex_u64(&sa["spi_r"]), children))
    }

    /// espd's outbound SAs of vpn1_1: (spi_out, next sequence number).
    fn esp_seqs(&self) -> Vec<(u32, u64)> {
        let Ok(v) = self.view(DaemonKind::Espd, "tunnel-list") else {
            return Vec::new();
        };
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == "vpn1_1")
            .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
            .map(|s| (hex_u32(&s["enc"]["spi"]), s["seqno"].as_u64().unwrap_or(0)))
            .collect()
    }

    fn kill_all(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill_now();
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn hex_u64(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

fn hex_u32(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

/// Received `icmp_seq` numbers in ping's output.
fn received_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            let i = l.find("icmp_seq=")? + "icmp_seq=".len();
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn client_sa(c: &Charon) -> Option<IkeSa> {
    c.list_sas()
        .ok()?
        .into_iter()
        .find(|s| s.name == "dial" && s.state == "ESTABLISHED")
}

/// ESP sequence-number (anti-replay) failures strongSwan's libipsec logged.
fn replay_failures(c: &Charon) -> usize {
    c.log()
        .matches("ESP sequence number verification failed")
        .count()
}

/// Pings from the client's inner address until `count` were sent; returns the output.
fn ping_burst(client: &Netns, count: u32) -> (u32, u32) {
    let out = client
        .exec(
            "ping",
            &[
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                CLIENT_INNER,
                SERVER,
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    (count, received_seqs(&out).len() as u32)
}

#[test]
fn fgcp_takeover_keeps_the_strongswan_tunnel_without_replay_and_rekeys_in_place() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let scratch = ScratchDir::new("ha-failover").expect("scratch dir");

    // Topology.
    let router = Netns::new("hafo-r").unwrap();
    let client = Netns::new("hafo-c").unwrap();
    let server = Netns::new("hafo-s").unwrap();
    let gw1 = Netns::new("hafo-g1").unwrap();
    let gw2 = Netns::new("hafo-g2").unwrap();
    router.add_bridge("br0").unwrap();
    router.add_addr("br0", "192.168.129.1/24").unwrap();
    veth(&client, "wan0", &router, "cl0").unwrap();
    client.add_addr("wan0", "192.168.7.2/24").unwrap();
    client.default_route("192.168.7.1").unwrap();
    client
        .add_addr("lo", &format!("{CLIENT_INNER}/32"))
        .unwrap();
    router.add_addr("cl0", "192.168.7.1/24").unwrap();
    router.ip_forward(true).unwrap();
    for (ns, port) in [(&server, "sv0"), (&gw1, "g10"), (&gw2, "g20")] {
        let inner = if ns.label() == server.label() {
            "eth0"
        } else {
            "port2"
        };
        veth(ns, inner, &router, port).unwrap();
        router.enslave(port, "br0").unwrap();
        router.link_up(port).unwrap();
    }
    server.add_addr("eth0", &format!("{SERVER}/24")).unwrap();
    server.default_route("192.168.129.1").unwrap();
    server
        .add_route("10.10.1.0/24", SHARED)
        .expect("server route to the client's inside via the shared address");
    veth(&gw1, "port4", &gw2, "port4").unwrap();
    for (i, gw) in [&gw1, &gw2].into_iter().enumerate() {
        gw.add_addr("port4", &format!("169.254.0.{}/24", i + 1))
            .unwrap();
        // No address of its own on the LAN (the primary holds the shared one) beyond a
        // host-scoped one that is never a source: without any address on port2 the kernel
        // drops port2's routes when the shared address is removed.
        gw.ip(&[
            "addr",
            "add",
            &format!("192.168.200.{}/32", i + 1),
            "dev",
            "port2",
            "scope",
            "host",
        ])
        .unwrap();
        gw.ip(&["route", "add", "192.168.129.0/24", "dev", "port2"])
            .unwrap();
        gw.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.129.1",
            "dev",
            "port2",
            "onlink",
        ])
        .unwrap();
        gw.ip_forward(true).unwrap();
        // During a takeover the shared address can come up a moment before ikemgr's route
        // into the tunnel: a reply forwarded back out of port2 then triggers an ICMP
        // redirect that the server would cache for minutes. Members send none.
        for k in ["all", "default", "port2"] {
            gw.sysctl(&format!("net.ipv4.conf.{k}.send_redirects"), "0")
                .unwrap();
        }
    }

    // The pair: gw1 (priority 200) primary, gw2 (100) secondary.
    let mut m1 = Member::start(gw1.clone(), scratch.path(), "gw1", 200);
    let m2 = Member::start(gw2.clone(), scratch.path(), "gw2", 100);
    wait_for("gw1 primary, gw2 secondary", WAIT, || {
        match (m1.role(), m2.role()) {
            (Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_for("gw1 holds the shared address", WAIT, || {
        (m1.holds_shared() && !m2.holds_shared())
            .then_some(())
            .ok_or_else(|| format!("gw1 {} gw2 {}", m1.holds_shared(), m2.holds_shared()))
    });

    // The client dials in.
    let mut charon = Charon::start(&client).expect("charon");
    charon
        .load(
            &SwanctlConf::new().conn(
                Conn::psk("dial", "192.168.7.2", SHARED, PSK.as_bytes())
                    .ids(CLIENT_ID, GW_ID)
                    .proposals(&["aes128gcm16-prfsha256-ecp256"])
                    .child(
                        ChildCfg::new(
                            "net",
                            &format!("{CLIENT_INNER}/32"),
                            &format!("{SERVER}/32"),
                        )
                        .esp_proposals(&["aes128gcm16"]),
                    ),
            ),
        )
        .expect("swanctl load");
    if let Err(e) = charon.initiate("net", WAIT) {
        panic!("initiate: {e}\n{}\n{}", charon.log(), m1.logs());
    }
    let before = client_sa(&charon).expect("client IKE SA");
    let child_before = before.child("net").expect("client CHILD SA").clone();
    wait_for("gw1's IKE SA", WAIT, || {
        m1.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.spis())
            .ok_or_else(|| m1.logs())
    });
    wait_for("ping through gw1", WAIT, || {
        let (sent, got) = ping_burst(&client, 1);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}", m1.logs()))
    });

    // gw2 holds the standby copies: the IKE SA with its SPIs, and the lease.
    wait_for("gw2's standby IKE SA", WAIT, || {
        let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
        let ok = v["ike_standby"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
        }) && v["standby"].as_array().is_some_and(|a| !a.is_empty());
        ok.then_some(()).ok_or_else(|| v.to_string())
    });
    assert!(
        m2.ike_sa().is_none(),
        "the secondary's ikemgr must not carry the tunnel"
    );

    // Continuous ping, 20 per second; the primary dies about 2 s in.
    let mut cmd = client.command("ping");
    cmd.args([
        "-n",
        "-c",
        "500",
        "-i",
        "0.05",
        "-W",
        "1",
        "-I",
        CLIENT_INNER,
        SERVER,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut ping = client.spawn_command(cmd).expect("ping");
    std::thread::sleep(Duration::from_secs(2));
    let seq_old = m1.esp_seqs();
    let killed = Instant::now();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();

    wait_for("gw2 primary", WAIT, || match m2.role() {
        Some(r) if r == "primary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m2.logs())),
    });
    let promoted = killed.elapsed();
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.spis())
            .ok_or_else(|| m2.logs())
    });
    assert!(m2.holds_shared(), "gw2 holds {SHARED}");
    let seq_new = wait_for("gw2's espd carries the CHILD SA", WAIT, || {
        let s = m2.esp_seqs();
        (!s.is_empty()).then_some(s).ok_or_else(|| m2.logs())
    });

    wait_for("ping to finish", Duration::from_secs(60), || {
        match ping.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err("still running".to_string()),
        }
    });
    let mut out = String::new();
    ping.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut seqs = received_seqs(&out);
    seqs.sort_unstable();
    seqs.dedup();
    let max_gap = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!(
        "FGCP takeover: gw2 primary {} ms after the kill; {} of 500 pings answered; longest gap {} pings = ~{} ms (50 ms per ping)",
        promoted.as_millis(),
        seqs.len(),
        max_gap,
        max_gap * 50
    );
    eprintln!("outbound sequence numbers: gw1 before the kill {seq_old:?}, gw2 after the takeover {seq_new:?}");
    let diag = || {
        format!(
            "gw2 espd: {}\nrouter neigh: {}\nserver neigh: {}\ngw2 addr: {}\ngw2 routes: {}\nrouter fdb: {}",
            m2.view(DaemonKind::Espd, "tunnel-list")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            router.run("ip", &["neigh"]).unwrap_or_default(),
            server.run("ip", &["neigh"]).unwrap_or_default(),
            gw2.run("ip", &["-4", "addr"]).unwrap_or_default(),
            gw2.run("ip", &["route"]).unwrap_or_default(),
            router.run("bridge", &["fdb", "show", "br", "br0", "dynamic"]).unwrap_or_default(),
        ) + &format!(
            "\ngw2 links: {}\ngw1 links: {}\nserver route get: {}",
            gw2.run("ip", &["-s", "link"]).unwrap_or_default(),
            gw1.run("ip", &["link"]).unwrap_or_default(),
            server.run("ip", &["route", "get", CLIENT_INNER]).unwrap_or_default(),
        )
    };
    assert!(
        seqs.iter().any(|s| *s >= 450),
        "the ping did not resume through gw2:\n{out}\n{}\n{}\n{}",
        diag(),
        m2.logs(),
        charon.log()
    );
    for (spi, next_old) in &seq_old {
        if let Some((_, next_new)) = seq_new.iter().find(|(s, _)| s == spi) {
            assert!(
                next_new > next_old,
                "gw2 must send beyond gw1's sequence numbers ({spi:08x}: {next_new} <= {next_old})"
            );
        }
    }

    // No renegotiation: strongSwan's IKE and CHILD SAs kept their SPIs; no replay drops.
    let after = client_sa(&charon).expect("client IKE SA after the takeover");
    assert_eq!(after.spis(), before.spis(), "IKE SA renegotiated");
    let child_after = after.child("net").expect("client CHILD SA");
    assert_eq!(
        (child_after.spi_in, child_after.spi_out),
        (child_before.spi_in, child_before.spi_out),
        "CHILD SA renegotiated"
    );
    assert_eq!(
        replay_failures(&charon),
        0,
        "strongSwan dropped ESP packets as replays:\n{}",
        charon.log()
    );

    // Rekeys on the taken-over tunnel (seed 002: the vendor ignored CREATE_CHILD_SA here).
    let check_traffic = |what: &str| {
        let (sent, got) = ping_burst(&client, 5);
        assert!(
            got >= 3,
            "ping after {what}: {got}/{sent}\n{}\n{}",
            m2.logs(),
            charon.log()
        );
    };
    // 1. strongSwan rekeys the CHILD SA.
    charon.rekey_child("net").expect("swanctl --rekey --child");
    let c1 = wait_for("client CHILD SA rekeyed", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        if c.spi_in != child_before.spi_in && c.state == "INSTALLED" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    });
    check_traffic("strongSwan's CHILD SA rekey");
    // 2. strongSwan rekeys the IKE SA.
    charon.rekey_ike("dial").expect("swanctl --rekey --ike");
    let ike1 = wait_for("client IKE SA rekeyed", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != before.spis())
            .then_some(sa.spis())
            .ok_or_else(|| format!("{:?}", sa.spis()))
    });
    wait_for("gw2 follows the IKE rekey", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == ike1)
            .ok_or_else(|| m2.logs())
    });
    check_traffic("strongSwan's IKE SA rekey");
    // 3. Haven rekeys the CHILD SA.
    m2.command("ike-rekey", &["vpn1_1", "child"])
        .expect("ikemgr CHILD rekey");
    wait_for("client sees Haven's CHILD SA rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        (c.spi_in != c1.spi_in && c.state == "INSTALLED")
            .then_some(())
            .ok_or_else(|| format!("{c:?}\n{}", m2.logs()))
    });
    check_traffic("Haven's CHILD SA rekey");
    // 4. Haven rekeys the IKE SA.
    m2.command("ike-rekey", &["vpn1_1", "ike"])
        .expect("ikemgr IKE rekey");
    wait_for("client sees Haven's IKE SA rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != ike1)
            .then_some(())
            .ok_or_else(|| format!("{:?}\n{}", sa.spis(), m2.logs()))
    });
    check_traffic("Haven's IKE SA rekey");
    assert_eq!(
        replay_failures(&charon),
        0,
        "strongSwan dropped ESP packets as replays:\n{}",
        charon.log()
    );
    // Still one IKE SA on the client: every step was done in place.
    let sas = charon.list_sas().unwrap();
    assert_eq!(
        sas.iter().filter(|s| s.name == "dial").count(),
        1,
        "{sas:#?}"
    );
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
