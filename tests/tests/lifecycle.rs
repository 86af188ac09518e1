//! Tunnel lifecycle against strongSwan (issue 9): what a static tunnel does after its peer is
//! declared dead, `passive-mode`, and backup peers.
//!
//! Haven's static gateway `vpn1` (ikemgr + espd + dpdmon in gwb, one run-dir) and a strongSwan
//! responder (charon in gwa, PSK):
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (Haven) - 10.99.2.2 server
//! ```
//!
//! Short DPD settings (`dpd on-idle`, `dpd-retrycount 2`, `dpd-retryinterval 2`: a silent
//! peer is dead after about 6 s). The tests:
//! - (a) `dpd-action` unset with `auto-negotiate enable` (restart): charon is SIGKILLed, the
//!   dead verdict flushes the tunnel, Haven starts a new attempt while the peer is away;
//!   charon is started again (same config, responder only) and the tunnel comes back by
//!   itself;
//! - (b) `dpd-action hold`: after the dead verdict the tunnel stays down although the peer is
//!   back, until `vpnctl diagnose vpn tunnel up vpn1 vpn1`;
//! - (c) `passive-mode enable`: Haven never initiates, also not after a dead verdict;
//!   strongSwan brings the tunnel up, `get vpn ipsec tunnel summary` shows
//!   `selectors(total,up): 1/1`;
//! - (d) backup peers with two strongSwan responders (the second, charon in gwc at
//!   172.31.1.1 on a second link of gwb): a backup phase1 `vpn2` (`set monitor "vpn1"`) comes
//!   up when gwa is killed, and is deleted when gwa is back and `vpn1` renegotiates;
//!   (e) `set remote-gw 172.31.0.1 172.31.1.1` with `set remote-gw-preempt-interval 5`:
//!   gwa killed, the tunnel moves to gwc; gwa back while gwc still works, a pre-emption
//!   trial finds gwa, the tunnel moves back to it and gwc's IKE SA is deleted (make before
//!   break).
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md); without them the tests FAIL
//! naming what is missing. Intervals are printed, never asserted.

use std::time::{Duration, Instant};

use haven_tests::daemons::{vpnctl_json, wait_for};
use haven_tests::gateway::{require_strongswan as require, tail, Gateway};
use haven_tests::netns::{self, Netns, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-lifecycle-strongswan-psk-0123456789";
const WAIT: Duration = Duration::from_secs(30);
const GW_ID: &str = "gwb.haven.test";
const PEER_ID: &str = "gwa.haven.test";

/// Haven's static gateway `vpn1` to gwa with on-idle DPD and `extra` phase1 lines.
fn gateway_config(extra: &str) -> String {
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
        set dpd-retrycount 2
        set dpd-retryinterval 2
        set psksecret \"{PSK}\"
{extra}    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set auto-negotiate enable
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

/// strongSwan in gwa: answers Haven (and can initiate to it, `net`).
fn peer_conf() -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk(
            "gw",
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            PSK.as_bytes(),
        )
        .ids(PEER_ID, GW_ID)
        .proposals(&["aes128gcm16-prfsha256-ecp256"])
        .child(
            ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                .esp_proposals(&["aes128gcm16"]),
        ),
    )
}

haven_tests::gateway_newtype!(
    /// ikemgr, espd and dpdmon of one gateway (killed on drop).
    Haven
);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [
            ("ikemgr", "127.0.0.1:19801"),
            ("espd", "127.0.0.1:19802"),
            ("dpdmon", "127.0.0.1:19803"),
        ];
        Haven(Gateway::start(ns, label, conf_text, &daemons, WAIT))
    }

    fn logs(&self) -> String {
        self.log_tails(&["ikemgr", "dpdmon", "espd"], 40)
    }

    /// ikemgr's `lifecycle` view of `vpn1`.
    fn lifecycle(&self) -> Value {
        self.0.lifecycle("vpn1")
    }

    /// True when ikemgr has an established IKE SA of `vpn1` with a CHILD SA.
    fn up(&self) -> bool {
        self.ike_up("vpn1", None)
    }
}

