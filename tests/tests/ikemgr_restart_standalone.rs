//! `kill -9 ikemgr` on a gateway without any cluster configuration (hasyncd runs
//! standalone, DESIGN.md §3.3, issue 6 point 8): the restarted ikemgr continues its IKE SA
//! from hasyncd's local replica, the tunnel never goes down, and the next rekeys work.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (Haven: 4 daemons) - 10.99.2.2 server
//! ```
//!
//! Asserted: the new ikemgr logs the restore and carries strongSwan's IKE SA with the same
//! CHILD SA; espd neither removed nor installed an SA and its outbound sequence numbers go
//! on rising; ping loses nothing (counted from ping's own summary); strongSwan's SPIs are
//! unchanged and it starts no IKE_SA_INIT; then a CHILD SA rekey and an IKE SA rekey started
//! by strongSwan and by Haven complete in place.
//!
//! Needs root, iproute2, iputils-ping and the strongSwan packages (INTEROP.md).

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use haven_tests::daemons::wait_for;
use haven_tests::member::{self, client_sa};
use haven_tests::netns::{Netns, Proc, ScratchDir, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-ikemgr-restart-psk-0123456789";
const WAIT: Duration = Duration::from_secs(30);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";
const DAEMONS: [(&str, u16); 4] = [
    ("hasyncd", 19803),
    ("espd", 19804),
    ("ikemgr", 19801),
    ("dpdmon", 19802),
];

fn config() -> String {
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
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

/// The gateway in gwb: the four daemons, no `config system ha`, no standalone cluster.
struct Gateway {
    ns: Netns,
    dir: ScratchDir,
    run: PathBuf,
    procs: Vec<Proc>,
}

impl Gateway {
    fn start(ns: &Netns) -> Gateway {
        let dir = ScratchDir::new("ikemgr-restart-sa").expect("scratch dir");
        let run = dir.path().join("run");
        std::fs::write(dir.path().join("haven.conf"), config()).expect("config");
        let mut g = Gateway {
            ns: ns.clone(),
            dir,
            run,
            procs: Vec::new(),
        };
        for (d, _) in DAEMONS {
            let p = g.spawn(d);
            g.procs.push(p);
        }
        wait_for("ikemgr listening", WAIT, || {
            g.log("ikemgr")
                .contains("listening on UDP 500")
                .then_some(())
                .ok_or_else(|| g.log("ikemgr"))
        });
        g
    }

    fn spawn(&self, daemon: &str) -> Proc {
        let port = DAEMONS
            .iter()
            .find(|(d, _)| *d == daemon)
            .map(|(_, p)| *p)
            .expect("a daemon");
        let conf = self.dir.path().join("haven.conf");
        member::spawn_daemon(&self.ns, daemon, port, &conf, &self.run, self.dir.path())
    }

    fn kill9_and_restart(&mut self, daemon: &str) {
        let i = DAEMONS
            .iter()
            .position(|(d, _)| *d == daemon)
            .expect("a daemon");
        let _ = self.procs[i].kill_now();
        self.procs[i] = self.spawn(daemon);
    }

    fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ["hasyncd", "ikemgr", "espd"]
            .iter()
            .map(|d| format!("--- {d} ---\n{}", self.log(d)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ctl(&self, daemon: DaemonKind, req: CtlRequest) -> Result<Value, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        match rt.block_on(ctl_call(&self.run, daemon, &req, Duration::from_secs(2))) {
            Ok(CtlReply::View(v)) => Ok(v),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// ikemgr's IKE SA of vpn1_1: (spi_i, spi_r, CHILD inbound SPIs).
    fn ike_sa(&self) -> Option<(String, String, Vec<String>)> {
        let v = self
            .ctl(
                DaemonKind::Ikemgr,
                CtlRequest::View {
                    name: "ike-gateways".into(),
                    args: vec![],
                },
            )
            .ok()?;
        let sa = v.as_array()?.iter().find(|s| s["name"] == "vpn1_1")?;
        Some((
            sa["spi_i"].as_str()?.to_string(),
            sa["spi_r"].as_str()?.to_string(),
            sa["children"]
                .as_array()?
                .iter()
                .filter_map(|c| c["spi_in"].as_str().map(str::to_string))
                .collect(),
        ))
    }

    /// espd's outbound SAs of vpn1_1: (spi, next sequence number).
    fn esp_seqs(&self) -> Vec<(String, u64)> {
        let Ok(v) = self.ctl(
            DaemonKind::Espd,
            CtlRequest::View {
                name: "tunnel-list".into(),
                args: vec![],
            },
        ) else {
            return Vec::new();
        };
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == "vpn1_1")
            .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
            .map(|s| {
                (
                    s["enc"]["spi"].as_str().unwrap_or("").to_string(),
                    s["seqno"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    fn rekey(&self, what: &str) -> Result<Value, String> {
        self.ctl(
            DaemonKind::Ikemgr,
            CtlRequest::Command {
                name: "ike-rekey".into(),
                args: vec!["vpn1_1".into(), what.into()],
            },
        )
    }
}

/// Answered pings of `count` sent every `interval` seconds from the client.
fn ping(line: &SiteToSite, count: u32, interval: &str) -> (u32, String) {
    let out = line
        .client
        .exec(
            "ping",
            &[
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                interval,
                "-W",
                "2",
                SiteToSite::SERVER,
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let got = out.lines().filter(|l| l.contains("icmp_seq=")).count() as u32;
    (got, out)
}

#[test]
fn kill_9_ikemgr_on_a_standalone_gateway_keeps_the_tunnel_and_its_rekeys() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let line = SiteToSite::new("ikrs").expect("topology");
    let mut gw = Gateway::start(&line.gwb);
    let mut charon = Charon::start(&line.gwa).expect("charon in gwa");
    charon
        .load(
            &SwanctlConf::new().conn(
                Conn::psk(
                    "dial",
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
        .expect("load client");
    if let Err(e) = charon.initiate("net", WAIT) {
        panic!("initiate: {e}\n{}\n{}", charon.log(), gw.logs());
    }
    let before = client_sa(&charon).expect("client IKE SA");
    let child_before = before.child("net").expect("client CHILD SA").clone();
    let sa_before = wait_for("ikemgr's IKE SA", WAIT, || {
        gw.ike_sa().ok_or_else(|| gw.logs())
    });
    wait_for("first ping", WAIT, || {
        let (got, out) = ping(&line, 1, "0.2");
        (got == 1).then_some(()).ok_or(out)
    });
    wait_for("hasyncd's local replica holds the IKE SA", WAIT, || {
        gw.log("hasyncd")
            .contains("bus ikemgr")
            .then_some(())
            .ok_or_else(|| gw.logs())
    });

    // Continuous ping; ikemgr killed and started again in the middle of it.
    let pinger = {
        let mut cmd = line.client.command("ping");
        cmd.args([
            "-n",
            "-c",
            "120",
            "-i",
            "0.05",
            "-W",
            "2",
            SiteToSite::SERVER,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        line.client.spawn_command(cmd).expect("ping")
    };
    std::thread::sleep(Duration::from_secs(1));
    let seq_old = gw.esp_seqs();
    let (espd_at, ikemgr_at, charon_at) = (
        gw.log("espd").len(),
        gw.log("ikemgr").len(),
        charon.log().len(),
    );
    gw.kill9_and_restart("ikemgr");
    wait_for("the restarted ikemgr carries the IKE SA", WAIT, || {
        let l = gw.log("ikemgr");
        if !l[ikemgr_at.min(l.len())..].contains("started pid=") {
            return Err("not restarted yet".into());
        }
        gw.ike_sa()
            .filter(|sa| *sa == sa_before)
            .ok_or_else(|| format!("{:?} (before {sa_before:?})\n{}", gw.ike_sa(), gw.logs()))
    });
    let mut pinger = pinger;
    wait_for("ping to finish", Duration::from_secs(60), || {
        match pinger.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err("still running".to_string()),
        }
    });
    let mut text = String::new();
    if let Some(mut o) = pinger.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    let answered = text.lines().filter(|l| l.contains("icmp_seq=")).count();
    let ikemgr_after = gw.log("ikemgr")[ikemgr_at..].to_string();
    let espd_after = gw.log("espd")[espd_at..].to_string();
    eprintln!("standalone ikemgr restart: {answered} of 120 pings answered");
    assert!(
        ikemgr_after.contains("restart: continued from the local hasyncd replica"),
        "{ikemgr_after}"
    );
    for word in ["removed", "installed", "replaced"] {
        assert!(
            !espd_after
                .lines()
                .any(|l| l.contains("SA ") && l.contains(word)),
            "espd {word} an SA during the ikemgr restart:\n{espd_after}"
        );
    }
    assert_eq!(answered, 120, "pings lost:\n{text}\n{}", gw.logs());
    let seq_new = gw.esp_seqs();
    assert!(!seq_old.is_empty());
    for (spi, old) in &seq_old {
        let new = seq_new
            .iter()
            .find(|(s, _)| s == spi)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("espd lost {spi}: {seq_new:?}"));
        assert!(new > *old, "{spi}: {old} -> {new}");
    }
    let after = client_sa(&charon).expect("client IKE SA after the restart");
    assert_eq!(after.spis(), before.spis(), "IKE SA renegotiated");
    let c = after.child("net").expect("client CHILD SA").clone();
    assert_eq!(
        (c.spi_in, c.spi_out),
        (child_before.spi_in, child_before.spi_out)
    );
    assert!(
        !charon.log()[charon_at..].contains("IKE_SA_INIT"),
        "{}",
        charon.log()
    );

    // Rekeys from each side.
    let traffic = |what: &str| {
        let (got, out) = ping(&line, 5, "0.2");
        assert!(got >= 3, "ping after {what}: {out}\n{}", gw.logs());
    };
    charon.rekey_child("net").expect("swanctl --rekey --child");
    let c1 = wait_for("strongSwan's CHILD rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        if c.spi_in != child_before.spi_in && c.state == "INSTALLED" {
            Ok(c)
        } else {
            Err(format!("{c:?}\n{}", gw.logs()))
        }
    });
    traffic("strongSwan's CHILD SA rekey");
    gw.rekey("child").expect("Haven CHILD rekey");
    wait_for("Haven's CHILD rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        (c.spi_in != c1.spi_in && c.state == "INSTALLED")
            .then_some(())
            .ok_or_else(|| format!("{c:?}\n{}", gw.logs()))
    });
    traffic("Haven's CHILD SA rekey");
    charon.rekey_ike("dial").expect("swanctl --rekey --ike");
    let ike1 = wait_for("strongSwan's IKE rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != before.spis())
            .then_some(sa.spis())
            .ok_or_else(|| gw.logs())
    });
    traffic("strongSwan's IKE SA rekey");
    gw.rekey("ike").expect("Haven IKE rekey");
    wait_for("Haven's IKE rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != ike1).then_some(()).ok_or_else(|| gw.logs())
    });
    traffic("Haven's IKE SA rekey");
    let sas = charon.list_sas().unwrap();
    assert_eq!(
        sas.iter().filter(|s| s.name == "dial").count(),
        1,
        "{sas:#?}"
    );
    let _ = charon.kill();
}
