//! Traffic-triggered negotiation and seed 002's phase2 knobs (issue 9) against strongSwan.
//!
//! Haven's static gateway `vpn1` (ikemgr + espd [+ dpdmon] in gwb, one run-dir) and a
//! strongSwan responder (charon in gwa, PSK):
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (Haven) - 10.99.2.2 server
//! ```
//!
//! - (a) `keepalive enable` with `pfs enable` / `dhgrp 19`, `keylifeseconds 120`: with no
//!   packet at all, Haven rekeys the CHILD SA at its soft lifetime; strongSwan shows new
//!   SPIs, and the rekeyed CHILD SA carries a KE (strongSwan names its DH group);
//! - (b) `keepalive disable` (the default), `keylifeseconds 120`: the idle CHILD SA is not
//!   rekeyed; at its hard lifetime Haven deletes it (strongSwan logs the DELETE and has no
//!   CHILD SA, the IKE SA stays); a ping from the server (Haven's side) makes espd publish
//!   `esp.acquire` and ikemgr create a new CHILD SA with CREATE_CHILD_SA; the ping gets
//!   through;
//! - (c) `dpd-action hold`: charon is SIGKILLed, the dead verdict flushes the tunnel but its
//!   route stays; charon restarts (responder only); nothing happens until a ping from the
//!   server, which brings the tunnel back;
//! - (d) `dpd-action clear`: the same, but the route goes with the tunnel and pings from the
//!   server do not bring it back;
//! - (e) `auto-negotiate disable` on the phase1: routes wait for traffic from the start and
//!   the first ping from the server brings the tunnel up;
//! - (f) `replay disable` (espd level, two Haven gateways with manual keys, because
//!   strongSwan does not replay): a replayed valid packet is accepted on an SA with replay
//!   window 0 and dropped as `replay` on one with the check on.
//!
//! Two phase2 selectors under one phase1, both carrying traffic, are checked by
//! `ikemgr_interop` (`static_gateway_with_two_phase2s_initiates_two_children`).
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md); without them the tests FAIL
//! naming what is missing. Intervals are printed, never asserted. (a) and (b) wait for the
//! 120 s minimum `keylifeseconds`: about 2.5 minutes each.

mod espd_common;

use std::time::{Duration, Instant};

use haven_tests::daemons::{bin, vpnctl_json, wait_for};
use haven_tests::gateway::{require_strongswan as require, tail, Gateway};
use haven_tests::netns::{Netns, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-phase2-knobs-strongswan-psk-0123456789";
const WAIT: Duration = Duration::from_secs(30);
const GW_ID: &str = "gwb.haven.test";
const PEER_ID: &str = "gwa.haven.test";

/// Haven's static gateway `vpn1` to gwa with `p1` phase1 lines and `p2` phase2 lines.
fn gateway_config(p1: &str, p2: &str) -> String {
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
        set psksecret \"{PSK}\"
{p1}    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set src-subnet {}
        set dst-subnet {}
{p2}    next
end
",
        SiteToSite::GWA_OUTER,
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

/// DPD that declares a silent peer dead after about 6 s.
const FAST_DPD: &str = "        set dpd on-idle
        set dpd-retrycount 2
        set dpd-retryinterval 2
";

/// strongSwan in gwa: a responder for Haven with ESP proposal `esp`.
fn peer_conf(esp: &str) -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk(
            "gw",
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            PSK.as_bytes(),
        )
        .ids(PEER_ID, GW_ID)
        .proposals(&["aes128gcm16-prfsha256-ecp256"])
        .child(ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B).esp_proposals(&[esp])),
    )
}

haven_tests::gateway_newtype!(
    /// ikemgr, espd and dpdmon of one gateway (killed on drop).
    Haven
);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [
            ("ikemgr", "127.0.0.1:19811"),
            ("espd", "127.0.0.1:19812"),
            ("dpdmon", "127.0.0.1:19813"),
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

    /// Packets espd carried on `vpn1`'s SAs (in + out), from `diagnose vpn tunnel list`.
    fn esp_packets(&self) -> u64 {
        let v = vpnctl_json(&self.run, &["diagnose", "vpn", "tunnel", "list"]).unwrap_or_default();
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == "vpn1")
            .map(|t| {
                t["stat"]["rxp"].as_u64().unwrap_or(0) + t["stat"]["txp"].as_u64().unwrap_or(0)
            })
            .sum()
    }
}