/// Waits until both ends have the tunnel and a ping from the client reaches the server.
fn wait_up(line: &SiteToSite, a: &Charon, gw: &Haven, what: &str) {
    wait_for(what, WAIT * 3, || {
        gw.up().then_some(()).ok_or_else(|| {
            format!(
                "{}\nlifecycle: {}\n{}",
                gw.logs(),
                gw.lifecycle(),
                tail(&a.log(), 20)
            )
        })
    });
    wait_for("ping through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", gw.logs()))
    });
}

/// Kills charon and waits for dpdmon's dead verdict to flush `vpn1` in ikemgr.
fn kill_and_wait_dead(a: &mut Charon, gw: &Haven) -> Instant {
    a.kill().expect("kill charon");
    let t = Instant::now();
    wait_for("dead verdict flushes vpn1", WAIT, || {
        (!gw.up() && gw.log("ikemgr").contains("dead peer, dpd-action"))
            .then_some(())
            .ok_or_else(|| gw.logs())
    });
    println!("dead verdict and flush {:?} after the kill", t.elapsed());
    t
}

#[test]
fn restart_renegotiates_after_a_dead_peer_by_itself() {
    require();
    let line = SiteToSite::new("lfrs").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf()).expect("load responder");
    let gw = Haven::start(&line.gwb, "lfrs-gw", &gateway_config(""));
    wait_up(&line, &a, &gw, "Haven initiates vpn1");
    let lc = gw.lifecycle();
    assert_eq!(lc["dpd_action"], "restart", "{lc}");
    assert_eq!(lc["state"], "up", "{lc}");

    let killed = kill_and_wait_dead(&mut a, &gw);
    assert!(
        gw.log("ikemgr")
            .contains("dead peer, dpd-action restart: renegotiating with 172.31.0.1"),
        "{}",
        gw.logs()
    );
    // The peer stays away: Haven tries again by itself (an attempt gives up after ike-proto's
    // retransmission schedule, about a minute; the growing waits between failed attempts
    // are checked in ikemgr's unit tests).
    wait_for("a new attempt while the peer is away", WAIT, || {
        let log = gw.log("ikemgr");
        let after = log.split("dead peer, dpd-action").nth(1).unwrap_or("");
        after
            .contains("initiating IKE SA to 172.31.0.1")
            .then_some(())
            .ok_or_else(|| gw.logs())
    });
    let lc = gw.lifecycle();
    assert_eq!(lc["state"], "negotiating", "{lc}");
    println!("lifecycle while the peer is away: {lc}");

    // The peer returns as a responder only: the tunnel comes back by itself.
    a.restart().expect("restart charon");
    let back = Instant::now();
    wait_up(&line, &a, &gw, "vpn1 renegotiated by Haven");
    println!(
        "back {:?} after charon's restart ({:?} after the kill)",
        back.elapsed(),
        killed.elapsed()
    );
    let ss = a.list_sas().expect("list-sas");
    assert!(
        ss.iter().all(|s| !s.initiator),
        "Haven initiated again: {ss:?}"
    );
    let lc = gw.lifecycle();
    assert_eq!((&lc["state"], &lc["failures"]), (&"up".into(), &0.into()));
}

#[test]
fn hold_waits_for_the_operator_after_a_dead_peer() {
    require();
    let line = SiteToSite::new("lfhd").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf()).expect("load responder");
    let gw = Haven::start(
        &line.gwb,
        "lfhd-gw",
        &gateway_config("        set dpd-action hold\n"),
    );
    wait_up(&line, &a, &gw, "Haven initiates vpn1");
    kill_and_wait_dead(&mut a, &gw);
    assert_eq!(gw.lifecycle()["state"], "held", "{}", gw.logs());
    a.restart().expect("restart charon");
    // Longer than the first two restart waits (5 + 10 s): a restart would have come back.
    std::thread::sleep(Duration::from_secs(16));
    assert!(!gw.up(), "held, yet renegotiated:\n{}", gw.logs());
    assert!(
        a.list_sas().expect("list-sas").is_empty(),
        "strongSwan saw an attempt"
    );
    assert_eq!(gw.lifecycle()["state"], "held");

    // Seed 002's form of `execute vpn ipsec tunnel up`: `diagnose vpn tunnel up <phase2> <phase1>`.
    let out = gw.text(&["diagnose", "vpn", "tunnel", "up", "vpn1", "vpn1"]);
    assert!(out.contains("1 IKE SA(s) initiated"), "{out}");
    println!("tunnel up: {out}");
    wait_up(&line, &a, &gw, "the operator brings vpn1 up");
}

