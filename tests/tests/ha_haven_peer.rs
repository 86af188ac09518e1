//! FGCP takeover with a Haven gateway as the remote peer, so that replay and ICV drops are
//! counted exactly on the far side (issue 6, Tests: "Our own gateway as the remote peer
//! too").
//!
//! The pair of `ha_failover` (gw1 primary, gw2 secondary, the shared `local-gw`
//! 192.168.129.254 on port2, heartbeats on port4, a server on the LAN); in place of the
//! strongSwan client, a Haven gateway ("far": ikemgr, espd, dpdmon) with a static phase1
//! `hq` to the shared address, which brings the tunnel up by itself (`auto-negotiate`).
//!
//! ```text
//! far 192.168.7.2 (Haven, 10.10.1.2 inside) - 192.168.7.1 router 192.168.129.1 [br0]
//!     br0: gw1 port2 / gw2 port2 (shared 192.168.129.254), server 192.168.129.50
//!     gw1 port4 169.254.0.1 ---- 169.254.0.2 gw2 port4 (FGCP heartbeats and sync)
//! ```
//!
//! Traffic runs both ways (the far side pings the server, the server pings the far side's
//! inside address); gw1's daemons are all killed and its port2 goes down. Asserted on the
//! far side: its IKE SA and CHILD SA keep their SPIs; its espd counts exactly zero replay
//! and zero ICV drops (`espd_drops_total{reason}` and the SA's own counters); afterwards,
//! on a quiet link, every packet gw2 sends is accepted in sequence (a burst of N pings adds
//! exactly N to both sides' counters and the far inbound SA's last accepted sequence number
//! is exactly the one before gw2's next); then a CHILD SA and an IKE SA rekey started by
//! each side complete in place, with traffic and still zero replay/ICV drops. The outage is
//! printed, not asserted.
//!
//! Needs root and iproute2.

mod ha_common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use ha_common::*;
use haven_tests::daemons::{bin, wait_for};
use haven_tests::netns::{preflight, veth, Netns, Proc, ScratchDir};
use serde_json::Value;

const FAR_WAN: &str = "192.168.7.2";

fn far_config() -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"hq\"
        set type static
        set remote-gw {SHARED}
        set interface \"wan0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{CLIENT_ID}\"
        set nattraversal forced
        set dpd disable
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"hq\"
        set phase1name \"hq\"
        set proposal aes128gcm
        set pfs disable
        set auto-negotiate enable
        set src-subnet 10.10.1.0 255.255.255.0
        set dst-subnet {SERVER} 255.255.255.255
    next
end
"
    )
}

/// The far Haven gateway: ikemgr, espd, dpdmon (killed on drop).
struct Far {
    ns: Netns,
    dir: PathBuf,
    run: PathBuf,
    _procs: Vec<Proc>,
}

/// The far side's view of the tunnel.
#[derive(Clone, Debug, PartialEq)]
struct FarSa {
    ike: (u64, u64),
    /// (inbound SPI, outbound SPI) of the CHILD SA.
    child: (u32, u32),
}

impl Far {
    fn start(ns: Netns, dir: PathBuf) -> Far {
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let conf = dir.join("haven.conf");
        std::fs::write(&conf, far_config()).unwrap();
        let mut procs = Vec::new();
        for (d, port) in [("espd", 9804), ("ikemgr", 9801), ("dpdmon", 9802)] {
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
            procs.push(ns.spawn_command(cmd).expect("spawn far daemon"));
        }
        Far {
            ns,
            dir,
            run,
            _procs: procs,
        }
    }