/// The installed CHILD SA `net` in charon, if any.
fn swan_child(a: &Charon) -> Option<strongswan::ChildSa> {
    a.list_sas()
        .ok()?
        .into_iter()
        .flat_map(|s| s.children)
        .find(|c| c.name == "net" && c.state == "INSTALLED")
}

/// True when charon has an established IKE SA.
fn swan_ike_up(a: &Charon) -> bool {
    a.list_sas()
        .is_ok_and(|l| l.iter().any(|s| s.state == "ESTABLISHED"))
}

/// Waits until both ends have the CHILD SA (no packet sent); returns charon's view of it.
fn wait_child(a: &Charon, gw: &Haven, what: &str) -> strongswan::ChildSa {
    wait_for(what, WAIT * 2, || {
        match (gw.up(), swan_child(a)) {
            (true, Some(c)) => Some(c),
            _ => None,
        }
        .ok_or_else(|| format!("{}\n{}", gw.logs(), tail(&a.log(), 20)))
    })
}

/// Pings the client from the server (Haven's side starts the traffic) until one reply.
fn ping_from_server(line: &SiteToSite, a: &Charon, gw: &Haven, what: &str, wait: Duration) {
    wait_for(what, wait, || {
        line.server
            .ping(SiteToSite::CLIENT, 3)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.logs(), tail(&a.log(), 20)))
    });
}

/// `ip route show <LAN_A>` in gwb.
fn route_to_lan_a(line: &SiteToSite) -> String {
    line.gwb
        .run("ip", &["route", "show", SiteToSite::LAN_A])
        .unwrap_or_default()
}

#[test]
fn idle_child_sa_with_keepalive_is_rekeyed_with_pfs() {
    require();
    let line = SiteToSite::new("p2ka").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf("aes128gcm16-ecp256"))
        .expect("load responder");
    let gw = Haven::start(
        &line.gwb,
        "p2ka-gw",
        &gateway_config(
            "        set dpd disable\n",
            "        set pfs enable\n        set dhgrp 19\n        set keylifeseconds 120\n        set keepalive enable\n",
        ),
    );
    let first = wait_child(&a, &gw, "CHILD SA up without traffic");
    let start = Instant::now();
    let rekeyed = wait_for(
        "Haven rekeys the idle CHILD SA",
        Duration::from_secs(150),
        || {
            swan_child(&a)
                .filter(|c| c.spi_in != first.spi_in)
                .ok_or_else(|| format!("{}\n{}", gw.logs(), tail(&a.log(), 20)))
        },
    );
    println!(
        "rekeyed {:?} after the CHILD SA came up: {:?}",
        start.elapsed(),
        rekeyed.fields
    );
    assert_eq!(gw.esp_packets(), 0, "traffic crossed the tunnel");
    assert!(
        gw.log("ikemgr").contains("replaces"),
        "{}",
        gw.log("ikemgr")
    );
    // The rekey exchange carried a KE payload: strongSwan names the PFS group.
    assert_eq!(
        rekeyed.get("dh-group"),
        Some("ECP_256"),
        "{:?}",
        rekeyed.fields
    );
    ping_from_server(&line, &a, &gw, "ping over the rekeyed SA", WAIT);
}

#[test]
fn idle_child_sa_without_keepalive_expires_and_the_next_packet_brings_a_new_one() {
    require();
    let line = SiteToSite::new("p2nk").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf("aes128gcm16")).expect("load responder");
    let gw = Haven::start(
        &line.gwb,
        "p2nk-gw",
        &gateway_config(
            "        set dpd disable\n",
            "        set pfs disable\n        set keylifeseconds 120\n",
        ),
    );
    let first = wait_child(&a, &gw, "CHILD SA up without traffic");
    let start = Instant::now();
    wait_for(
        "the idle CHILD SA expires and strongSwan sees it deleted",
        Duration::from_secs(150),
        || {
            (swan_child(&a).is_none() && swan_ike_up(&a))
                .then_some(())
                .ok_or_else(|| format!("{}\n{}", gw.logs(), tail(&a.log(), 20)))
        },
    );
    println!("deleted {:?} after the CHILD SA came up", start.elapsed());
    let log = gw.log("ikemgr");
    assert!(
        log.contains("idle since it was installed (keepalive disable): not rekeyed"),
        "{log}"
    );
    assert!(!log.contains("replaces"), "rekeyed although idle:\n{log}");
    assert!(
        a.log().contains("received DELETE for ESP CHILD_SA"),
        "{}",
        a.log()
    );
    assert!(
        route_to_lan_a(&line).contains("dev vpn1"),
        "the route went with the CHILD SA: {}",
        route_to_lan_a(&line)
    );

    // Traffic from Haven's side brings a new CHILD SA on the same IKE SA.
    ping_from_server(&line, &a, &gw, "a ping brings a new CHILD SA", WAIT);
    let again = swan_child(&a).expect("a new CHILD SA");
    assert_ne!(again.spi_in, first.spi_in);
    assert!(
        gw.log("ikemgr")
            .contains("traffic 10.99.2.2 -> 10.99.1.2 for phase2 vpn1 without a CHILD SA"),
        "{}",
        gw.logs()
    );
    assert!(
        gw.log("espd").contains("acquire"),
        "{}",
        tail(&gw.log("espd"), 40)
    );
}