#[test]
fn passive_mode_never_initiates_and_summary_counts_selectors() {
    require();
    let line = SiteToSite::new("lfps").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf()).expect("load peer");
    let gw = Haven::start(
        &line.gwb,
        "lfps-gw",
        &gateway_config("        set passive-mode enable\n"),
    );
    let lc = gw.lifecycle();
    assert_eq!(
        (&lc["state"], &lc["dpd_action"]),
        (&"passive".into(), &"hold".into())
    );
    let refused = gw.text(&["execute", "vpn", "ipsec", "tunnel", "up", "vpn1"]);
    assert!(refused.contains("passive-mode"), "{refused}");
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        a.list_sas().expect("list-sas").is_empty(),
        "a passive gateway initiated"
    );

    // strongSwan initiates; Haven answers.
    a.initiate("net", WAIT).expect("strongSwan initiates");
    wait_up(&line, &a, &gw, "strongSwan brings vpn1 up");
    let summary = gw.text(&["get", "vpn", "ipsec", "tunnel", "summary"]);
    assert!(
        summary.contains("'vpn1' 172.31.0.1:4500 selectors(total,up): 1/1"),
        "{summary}"
    );

    // Dead verdict: flushed, and no attempt afterwards although the peer is back.
    kill_and_wait_dead(&mut a, &gw);
    assert!(
        gw.log("ikemgr")
            .contains("dead peer, dpd-action (passive-mode)"),
        "{}",
        gw.logs()
    );
    a.restart().expect("restart charon");
    std::thread::sleep(Duration::from_secs(16));
    assert!(!gw.up(), "{}", gw.logs());
    assert!(a.list_sas().expect("list-sas").is_empty());
    let summary = gw.text(&["get", "vpn", "ipsec", "tunnel", "summary"]);
    assert!(summary.contains("selectors(total,up): 1/0"), "{summary}");
}

/// gwc: a second responder on its own link to gwb (`out1`, 172.31.1.0/24).
const GWC_OUTER: &str = "172.31.1.1";
const GWB_OUTER2: &str = "172.31.1.2";
const PEER2_ID: &str = "gwc.haven.test";

fn second_peer(line: &SiteToSite, label: &str) -> Netns {
    let c = Netns::new(label).expect("gwc");
    netns::veth(&line.gwb, "out1", &c, "out0").expect("veth gwb-gwc");
    line.gwb
        .add_addr("out1", &format!("{GWB_OUTER2}/24"))
        .expect("gwb out1");
    c.add_addr("out0", &format!("{GWC_OUTER}/24"))
        .expect("gwc out0");
    // gwc pretends to front LAN A too (strongSwan installs its route from an inner address).
    c.ip(&[
        "addr",
        "add",
        &format!("{}/24", SiteToSite::GWA_INNER),
        "dev",
        "lo",
    ])
    .expect("gwc inner address");
    c.link_up("lo").expect("gwc lo up");
    c
}

fn second_peer_conf() -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk("gw", GWC_OUTER, GWB_OUTER2, PSK.as_bytes())
            .ids(PEER2_ID, GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
    )
}

/// True when charon has an IKE SA with an installed CHILD SA.
fn swan_up(c: &Charon) -> bool {
    c.list_sas().is_ok_and(|l| {
        l.iter()
            .any(|s| s.child("net").is_some_and(|c| c.state == "INSTALLED"))
    })
}

/// True when ikemgr has an established IKE SA named `name` with a CHILD SA and peer `peer`.
fn haven_up_with(gw: &Haven, name: &str, peer: &str) -> bool {
    vpnctl_json(&gw.run, &["diagnose", "vpn", "ike", "gateway", "list"])
        .ok()
        .and_then(|v| v.as_array().cloned())
        .into_iter()
        .flatten()
        .any(|s| {
            s["name"] == name
                && s["established"] == true
                && s["remote"].as_str().is_some_and(|r| r.starts_with(peer))
                && s["children"].as_array().is_some_and(|c| !c.is_empty())
        })
}