    fn logs(&self) -> String {
        ["ikemgr", "espd"]
            .iter()
            .map(|d| {
                let l =
                    std::fs::read_to_string(self.dir.join(format!("{d}.log"))).unwrap_or_default();
                let tail: Vec<&str> = l.lines().rev().take(50).collect();
                format!(
                    "--- far {d} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn call(&self, daemon: DaemonKind, req: CtlRequest) -> Result<Value, String> {
        match rt().block_on(ctl_call(&self.run, daemon, &req, Duration::from_secs(2))) {
            Ok(CtlReply::View(v)) => Ok(v),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn view(&self, daemon: DaemonKind, name: &str) -> Result<Value, String> {
        self.call(
            daemon,
            CtlRequest::View {
                name: name.into(),
                args: vec![],
            },
        )
    }

    fn rekey(&self, what: &str) -> Result<Value, String> {
        self.call(
            DaemonKind::Ikemgr,
            CtlRequest::Command {
                name: "ike-rekey".into(),
                args: vec!["hq".into(), what.into()],
            },
        )
    }

    /// ikemgr's established IKE SA of `hq` and its (newest) CHILD SA.
    fn sa(&self) -> Option<FarSa> {
        let v = self.view(DaemonKind::Ikemgr, "ike-gateways").ok()?;
        let sa = v
            .as_array()?
            .iter()
            .find(|s| s["name"] == "hq" && s["established"] == true)?;
        let c = sa["children"].as_array()?.last()?;
        Some(FarSa {
            ike: (hex_u64(&sa["spi_i"]), hex_u64(&sa["spi_r"])),
            child: (hex_u32(&c["spi_in"]), hex_u32(&c["spi_out"])),
        })
    }

    /// espd's SA records of `hq`.
    fn esp_sas(&self) -> Vec<Value> {
        let Ok(v) = self.view(DaemonKind::Espd, "tunnel-list") else {
            return Vec::new();
        };
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == "hq")
            .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The espd SA whose inbound SPI is `spi_in`.
    fn esp_sa(&self, spi_in: u32) -> Option<Value> {
        self.esp_sas()
            .into_iter()
            .find(|s| hex_u32(&s["dec"]["spi"]) == spi_in)
    }

    /// `espd_drops_total{reason}` of the far espd.
    fn drops(&self, reason: &str) -> u64 {
        let text = self
            .ns
            .run("curl", &["-s", "http://127.0.0.1:9804/metrics"])
            .unwrap_or_default();
        let want = format!("espd_drops_total{{reason=\"{reason}\"}}");
        text.lines()
            .filter(|l| l.starts_with(&want))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// The metrics text (for failure messages).
    fn metrics(&self) -> String {
        self.ns
            .run("curl", &["-s", "http://127.0.0.1:9804/metrics"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("espd_drops_total") || l.starts_with("espd_packets"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Pings `dest` from `from` in `ns` `count` times (0.2 s apart); the replies' count.
fn burst(ns: &Netns, from: &str, dest: &str, count: u32) -> usize {
    let out = ns
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
                from,
                dest,
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    received_seqs(&out).len()
}

/// A continuous ping in the background (`count` at 20 per second).
fn ping_bg(ns: &Netns, from: &str, dest: &str, count: u32) -> Proc {
    let mut cmd = ns.command("ping");
    cmd.args([
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        "0.05",
        "-W",
        "1",
        "-I",
        from,
        dest,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    ns.spawn_command(cmd).expect("ping")
}

fn ping_result(mut p: Proc) -> (Vec<u64>, String) {
    wait_for("ping to finish", Duration::from_secs(90), || {
        if p.is_running() {
            Err("still running".to_string())
        } else {
            Ok(())
        }
    });
    let mut out = String::new();
    if let Some(mut s) = p.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    let mut seqs = received_seqs(&out);
    seqs.sort_unstable();
    seqs.dedup();
    (seqs, out)
}

/// The pair, the far Haven gateway and the server, up to a tunnel carrying traffic both
/// ways through gw1, with gw2 holding the standby copies.
struct PeerLab {
    _scratch: ScratchDir,
    _router: Netns,
    far_ns: Netns,
    server: Netns,
    gw1: Netns,
    gw2: Netns,
    m1: Member,
    m2: Member,
    far: Far,
    before: FarSa,
}

impl PeerLab {
    fn new(tag: &str, label: &str) -> PeerLab {
        preflight().expect("preflight");
        let scratch = ScratchDir::new(tag).expect("scratch dir");
        let router = Netns::new(&format!("{label}-r")).unwrap();
        let far_ns = Netns::new(&format!("{label}-f")).unwrap();
        let server = Netns::new(&format!("{label}-s")).unwrap();
        let gw1 = Netns::new(&format!("{label}-g1")).unwrap();
        let gw2 = Netns::new(&format!("{label}-g2")).unwrap();
        router.add_bridge("br0").unwrap();
        router.add_addr("br0", "192.168.129.1/24").unwrap();
        veth(&far_ns, "wan0", &router, "cl0").unwrap();
        far_ns.add_addr("wan0", &format!("{FAR_WAN}/24")).unwrap();
        far_ns.default_route("192.168.7.1").unwrap();
        far_ns
            .add_addr("lo", &format!("{CLIENT_INNER}/32"))
            .unwrap();
        router.add_addr("cl0", "192.168.7.1/24").unwrap();
        router.ip_forward(true).unwrap();
        for (ns, port, inner) in [
            (&server, "sv0", "eth0"),
            (&gw1, "g10", "port2"),
            (&gw2, "g20", "port2"),
        ] {
            veth(ns, inner, &router, port).unwrap();
            router.enslave(port, "br0").unwrap();
            router.link_up(port).unwrap();
        }
        server.add_addr("eth0", &format!("{SERVER}/24")).unwrap();
        server.default_route("192.168.129.1").unwrap();
        server.add_route("10.10.1.0/24", SHARED).unwrap();
        veth(&gw1, "port4", &gw2, "port4").unwrap();
        for (i, gw) in [&gw1, &gw2].into_iter().enumerate() {
            gw.add_addr("port4", &format!("169.254.0.{}/24", i + 1))
                .unwrap();
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
            lan_routes(gw);
            gw.ip_forward(true).unwrap();
            for k in ["all", "default", "port2"] {
                gw.sysctl(&format!("net.ipv4.conf.{k}.send_redirects"), "0")
                    .unwrap();
            }
        }
        let m1 = Member::start(gw1.clone(), scratch.path(), "gw1", 200, NO_DPD);
        let m2 = Member::start(gw2.clone(), scratch.path(), "gw2", 100, NO_DPD);
        wait_for("gw1 primary, gw2 secondary", WAIT, || {
            match (m1.role(), m2.role()) {
                (Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        wait_for("gw1 holds the shared address", WAIT, || {
            m1.holds_shared().then_some(()).ok_or_else(|| m1.logs())
        });

        // The far gateway brings the tunnel up by itself.
        let far = Far::start(far_ns.clone(), scratch.path().join("far"));
        let before = wait_for(
            "the far gateway's tunnel up",
            Duration::from_secs(60),
            || {
                far.sa()
                    .ok_or_else(|| format!("{}\n{}", far.logs(), m1.logs()))
            },
        );
        wait_for("gw1 carries the IKE SA", WAIT, || {
            m1.ike_sa()
                .filter(|(i, r, _)| (*i, *r) == before.ike)
                .ok_or_else(|| m1.logs())
        });
        wait_for("traffic both ways through gw1", WAIT, || {
            let a = burst(&far_ns, CLIENT_INNER, SERVER, 1);
            let b = burst(&server, SERVER, CLIENT_INNER, 1);
            (a == 1 && b == 1)
                .then_some(())
                .ok_or_else(|| format!("far->server {a}, server->far {b}\n{}", far.logs()))
        });
        wait_for("gw2's standby IKE SA", WAIT, || {
            let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
            let ok = v["ike_standby"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.ike)
            }) && v["standby"].as_array().is_some_and(|a| !a.is_empty());
            ok.then_some(()).ok_or_else(|| v.to_string())
        });

        PeerLab {
            _scratch: scratch,
            _router: router,
            far_ns,
            server,
            gw1,
            gw2,
            m1,
            m2,
            far,
            before,
        }
    }
}

#[test]
fn fgcp_takeover_seen_from_a_haven_peer_has_no_replay_or_icv_drop_and_rekeys_in_place() {
    let PeerLab {
        _scratch,
        _router,
        far_ns,
        server,
        gw1,
        gw2: _gw2,
        mut m1,
        m2,
        far,
        before,
    } = PeerLab::new("ha-haven-peer", "hahp");

    // Continuous traffic both ways; gw1 dies about 2 s in.
    let from_far = ping_bg(&far_ns, CLIENT_INNER, SERVER, 400);
    let from_server = ping_bg(&server, SERVER, CLIENT_INNER, 400);
    std::thread::sleep(Duration::from_secs(2));
    let seq_old = m1.esp_seqs();
    let killed = Instant::now();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.ike)
            .ok_or_else(|| m2.logs())
    });
    let took = killed.elapsed();
    let seq_new = wait_for("gw2's espd carries the CHILD SA", WAIT, || {
        let s = m2.esp_seqs();
        (!s.is_empty()).then_some(s).ok_or_else(|| m2.logs())
    });
    let (a, _) = ping_result(from_far);
    let (b, _) = ping_result(from_server);
    let gap = |s: &[u64]| s.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!(
        "FGCP takeover under a Haven peer: gw2 carried the IKE SA {} ms after the kill; \
         far->server {} of 400 answered (longest gap ~{} ms), server->far {} of 400 (~{} ms)",
        took.as_millis(),
        a.len(),
        gap(&a) * 50,
        b.len(),
        gap(&b) * 50
    );
    eprintln!("outbound sequence numbers: gw1 before the kill {seq_old:?}, gw2 after {seq_new:?}");
    assert!(
        a.iter().any(|s| *s >= 350) && b.iter().any(|s| *s >= 350),
        "traffic did not resume through gw2\n{}\n{}",
        m2.logs(),
        far.logs()
    );

    // The far side: same SPIs, not one replay or ICV drop.
    assert_eq!(far.sa(), Some(before.clone()), "the far side renegotiated");
    // The counters are exported once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let check_drops = |when: &str| {
        let (r, i) = (far.drops("replay"), far.drops("icv"));
        assert_eq!(
            (r, i),
            (0, 0),
            "replay/ICV drops on the far side {when}:\n{}\n{}",
            far.metrics(),
            far.logs()
        );
    };
    check_drops("after the takeover");
    let far_in = far.esp_sa(before.child.0).expect("the far inbound SA");
    assert!(
        far_in["drops"].get("replay").is_none() && far_in["drops"].get("icv").is_none(),
        "{far_in}"
    );

    // Continuous acceptance on a quiet link: N pings add exactly N to gw2's outbound and
    // the far side's inbound counters, and the far side's last accepted sequence number is
    // the one just before gw2's next.
    let gw2_out = |m: &Member| -> (u64, u64) {
        let v = m.view(DaemonKind::Espd, "tunnel-list").unwrap_or_default();
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == "vpn1_1")
            .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
            .find(|s| hex_u32(&s["enc"]["spi"]) == before.child.0)
            .map(|s| {
                (
                    s["enc_pkts"].as_u64().unwrap_or(0),
                    s["seqno"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default()
    };
    let far_dec = |far: &Far| -> (u64, u64) {
        far.esp_sa(before.child.0)
            .map(|s| {
                (
                    s["dec_pkts"].as_u64().unwrap_or(0),
                    s["replaywin_lastseq"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default()
    };
    std::thread::sleep(Duration::from_secs(1));
    let (tx0, next0) = gw2_out(&m2);
    let (rx0, last0) = far_dec(&far);
    const N: u32 = 10;
    let got = burst(&far_ns, CLIENT_INNER, SERVER, N);
    let (tx1, next1) = gw2_out(&m2);
    let (rx1, last1) = far_dec(&far);
    eprintln!(
        "quiet burst of {N}: gw2 sent {} (next {next0} -> {next1}), far accepted {} (last {last0} -> {last1}), {got} replies",
        tx1 - tx0,
        rx1 - rx0
    );
    assert_eq!(got, N as usize, "{}", far.logs());
    assert_eq!(tx1 - tx0, u64::from(N), "gw2's outbound packets");
    assert_eq!(rx1 - rx0, u64::from(N), "the far side accepted every one");
    assert_eq!(
        last1 + 1,
        next1,
        "the far side accepted up to gw2's last number"
    );
    for (spi, next_old) in &seq_old {
        if *spi == before.child.0 {
            assert!(
                next0 > *next_old,
                "gw2 sends beyond gw1 ({next0} <= {next_old})"
            );
        }
    }

    // Rekeys on the taken-over tunnel, from each side.
    let traffic = |what: &str| {
        let a = burst(&far_ns, CLIENT_INNER, SERVER, 5);
        let b = burst(&server, SERVER, CLIENT_INNER, 5);
        assert!(
            a >= 3 && b >= 3,
            "traffic after {what}: far->server {a}/5, server->far {b}/5\n{}\n{}",
            m2.logs(),
            far.logs()
        );
    };
    let child_changed = |old: (u32, u32)| {
        wait_for("the CHILD SA rekeyed on both sides", WAIT, || {
            let f = far.sa().ok_or("no far SA")?;
            let g = m2.ike_sa().ok_or("no gw2 SA")?;
            if f.child != old && g.2.contains(&f.child.1) {
                Ok(f)
            } else {
                Err(format!("far {f:?} gw2 {g:?}\n{}", far.logs()))
            }
        })
    };
    let ike_changed = |old: (u64, u64)| {
        wait_for("the IKE SA rekeyed on both sides", WAIT, || {
            let f = far.sa().ok_or("no far SA")?;
            let g = m2.ike_sa().ok_or("no gw2 SA")?;
            if f.ike != old && (g.0, g.1) == f.ike {
                Ok(f)
            } else {
                Err(format!("far {f:?} gw2 {g:?}\n{}", far.logs()))
            }
        })
    };
    // 1. The far Haven rekeys the CHILD SA, 2. its IKE SA.
    far.rekey("child").expect("far CHILD rekey");
    let s1 = child_changed(before.child);
    traffic("the far side's CHILD SA rekey");
    far.rekey("ike").expect("far IKE rekey");
    let s2 = ike_changed(s1.ike);
    traffic("the far side's IKE SA rekey");
    // 3. gw2 rekeys the CHILD SA, 4. the IKE SA.
    m2.command("ike-rekey", &["vpn1_1", "child"])
        .expect("gw2 CHILD rekey");
    let s3 = child_changed(s2.child);
    traffic("gw2's CHILD SA rekey");
    m2.command("ike-rekey", &["vpn1_1", "ike"])
        .expect("gw2 IKE rekey");
    ike_changed(s3.ike);
    traffic("gw2's IKE SA rekey");
    std::thread::sleep(Duration::from_millis(1500));
    check_drops("after the rekeys");
    drop(m2);
    drop(m1);
}

/// Whether `m`'s espd holds its outbound SA `spi` (its hasyncd gone).
fn sa_held(m: &Member, spi: u32) -> Option<bool> {
    let v = m.view(DaemonKind::Espd, "tunnel-list").ok()?;
    v["tunnels"]
        .as_array()?
        .iter()
        .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
        .find(|s| hex_u32(&s["enc"]["spi"]) == spi)
        .and_then(|s| s["ha_held"].as_bool())
}

/// `m`'s espd drops for `reason`, all SAs.
fn espd_drops(m: &Member, reason: &str) -> u64 {
    m.view(DaemonKind::Espd, "tunnel-list")
        .ok()
        .and_then(|v| v["drops"][reason].as_u64())
        .unwrap_or(0)
}

/// Runs `f` with the server's traffic to the far side's inside address sent to gw1's port2
/// (by its MAC, through a next hop only the server knows) instead of the shared address.
fn via_gw1<T>(server: &Netns, gw1: &Netns, f: impl FnOnce() -> T) -> T {
    const HOP: &str = "192.168.129.253";
    let mac = gw1
        .run("cat", &["/sys/class/net/port2/address"])
        .expect("gw1's port2 MAC");
    let host = format!("{CLIENT_INNER}/32");
    server
        .ip(&[
            "neigh",
            "replace",
            HOP,
            "lladdr",
            mac.trim(),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .unwrap();
    server
        .ip(&["route", "replace", &host, "via", HOP, "dev", "eth0"])
        .unwrap();
    let r = f();
    let _ = server.ip(&["route", "del", &host]);
    let _ = server.ip(&["neigh", "del", HOP, "dev", "eth0"]);
    r
}

/// While gw2 carries the tunnel (`why` gw1 must not send): three pings from the server,
/// sent to gw1's port, reach gw1's espd and are dropped there as `seq_lease` (the SA is
/// held), none leaves on the SA.
fn gw1_holds_the_servers_pings(server: &Netns, gw1: &Netns, m1: &Member, spi: u32, why: &str) {
    let (tx_held, _) = out_sa(m1, spi).expect("gw1's espd keeps the SA");
    let lease_drops = espd_drops(m1, "seq_lease");
    via_gw1(server, gw1, || burst(server, SERVER, CLIENT_INNER, 3));
    assert_eq!(
        out_sa(m1, spi).map(|(tx, _)| tx),
        Some(tx_held),
        "gw1 sent on the SA while gw2 carried the tunnel ({why})\n{}",
        m1.log("espd")
    );
    assert!(
        espd_drops(m1, "seq_lease") >= lease_drops + 3,
        "the pings did not reach gw1's espd (seq_lease drops {lease_drops} -> {})",
        espd_drops(m1, "seq_lease")
    );
}

/// espd's outbound SA of `vpn1_1` with SPI `spi`: (enc_pkts, next sequence number).
fn out_sa(m: &Member, spi: u32) -> Option<(u64, u64)> {
    let v = m.view(DaemonKind::Espd, "tunnel-list").ok()?;
    v["tunnels"]
        .as_array()?
        .iter()
        .filter(|t| t["name"] == "vpn1_1")
        .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
        .find(|s| hex_u32(&s["enc"]["spi"]) == spi)
        .map(|s| {
            (
                s["enc_pkts"].as_u64().unwrap_or(0),
                s["seqno"].as_u64().unwrap_or(0),
            )
        })
}

/// A one-sided split brain (hasyncd/README.md "After a split brain"): gw2 stops hearing
/// gw1 (everything gw1 sends on the heartbeat link is dropped at gw2), makes itself primary,
/// takes the tunnel over from its copy and the shared address, and carries the traffic;
/// gw1 still hears gw2, stays primary and keeps the tunnel in its ikemgr and espd, but
/// sends nothing on it while gw2 says it is primary: the server's pings sent to gw1's port
/// meanwhile are dropped there (`SeqHold`), where they used to leave below gw2's numbers
/// and be dropped by the far side as replays (the --ha-link fault run's three replays).
/// When the link heals gw2 steps down and gw1 claims the tunnel back while carrying it:
/// its espd must continue above every number gw2 sent (`SeqSkip`), or the far side drops
/// everything gw1 sends as replays. Asserted: gw1's espd holds the SA and sends none of
/// the pings; it continues above gw2's last sequence number; the far side dropped nothing
/// as a replay over the whole exchange; after that, a burst of pings adds exactly N to
/// gw1's outbound and the far inbound counters, the far side's last accepted number is
/// gw1's next minus one, and its replay and ICV drop counters do not move; the far side
/// kept its SPIs throughout.
#[test]
fn after_a_split_brain_the_primary_that_kept_the_tunnel_sends_above_the_other_member() {
    split_brain("ha-split-brain", "hasb", false);
}

/// The same with the HA link cut both ways: neither member hears the other, so gw1 never
/// learns during the split brain that gw2 took the tunnel over or synced the IKE SA. It
/// learns once the link heals, from gw2 (its snapshot, or the IKE SAs gw2 hands over when
/// it turns secondary).
#[test]
fn after_a_split_brain_both_ways_the_primary_continues_the_other_members_ike_sa() {
    split_brain("ha-split-brain2", "hasc", true);
}

/// gw2 stops hearing gw1 (and, `both_ways`, gw1 stops hearing gw2) for a while: both are
/// primary, gw2 takes the tunnel over from its copy and syncs the IKE SA's message IDs.
/// After the heal gw1 carries the tunnel above every number gw2 sent, continues at gw2's
/// message IDs, and rekeys from each side.
fn split_brain(name: &str, prefix: &str, both_ways: bool) {
    let PeerLab {
        _scratch,
        _router,
        far_ns,
        server,
        gw1,
        gw2,
        m1,
        m2,
        far,
        before,
    } = PeerLab::new(name, prefix);
    let spi = before.child.0;
    let from_far = ping_bg(&far_ns, CLIENT_INNER, SERVER, 400);
    std::thread::sleep(Duration::from_secs(1));
    let gw1_before = out_sa(&m1, spi).expect("gw1 sends");

    // gw2 hears nothing from gw1 (heartbeats and sync, UDP 703 from gw1's port4).
    let cut = |gw: &Netns, from: &str| {
        gw.nft(&format!(
            "table inet splitbrain {{ chain in {{ type filter hook input priority 0; \
             ip saddr {from} udp dport 703 drop; }}; }}"
        ))
        .unwrap();
    };
    cut(&gw2, "169.254.0.1");
    if both_ways {
        cut(&gw1, "169.254.0.2");
    }
    let gw2_during = wait_for(
        "gw2 carries the tunnel during the split brain",
        WAIT,
        || {
            let r = m2.role();
            match (r.as_deref(), out_sa(&m2, spi)) {
                (Some("primary"), Some((tx, next))) if tx > 20 => Ok(next),
                other => Err(format!("{other:?}\n{}", m2.logs())),
            }
        },
    );
    assert_eq!(m1.role().as_deref(), Some("primary"), "gw1 stays primary");
    assert!(
        out_sa(&m1, spi).is_some(),
        "gw1's espd keeps the tunnel (it is primary in its own view)"
    );
    if !both_ways {
        // gw1 hears gw2 say it is primary and sees its claim: it holds the SA.
        wait_for("gw1's espd holds the SA gw2 carries", WAIT, || {
            (sa_held(&m1, spi) == Some(true))
                .then_some(())
                .ok_or_else(|| m1.logs())
        });
        gw1_holds_the_servers_pings(&server, &gw1, &m1, spi, "gw2 said it was primary");
        assert!(
            m1.log("hasyncd")
                .contains("split brain); this member's outbound SAs"),
            "{}",
            m1.log("hasyncd")
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    // Heal; then the highest number gw2 reached while it still carried the SA counts.
    gw2.nft("delete table inet splitbrain").unwrap();
    if both_ways {
        gw1.nft("delete table inet splitbrain").unwrap();
    }
    let (gw2_max, skipped) = gw1_carries_again_above_gw2(&m1, &m2, spi, gw2_during, 1);
    let (a, _) = ping_result(from_far);
    eprintln!(
        "split brain: gw1 sent up to {} before, gw2 reached {gw2_max}, gw1 continued at {skipped}; far->server {} of 400 answered",
        gw1_before.1,
        a.len()
    );
    assert!(
        m1.log("hasyncd").contains("continues at sequence"),
        "{}",
        m1.logs()
    );

    if !both_ways {
        // Nothing gw1 or gw2 sent was dropped as a replay, across the whole exchange.
        assert_eq!(far.drops("replay"), 0, "{}\n{}", m1.logs(), far.metrics());
    }
    gw1_sends_in_sequence_above(&far_ns, &m1, &far, spi, gw2_max, &before, "the split brain");

    // gw2 took the tunnel over from its copy and synced the IKE SA's message IDs with the
    // far side (RFC 6311: AES-GCM, one sync only) while gw1 kept its own SA. gw1 continues
    // at gw2's IDs: its next request (a CHILD SA rekey) is answered, and so is the far
    // side's.
    assert!(
        m2.log("ikemgr").contains("RFC 6311 sync done"),
        "{}",
        m2.logs()
    );
    let replays = far.drops("replay");
    m1.command("ike-rekey", &["vpn1_1", "child"])
        .expect("gw1 CHILD rekey");
    let rekeyed = wait_for("gw1's CHILD SA rekey answered", WAIT, || {
        let f = far.sa().ok_or("no far SA")?;
        let g = m1.ike_sa().ok_or("no gw1 SA")?;
        if f.child != before.child && g.2.contains(&f.child.1) {
            Ok(f)
        } else {
            Err(format!(
                "far {f:?} gw1 {g:?}\n{}\n{}",
                m1.logs(),
                far.logs()
            ))
        }
    });
    far.rekey("child").expect("far CHILD rekey");
    wait_for(
        "the far side's CHILD SA rekey answered by gw1",
        WAIT,
        || {
            let f = far.sa().ok_or("no far SA")?;
            let g = m1.ike_sa().ok_or("no gw1 SA")?;
            if f.child != rekeyed.child && g.2.contains(&f.child.1) {
                Ok(())
            } else {
                Err(format!(
                    "far {f:?} gw1 {g:?}\n{}\n{}",
                    m1.logs(),
                    far.logs()
                ))
            }
        },
    );
    assert_eq!(
        far.sa().map(|f| f.ike),
        Some(before.ike),
        "the far side renegotiated"
    );
    assert_eq!(far.drops("replay"), replays, "{}", far.metrics());
}

/// gw1 primary and gw2 secondary again, gw2's espd without the tunnel, and gw1's espd
/// continuing above every number gw2 reached (`gw2_max` so far, raised by what gw2's espd
/// shows meanwhile), either after a skip of the SA it kept (its log says so) or with the SA
/// installed anew (gw1's ikemgr had heard that gw2 carries the tunnel, went standby and
/// took it back as a takeover: espd logs a second install). Which of the two happened
/// depends on whether gw1's hasyncd hears gw2's snapshot before it wins the election; both
/// must end above gw2. `installs` is how often gw1's espd had installed the SA so far (0
/// for an SA gw2 negotiated meanwhile: then it must be installed). Returns gw2's highest
/// number and gw1's next.
fn gw1_carries_again_above_gw2(
    m1: &Member,
    m2: &Member,
    spi: u32,
    gw2_max: u64,
    installs: usize,
) -> (u64, u64) {
    let mut gw2_max = gw2_max;
    wait_for("gw1 primary, gw2 secondary", WAIT, || {
        if let Some((_, next)) = out_sa(m2, spi) {
            gw2_max = gw2_max.max(next);
        }
        match (m1.role(), m2.role()) {
            (Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_for("gw2's espd dropped the tunnel", WAIT, || {
        match out_sa(m2, spi) {
            None => Ok(()),
            Some((_, next)) => {
                gw2_max = gw2_max.max(next);
                Err(format!("gw2 still at {next}"))
            }
        }
    });
    let skipped = wait_for("gw1's espd continues above gw2", WAIT, || {
        let (_, next) = out_sa(m1, spi).ok_or("gw1 has no SA")?;
        let espd = m1.log("espd");
        let skip = format!("outbound {spi:08x} continues at sequence");
        let skipped = espd.contains(&skip);
        let reinstalled = espd_installs(m1, spi) > installs;
        if (skipped || reinstalled) && next > gw2_max {
            eprintln!(
                "gw1 continues at {next} above gw2's {gw2_max}: {}",
                if skipped {
                    "its espd skipped the SA it kept"
                } else {
                    "the SA installed anew by a takeover"
                }
            );
            Ok(next)
        } else {
            Err(format!(
                "gw1 next {next}, gw2 reached {gw2_max}\n{}",
                m1.logs()
            ))
        }
    });
    // An SA espd kept: gw1's hasyncd announced the shared addresses only once espd asked
    // for a lease above the skip (before it, the traffic the announcement moves to gw1
    // would leave below gw2's numbers), not on the timeout. espd's request follows its
    // skip by a wake-up and a persisted mark: hasyncd logs one or the other after it.
    let hasyncd = m1.log("hasyncd");
    if hasyncd.contains("continue above the other member: the shared addresses are announced once")
    {
        let confirmed = wait_for(
            "gw1's hasyncd to announce the shared addresses",
            WAIT,
            || {
                let log = m1.log("hasyncd");
                if log.contains("espd continues above the other member on every SA kept here") {
                    Ok(true)
                } else if log.contains("espd did not confirm") {
                    Ok(false)
                } else {
                    Err(m1.logs())
                }
            },
        );
        assert!(confirmed, "{}", m1.logs());
    }
    (gw2_max, skipped)
}

/// `kill -9` of gw1's hasyncd alone: gw2 hears no heartbeat, becomes primary and sends on
/// the SA with outbound SPI `spi`. Returns gw2's next sequence number then.
fn gw2_carries_once_gw1s_hasyncd_died(m1: &mut Member, m2: &Member, spi: u32) -> u64 {
    m1.kill9("hasyncd");
    wait_for("gw2 carries the tunnel", WAIT, || {
        match (m2.role().as_deref(), out_sa(m2, spi)) {
            (Some("primary"), Some((tx, next))) if tx > 20 => Ok(next),
            other => Err(format!("{other:?}\n{}", m2.logs())),
        }
    })
}

/// How often `m`'s espd installed the SA sending on `spi` (its log).
fn espd_installs(m: &Member, spi: u32) -> usize {
    let out = format!(" out {spi:08x} ");
    m.log("espd")
        .lines()
        .filter(|l| l.contains(" installed: ") && l.contains(&out))
        .count()
}

/// From here on gw1 carries the tunnel: nothing it sends is dropped by the far side. A burst
/// of pings adds exactly N to gw1's outbound and the far inbound counters, the far side's
/// last accepted number is gw1's next minus one and above `gw2_max`, its replay and ICV drop
/// counters do not move, and it kept its SPIs (`before`).
fn gw1_sends_in_sequence_above(
    far_ns: &Netns,
    m1: &Member,
    far: &Far,
    spi: u32,
    gw2_max: u64,
    before: &FarSa,
    after: &str,
) {
    wait_for("traffic through gw1", WAIT, || {
        (burst(far_ns, CLIENT_INNER, SERVER, 2) == 2)
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", m1.logs(), far.logs()))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (replay0, icv0) = (far.drops("replay"), far.drops("icv"));
    let far_in = |far: &Far| {
        far.esp_sa(spi)
            .map(|s| {
                (
                    s["dec_pkts"].as_u64().unwrap_or(0),
                    s["replaywin_lastseq"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default()
    };
    let (tx0, _) = out_sa(m1, spi).unwrap();
    let (rx0, _) = far_in(far);
    const N: u32 = 10;
    let got = burst(far_ns, CLIENT_INNER, SERVER, N);
    let (tx1, next1) = out_sa(m1, spi).unwrap();
    let (rx1, last1) = far_in(far);
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!(
        "after {after}: far drops replay {replay0} icv {icv0} (during it); burst of {N}: gw1 sent {}, far accepted {}, last {last1}, gw1 next {next1}",
        tx1 - tx0,
        rx1 - rx0
    );
    assert_eq!(got, N as usize, "{}\n{}", m1.logs(), far.logs());
    assert_eq!(tx1 - tx0, u64::from(N));
    assert_eq!(rx1 - rx0, u64::from(N), "the far side accepted every one");
    assert_eq!(last1 + 1, next1);
    assert!(last1 > gw2_max, "{last1} <= {gw2_max}");
    assert_eq!(
        (far.drops("replay"), far.drops("icv")),
        (replay0, icv0),
        "drops after {after}:\n{}",
        far.metrics()
    );
    assert_eq!(far.sa().as_ref(), Some(before), "the far side renegotiated");
}

/// The carrier's hasyncd dies (`kill -9`) while its ikemgr and espd keep the tunnel (the
/// `--ha-link` fault run's repeated sequence numbers): gw2 hears no heartbeat, makes itself
/// primary, takes the tunnel over with the shared address and sends above gw1's leases.
/// Meanwhile gw1's espd holds the SA (its hasyncd gone for half the heartbeat loss time):
/// pings the server sends to gw1's port are dropped there, not sent below gw2's numbers.
/// gw1's hasyncd comes back, wins the election again (priority; the uptimes are within
/// the margin) and takes the tunnel back from gw2 while gw1's ikemgr still has the IKE SA
/// established, so ikemgr installs nothing: the takeover's start must reach gw1's espd
/// directly (`SeqSkip`), or it continues at its own counter, below everything gw2 sent,
/// and the far side drops all of it as replays (and a later espd restart resumes at its
/// old lease's end, numbers gw2 already used). Asserted: gw1's espd continues above gw2's
/// last sequence number; then the checks of [`gw1_sends_in_sequence_above`]; and gw2 holds
/// the standby copy of the IKE SA again.
#[test]
fn a_carrier_whose_hasyncd_restarted_takes_the_tunnel_back_above_the_partner() {
    let PeerLab {
        _scratch,
        _router,
        far_ns,
        server,
        gw1,
        gw2: _gw2,
        mut m1,
        m2,
        far,
        before,
    } = PeerLab::new("ha-hasyncd-restart", "hahr");
    let spi = before.child.0;
    let from_far = ping_bg(&far_ns, CLIENT_INNER, SERVER, 400);
    std::thread::sleep(Duration::from_secs(1));
    let gw1_before = out_sa(&m1, spi).expect("gw1 sends");

    let gw2_max = gw2_carries_once_gw1s_hasyncd_died(&mut m1, &m2, spi);
    // gw1 keeps the shared address on its port (only its hasyncd died), so traffic can
    // still reach it; gw2 sends above everything gw1 may have sent, so whatever gw1 sent
    // now the far side would drop as replays (the --ha-link fault run's one replay). gw1's
    // espd held the SA once its hasyncd had been gone for half the heartbeat loss time:
    // the server's pings sent to gw1's port are dropped there, not sent.
    gw1_holds_the_servers_pings(&server, &gw1, &m1, spi, "its hasyncd was down");
    assert_eq!(
        sa_held(&m1, spi),
        Some(true),
        "gw1's espd shows the SA held while its hasyncd is gone\n{}",
        m1.log("espd")
    );
    let gw2_log_at = m2.log("hasyncd").len();
    m1.restart("hasyncd");
    let (gw2_max, skipped) = gw1_carries_again_above_gw2(&m1, &m2, spi, gw2_max, 1);
    // gw2 holds the standby copy of the IKE SA gw1 carries again, as the snapshot of gw1's
    // new hasyncd left it, so a later failover needs no renegotiation. In the --ha-link
    // fault run a restarted hasyncd that heard ikemgr before its links started sent
    // snapshots without the IKE SA; the partner dropped its copy and could not take over.
    wait_for("gw2 applied a snapshot of gw1's new hasyncd", WAIT, || {
        m2.log_since("hasyncd", gw2_log_at)
            .lines()
            .any(|l| l.contains("fgcp: snapshot from member") && l.contains(" applied: "))
            .then_some(())
            .ok_or_else(|| m2.logs())
    });
    let ike = m1.ike_sa().expect("gw1's IKE SA");
    wait_for("gw2's standby copy of gw1's IKE SA", WAIT, || {
        let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
        v["ike_standby"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|c| (hex_u64(&c["spi_i"]), hex_u64(&c["spi_r"])) == (ike.0, ike.1))
            })
            .then_some(())
            .ok_or_else(|| format!("{v}\n{}", m1.logs()))
    });
    let (a, _) = ping_result(from_far);
    eprintln!(
        "hasyncd restart: gw1 sent up to {} before, gw2 reached {gw2_max}, gw1 continued at {skipped}; far->server {} of 400 answered",
        gw1_before.1,
        a.len()
    );
    // Nothing gw1 or gw2 sent was dropped as a replay, across the whole exchange: gw1's
    // hasyncd announced the shared addresses only once its espd had moved above gw2.
    assert_eq!(far.drops("replay"), 0, "{}\n{}", m1.logs(), far.metrics());
    gw1_sends_in_sequence_above(
        &far_ns,
        &m1,
        &far,
        spi,
        gw2_max,
        &before,
        "the hasyncd restart",
    );
}

/// As above, but while gw2 carries the tunnel the far side rekeys the CHILD SA and gw2
/// rekeys the IKE SA: gw1's ikemgr, which kept the old IKE SA established, must continue
/// the copy gw2 made (the peer has only its SAs): gw1's espd sends on the new CHILD SA
/// above everything gw2 sent on it, the old SA is gone from gw1, and the far side accepts
/// every packet without renegotiating.
#[test]
fn a_tunnel_rekeyed_while_the_partner_carried_it_is_taken_back_with_the_new_sas() {
    let PeerLab {
        _scratch,
        _router,
        far_ns,
        server: _server,
        gw1: _gw1,
        gw2: _gw2,
        mut m1,
        m2,
        far,
        before,
    } = PeerLab::new("ha-rekeyed-back", "harb");
    let old_spi = before.child.0;
    let from_far = ping_bg(&far_ns, CLIENT_INNER, SERVER, 400);
    std::thread::sleep(Duration::from_secs(1));

    gw2_carries_once_gw1s_hasyncd_died(&mut m1, &m2, old_spi);
    far.rekey("child").expect("far CHILD rekey");
    let rekeyed = wait_for("the CHILD SA rekeyed with gw2", WAIT, || {
        let f = far.sa().ok_or("no far SA")?;
        match out_sa(&m2, f.child.0) {
            Some((tx, _)) if f.child != before.child && tx > 5 => Ok(f),
            other => Err(format!("far {f:?} gw2 {other:?}\n{}", far.logs())),
        }
    });
    m2.command("ike-rekey", &["vpn1_1", "ike"])
        .expect("gw2 IKE rekey");
    let after = wait_for("the IKE SA rekeyed with gw2", WAIT, || {
        let f = far.sa().ok_or("no far SA")?;
        let g = m2.ike_sa().ok_or("no gw2 SA")?;
        if f.ike != rekeyed.ike && (g.0, g.1) == f.ike {
            Ok(f)
        } else {
            Err(format!("far {f:?} gw2 {g:?}\n{}", far.logs()))
        }
    });
    let spi = after.child.0;
    // gw2's copy of the rekeys reaches gw1 only through gw1's hasyncd: gw1 still holds the
    // old SAs.
    assert!(out_sa(&m1, old_spi).is_some(), "{}", m1.logs());
    assert!(out_sa(&m1, spi).is_none(), "{}", m1.logs());
    let gw2_max = out_sa(&m2, spi).map(|(_, next)| next).unwrap_or(0);

    m1.restart("hasyncd");
    let (gw2_max, skipped) = gw1_carries_again_above_gw2(&m1, &m2, spi, gw2_max, 0);
    for l in m1.log("ikemgr").lines().filter(|l| {
        l.contains("taken back while established") || l.contains("HA takeover of IKE SA")
    }) {
        eprintln!("gw1 ikemgr: {l}");
    }
    wait_for("gw1's espd dropped the old SA", WAIT, || {
        match out_sa(&m1, old_spi) {
            None => Ok(()),
            Some(s) => Err(format!("{s:?}\n{}", m1.logs())),
        }
    });
    let (a, _) = ping_result(from_far);
    eprintln!(
        "rekeyed while gw2 carried: gw2 reached {gw2_max} on {spi:08x}, gw1 continued at {skipped}; far->server {} of 400 answered",
        a.len()
    );
    // Nothing gw1 or gw2 sent was dropped as a replay, across the whole exchange: gw1's
    // hasyncd announced the shared addresses only once its espd had moved above gw2.
    assert_eq!(far.drops("replay"), 0, "{}\n{}", m1.logs(), far.metrics());
    gw1_sends_in_sequence_above(&far_ns, &m1, &far, spi, gw2_max, &after, "the take-back");
    // gw1's ikemgr holds the IKE SA the far side holds.
    let g1 = m1.ike_sa().expect("gw1's IKE SA");
    assert_eq!((g1.0, g1.1), after.ike, "{}", m1.logs());
}