/// Kills charon and waits for dpdmon's dead verdict to flush `vpn1` in ikemgr.
fn kill_and_wait_dead(a: &mut Charon, gw: &Haven) {
    a.kill().expect("kill charon");
    let t = Instant::now();
    wait_for("dead verdict flushes vpn1", WAIT, || {
        (!gw.up() && gw.log("ikemgr").contains("dead peer, dpd-action"))
            .then_some(())
            .ok_or_else(|| gw.logs())
    });
    println!("dead verdict and flush {:?} after the kill", t.elapsed());
}

#[test]
fn held_tunnel_comes_back_on_traffic() {
    require();
    let line = SiteToSite::new("p2hd").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf("aes128gcm16")).expect("load responder");
    let p1 = format!("{FAST_DPD}        set dpd-action hold\n");
    let gw = Haven::start(
        &line.gwb,
        "p2hd-gw",
        &gateway_config(&p1, "        set pfs disable\n"),
    );
    wait_child(&a, &gw, "Haven initiates vpn1");
    ping_from_server(&line, &a, &gw, "ping through vpn1", WAIT);
    kill_and_wait_dead(&mut a, &gw);
    assert!(
        route_to_lan_a(&line).contains("dev vpn1"),
        "hold keeps the route: {:?}",
        route_to_lan_a(&line)
    );
    a.restart().expect("restart charon");
    // Held: no attempt without traffic.
    std::thread::sleep(Duration::from_secs(8));
    assert!(!gw.up(), "held, yet renegotiated:\n{}", gw.logs());
    assert!(
        a.list_sas().expect("list-sas").is_empty(),
        "strongSwan saw an attempt"
    );
    assert_eq!(gw.lifecycle()["state"], "held", "{}", gw.logs());

    let t = Instant::now();
    ping_from_server(&line, &a, &gw, "traffic brings vpn1 back", WAIT * 2);
    println!("back {:?} after the first ping", t.elapsed());
    assert!(gw.up());
    assert!(
        gw.log("ikemgr")
            .contains("for phase2 vpn1 (held after a dead peer, dpd-action hold): initiating"),
        "{}",
        gw.logs()
    );
}

#[test]
fn cleared_tunnel_ignores_traffic() {
    require();
    let line = SiteToSite::new("p2cl").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf("aes128gcm16")).expect("load responder");
    let p1 = format!("{FAST_DPD}        set dpd-action clear\n");
    let gw = Haven::start(
        &line.gwb,
        "p2cl-gw",
        &gateway_config(&p1, "        set pfs disable\n"),
    );
    wait_child(&a, &gw, "Haven initiates vpn1");
    ping_from_server(&line, &a, &gw, "ping through vpn1", WAIT);
    kill_and_wait_dead(&mut a, &gw);
    assert!(
        !route_to_lan_a(&line).contains("dev vpn1"),
        "clear removes the route: {:?}",
        route_to_lan_a(&line)
    );
    a.restart().expect("restart charon");
    // Pings from the server for a while: nothing comes back, nothing is attempted.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(
            line.server.ping(SiteToSite::CLIENT, 3).is_err(),
            "a ping got through a cleared tunnel:\n{}",
            gw.logs()
        );
    }
    assert!(!gw.up(), "cleared, yet renegotiated:\n{}", gw.logs());
    assert!(
        a.list_sas().expect("list-sas").is_empty(),
        "strongSwan saw an attempt"
    );
    assert_eq!(gw.lifecycle()["state"], "held", "{}", gw.logs());
}