#[test]
fn backup_phase1_takes_over_from_a_dead_primary_and_yields_when_it_returns() {
    require();
    let line = SiteToSite::new("lfbk").expect("topology");
    let gwc = second_peer(&line, "lfbk-gwc");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf()).expect("load gwa");
    let mut c = Charon::start(&gwc).expect("charon in gwc");
    c.load(&second_peer_conf()).expect("load gwc");
    let backup = gateway_config("        set monitor \"vpn1\"\n")
        .replace("\"vpn1\"\n        set type", "\"vpn2\"\n        set type")
        .replace(
            &format!("set remote-gw {}", SiteToSite::GWA_OUTER),
            &format!("set remote-gw {GWC_OUTER}"),
        )
        .replace(
            "edit \"vpn1\"\n        set phase1name \"vpn1\"",
            "edit \"vpn2\"\n        set phase1name \"vpn2\"",
        );
    let conf = format!("{}{backup}", gateway_config(""));
    let gw = Haven::start(&line.gwb, "lfbk-gw", &conf);
    wait_up(&line, &a, &gw, "the primary vpn1 comes up");
    assert!(!swan_up(&c), "the backup must wait while its primary is up");

    kill_and_wait_dead(&mut a, &gw);
    wait_for("the backup vpn2 comes up with gwc", WAIT * 2, || {
        (haven_up_with(&gw, "vpn2", GWC_OUTER) && swan_up(&c))
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), tail(&c.log(), 20)))
    });

    a.restart().expect("restart gwa");
    wait_up(&line, &a, &gw, "the primary vpn1 renegotiates");
    wait_for("the backup is deleted", WAIT, || {
        (!haven_up_with(&gw, "vpn2", GWC_OUTER) && !swan_up(&c))
            .then_some(())
            .ok_or_else(|| gw.logs())
    });
    assert!(
        gw.log("ikemgr")
            .contains("primary vpn1 is up again, backup deleted"),
        "{}",
        gw.logs()
    );
}

#[test]
fn remote_gw_list_fails_over_to_the_next_peer_and_back() {
    require();
    let line = SiteToSite::new("lfls").expect("topology");
    let gwc = second_peer(&line, "lfls-gwc");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf()).expect("load gwa");
    let mut c = Charon::start(&gwc).expect("charon in gwc");
    c.load(&second_peer_conf()).expect("load gwc");
    let conf = gateway_config("        set remote-gw-preempt-interval 5\n").replace(
        &format!("set remote-gw {}", SiteToSite::GWA_OUTER),
        &format!("set remote-gw {} {GWC_OUTER}", SiteToSite::GWA_OUTER),
    );
    let gw = Haven::start(&line.gwb, "lfls-gw", &conf);
    wait_up(&line, &a, &gw, "vpn1 comes up with the first peer");
    assert!(haven_up_with(&gw, "vpn1", SiteToSite::GWA_OUTER));

    kill_and_wait_dead(&mut a, &gw);
    wait_for("vpn1 moves to the second peer", WAIT * 2, || {
        (haven_up_with(&gw, "vpn1", GWC_OUTER) && swan_up(&c))
            .then_some(())
            .ok_or_else(|| format!("{}\nlifecycle: {}", gw.logs(), gw.lifecycle()))
    });
    assert_eq!(gw.lifecycle()["peer"], GWC_OUTER);

    assert_eq!(gw.lifecycle()["preempt_interval_secs"], 5);

    // gwa is back while gwc still works: a pre-emption trial finds it, the tunnel moves
    // back and the IKE SA to gwc is deleted.
    a.restart().expect("restart gwa");
    let back = Instant::now();
    wait_for("vpn1 pre-empts back to the first peer", WAIT * 4, || {
        (haven_up_with(&gw, "vpn1", SiteToSite::GWA_OUTER)
            && !haven_up_with(&gw, "vpn1", GWC_OUTER)
            && swan_up(&a)
            && !swan_up(&c))
        .then_some(())
        .ok_or_else(|| {
            format!(
                "{}\nlifecycle: {}\n{}",
                gw.logs(),
                gw.lifecycle(),
                tail(&c.log(), 10)
            )
        })
    });
    println!("back on gwa {:?} after its restart", back.elapsed());
    assert!(
        gw.log("ikemgr")
            .contains("preferred peer 172.31.0.1 is back: tunnel moved from 172.31.1.1"),
        "{}",
        gw.logs()
    );
    assert_eq!(gw.lifecycle()["peer"], SiteToSite::GWA_OUTER);
    wait_up(&line, &a, &gw, "traffic through the first peer again");
}