/// A static phase1 with `auto-negotiate disable` (so `dpd-action hold`) waits for traffic
/// from the start: espd opens its TUN device before any SA, ikemgr routes the phase2's
/// destination through it, and the first ping from the server starts the negotiation.
#[test]
fn static_tunnel_without_auto_negotiate_starts_on_the_first_packet() {
    require();
    let line = SiteToSite::new("p2an").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf("aes128gcm16")).expect("load responder");
    let gw = Haven::start(
        &line.gwb,
        "p2an-gw",
        &gateway_config(
            "        set dpd disable
        set auto-negotiate disable
",
            "        set pfs disable
",
        ),
    );
    wait_for("the route waits for traffic", WAIT, || {
        route_to_lan_a(&line)
            .contains("dev vpn1")
            .then_some(())
            .ok_or_else(|| gw.logs())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!gw.up(), "negotiated without traffic:\n{}", gw.logs());
    assert!(a.list_sas().expect("list-sas").is_empty());
    ping_from_server(&line, &a, &gw, "the first packets start vpn1", WAIT * 2);
    assert!(
        gw.log("ikemgr")
            .contains("for phase2 vpn1 (waiting for traffic): initiating"),
        "{}",
        gw.logs()
    );
}

/// espd level: a manual-key SA with `replay disable` (window 0, what ikemgr publishes for a
/// phase2 with `replay disable`) accepts a replayed packet that one with the check drops.
#[test]
fn replay_disable_accepts_a_replayed_packet_that_replay_enable_drops() {
    use espd_common::{Pair, KEY_GCM};
    let sa = |name: &str, spi: u32, replay: &str| {
        format!(
            "config vpn ipsec manualkey-interface\n    edit \"{name}\"\n        set interface \"out0\"\n        set local-gw {}\n        set remote-gw {}\n        set enc-alg aes128gcm\n        set enc-key {KEY_GCM}\n        set local-spi {spi:#x}\n        set remote-spi {:#x}\n        set replay {replay}\n        set src-subnet 10.99.2.0/24\n        set dst-subnet 10.99.1.0/24\n    next\nend\n",
            SiteToSite::GWB_OUTER,
            SiteToSite::GWA_OUTER,
            spi + 1
        )
    };
    let extra = sa("rpon", 0x3001, "enable") + &sa("rpoff", 0x4001, "disable");
    let pair = Pair::with_extra("p2rp", false, &extra);
    let sa_of = |name: &str| -> Option<Value> {
        pair.b.tunnel_list()["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == name))
            .map(|t| t["sas"][0].clone())
    };
    wait_for("both SAs installed", Duration::from_secs(10), || {
        (sa_of("rpon").is_some() && sa_of("rpoff").is_some())
            .then_some(())
            .ok_or_else(|| pair.b.tunnel_list_text())
    });
    assert_eq!(sa_of("rpoff").unwrap()["replaywin"], 0);
    assert_eq!(sa_of("rpon").unwrap()["replaywin"], 2048);
    let inject = bin("esp-inject");
    for spi in [0x3001u32, 0x4001] {
        for _ in 0..2 {
            let args = [
                SiteToSite::GWB_OUTER.to_string(),
                format!("{spi:x}"),
                KEY_GCM.to_string(),
                "aes128gcm".to_string(),
                "valid".to_string(),
                "7".to_string(),
            ];
            let out = pair
                .topo
                .gwa
                .exec(inject.to_str().unwrap(), &args)
                .expect("esp-inject");
            assert!(out.status.success(), "{out:?}");
        }
    }
    let counts = |name: &str| {
        let s = sa_of(name).unwrap_or_default();
        (
            s["dec_pkts"].as_u64().unwrap_or(0),
            s["drops"]["replay"].as_u64().unwrap_or(0),
        )
    };
    wait_for("replayed packets counted", Duration::from_secs(5), || {
        (counts("rpon") == (1, 1) && counts("rpoff") == (2, 0))
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "rpon {:?} rpoff {:?}\n{}",
                    counts("rpon"),
                    counts("rpoff"),
                    pair.b.tunnel_list_text()
                )
            })
    });
}
