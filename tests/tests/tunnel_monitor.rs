//! Tunnel monitors and route withdrawal against strongSwan (issue 9): DPD proves the IKE
//! peer answers, the tunnel monitor proves traffic crosses.
//!
//! Haven's static gateway `vpn1` (ikemgr + espd + dpdmon in gwb) and strongSwan responders
//! (charon, kernel-libipsec), as in `lifecycle.rs`:
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (Haven) - 10.99.2.2 server
//!                    gwc (charon) 172.31.1.1 ==== 172.31.1.2 gwb   (second responder)
//!                    alt (10.99.1.1/32) 192.168.77.2 -- 192.168.77.1 gwb   (the other path)
//! ```
//!
//! `vpn1` monitors the tunnel with ICMP from 10.99.2.1 (gwb's LAN address) to 10.99.1.1
//! (gwa's LAN address; gwc holds it too) every second, down after 3 misses; DPD is `on-idle`
//! every 2 s. nftables in gwb then drops the ESP packets coming in (UDP 4500 with a
//! non-zero SPI: `nattraversal forced`), never IKE (the zero non-ESP marker), so DPD keeps
//! being answered while nothing crosses the tunnel. The tests:
//! - (a) one peer (`wait-recover`): the monitor goes `down`, the tunnel stays up (DPD is
//!   answered), ikemgr withdraws the `add-route` route, the operator's route with metric 100
//!   through `alt` takes the traffic (a ping from the server is answered by alt); when the
//!   drop goes, the monitor answers again and the route through `vpn1` comes back;
//! - (b) two peers (`fail-over`): the black hole is on gwa's ESP only; the monitor's verdict
//!   flushes the tunnel like a dead peer and it comes up with gwc, where the monitor answers.
//!
//! Needs root, iproute2, nftables and the strongSwan packages (INTEROP.md); without them the
//! tests FAIL naming what is missing. Intervals are printed, never asserted.

use std::time::{Duration, Instant};

use haven_tests::daemons::{vpnctl_json, wait_for};
use haven_tests::gateway::{require_strongswan as require, tail, Gateway};
use haven_tests::netns::{self, Netns, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-monitor-strongswan-psk-0123456789";
const WAIT: Duration = Duration::from_secs(30);
const GW_ID: &str = "gwb.haven.test";
const PEER_ID: &str = "gwa.haven.test";
const PEER2_ID: &str = "gwc.haven.test";
const GWC_OUTER: &str = "172.31.1.1";
const GWB_OUTER2: &str = "172.31.1.2";
/// The monitor's destination: gwa's LAN address (gwc and alt hold it too).
const MON_DST: &str = "10.99.1.1";
/// Drops ESP-in-UDP arriving at gwb from `from` (any peer when empty), never IKE.
fn black_hole(from: &str) -> String {
    let saddr = if from.is_empty() {
        String::new()
    } else {
        format!("ip saddr {from} ")
    };
    format!(
        "table inet blackhole {{ chain in {{ type filter hook input priority 0; \
         {saddr}udp sport 4500 @th,64,32 != 0 counter drop; }}; }}"
    )
}

fn gateway_config(peers: &str, extra: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type static
        set remote-gw {peers}
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
        set tunnel-monitor enable
        set tunnel-monitor-destination-ip {MON_DST}
        set tunnel-monitor-source-ip {}
        set tunnel-monitor-interval 1
        set tunnel-monitor-threshold 3
{extra}    next
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
        SiteToSite::GWB_INNER,
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

fn peer_conf(local: &str, remote: &str, id: &str) -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk("gw", local, remote, PSK.as_bytes())
            .ids(id, GW_ID)
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
            ("ikemgr", "127.0.0.1:19811"),
            ("espd", "127.0.0.1:19812"),
            ("dpdmon", "127.0.0.1:19813"),
        ];
        Haven(Gateway::start(ns, label, conf_text, &daemons, WAIT))
    }

    fn logs(&self) -> String {
        self.log_tails(&["ikemgr", "dpdmon", "espd"], 30)
    }

    /// `vpn1` in `diagnose vpn tunnel list --json` (monitor and DPD records merged in).
    fn tunnel(&self) -> Value {
        vpnctl_json(&self.run, &["diagnose", "vpn", "tunnel", "list"])
            .ok()
            .and_then(|v| {
                v["tunnels"]
                    .as_array()
                    .and_then(|l| l.iter().find(|t| t["name"] == "vpn1").cloned())
            })
            .unwrap_or_default()
    }

    fn monitor_state(&self) -> String {
        self.tunnel()["monitor"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// True when ikemgr has an established IKE SA of `vpn1` with `peer` and a CHILD SA.
    fn up_with(&self, peer: &str) -> bool {
        self.ike_up("vpn1", Some(peer))
    }
}

/// gwb's routes to LAN A.
fn lan_a_routes(gwb: &Netns) -> String {
    gwb.ip(&["route", "show", SiteToSite::LAN_A])
        .unwrap_or_default()
}

/// alt: a second path from gwb to LAN A's monitor address (an operator's backup link):
/// gwb routes LAN A there with metric 100, below the tunnel's route.
fn alternative_path(line: &SiteToSite, label: &str) -> Netns {
    let alt = Netns::new(label).expect("alt");
    netns::veth(&line.gwb, "alt0", &alt, "a0").expect("veth gwb-alt");
    // IPv4 only: the link's IPv6 start-up (router solicitations, MLD reports, sent at
    // random times in the first seconds) would add packets to the counters the tests read
    // to tell which path the pings took.
    line.gwb
        .sysctl("net.ipv6.conf.alt0.disable_ipv6", "1")
        .expect("gwb alt0 IPv4 only");
    alt.sysctl("net.ipv6.conf.a0.disable_ipv6", "1")
        .expect("alt a0 IPv4 only");
    line.gwb
        .add_addr("alt0", "192.168.77.1/24")
        .expect("gwb alt0");
    alt.add_addr("a0", "192.168.77.2/24").expect("alt a0");
    alt.ip(&["addr", "add", &format!("{MON_DST}/32"), "dev", "lo"])
        .expect("alt address");
    alt.link_up("lo").expect("alt lo");
    alt.add_route(SiteToSite::LAN_B, "192.168.77.1")
        .expect("alt route back");
    line.gwb
        .ip(&[
            "route",
            "add",
            SiteToSite::LAN_A,
            "via",
            "192.168.77.2",
            "metric",
            "100",
        ])
        .expect("operator's backup route");
    alt
}

#[test]
fn a_black_holed_tunnel_is_declared_down_and_its_route_withdrawn_while_dpd_answers() {
    require();
    let line = SiteToSite::new("tmwr").expect("topology");
    let alt = alternative_path(&line, "tmwr-alt");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf(
        SiteToSite::GWA_OUTER,
        SiteToSite::GWB_OUTER,
        PEER_ID,
    ))
    .expect("load gwa");
    let gw = Haven::start(
        &line.gwb,
        "tmwr-gw",
        &gateway_config(SiteToSite::GWA_OUTER, ""),
    );
    wait_for("vpn1 up and its monitor answered", WAIT * 3, || {
        (gw.up_with(SiteToSite::GWA_OUTER) && gw.monitor_state() == "up")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}\n{}", gw.logs(), gw.tunnel(), tail(&a.log(), 20)))
    });
    let m = gw.tunnel()["monitor"].clone();
    assert_eq!(m["action"], "wait-recover", "{m}");
    let routes = lan_a_routes(&line.gwb);
    assert!(routes.contains("dev vpn1"), "{routes}");
    let list = gw.text(&["diagnose", "vpn", "tunnel", "list", "name", "vpn1"]);
    assert!(
        list.contains("monitor: dst=10.99.1.1 src=10.99.2.1 interval=1000ms threshold=3"),
        "{list}"
    );
    // The server's traffic to LAN A crosses the tunnel, not alt.
    let before = alt.link_counters("a0").expect("alt counters");
    line.server
        .ping(MON_DST, 3)
        .expect("ping through the tunnel");
    let through = alt.link_counters("a0").expect("alt counters");
    assert!(
        through.rx_packets < before.rx_packets + 3,
        "the tunnel carries the ping: {before:?} {through:?}"
    );

    line.gwb.nft(&black_hole("")).expect("black hole");
    let t = Instant::now();
    wait_for("the monitor declares vpn1 down", WAIT, || {
        (gw.monitor_state() == "down")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), gw.tunnel()))
    });
    println!("monitor down {:?} after the black hole", t.elapsed());
    wait_for("the route through vpn1 is withdrawn", WAIT, || {
        let r = lan_a_routes(&line.gwb);
        (!r.contains("dev vpn1")).then_some(()).ok_or(r)
    });
    let routes = lan_a_routes(&line.gwb);
    assert!(routes.contains("via 192.168.77.2"), "{routes}");
    assert!(
        gw.log("ikemgr")
            .contains("tunnel monitor failed, wait-recover: routes withdrawn"),
        "{}",
        gw.logs()
    );
    // Traffic takes the other path: alt answers the server.
    let before = alt.link_counters("a0").expect("alt counters");
    line.server
        .ping(MON_DST, 3)
        .expect("ping over the alternative path");
    let after = alt.link_counters("a0").expect("alt counters");
    assert!(
        after.rx_packets >= before.rx_packets + 3,
        "alt carries the ping: {before:?} {after:?}"
    );
    // DPD is still answered: the IKE SA and the tunnel stay (wait-recover).
    std::thread::sleep(Duration::from_secs(8));
    assert!(gw.up_with(SiteToSite::GWA_OUTER), "{}", gw.logs());
    let t = gw.tunnel();
    assert_ne!(t["dpd"]["state"], "dead", "{t}");
    assert_eq!(t["monitor"]["state"], "down", "{t}");
    assert!(t["monitor"]["misses"].as_u64().unwrap_or(0) >= 3, "{t}");
    let list = gw.text(&["diagnose", "vpn", "tunnel", "list", "name", "vpn1"]);
    assert!(list.contains("state=down action=wait-recover"), "{list}");

    // The path heals: the monitor answers and the route comes back.
    line.gwb
        .nft("delete table inet blackhole")
        .expect("remove the black hole");
    wait_for("the monitor answers again", WAIT, || {
        (gw.monitor_state() == "up")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), gw.tunnel()))
    });
    wait_for("the route through vpn1 is back", WAIT, || {
        let r = lan_a_routes(&line.gwb);
        r.contains("dev vpn1").then_some(()).ok_or(r)
    });
    let before = alt.link_counters("a0").expect("alt counters");
    line.server
        .ping(MON_DST, 3)
        .expect("ping through the tunnel again");
    let after = alt.link_counters("a0").expect("alt counters");
    assert!(
        after.rx_packets < before.rx_packets + 3,
        "back through the tunnel: {before:?} {after:?}"
    );
}

#[test]
fn a_black_holed_peer_fails_over_to_the_backup_peer() {
    require();
    let line = SiteToSite::new("tmfo").expect("topology");
    let gwc = Netns::new("tmfo-gwc").expect("gwc");
    netns::veth(&line.gwb, "out1", &gwc, "out0").expect("veth gwb-gwc");
    line.gwb
        .add_addr("out1", &format!("{GWB_OUTER2}/24"))
        .expect("gwb out1");
    gwc.add_addr("out0", &format!("{GWC_OUTER}/24"))
        .expect("gwc out0");
    gwc.ip(&["addr", "add", &format!("{MON_DST}/24"), "dev", "lo"])
        .expect("gwc inner address");
    gwc.link_up("lo").expect("gwc lo up");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&peer_conf(
        SiteToSite::GWA_OUTER,
        SiteToSite::GWB_OUTER,
        PEER_ID,
    ))
    .expect("load gwa");
    let mut c = Charon::start(&gwc).expect("charon in gwc");
    c.load(&peer_conf(GWC_OUTER, GWB_OUTER2, PEER2_ID))
        .expect("load gwc");
    // No pre-emption: gwa's IKE keeps answering while its ESP is black-holed.
    let gw = Haven::start(
        &line.gwb,
        "tmfo-gw",
        &gateway_config(
            &format!("{} {GWC_OUTER}", SiteToSite::GWA_OUTER),
            "        set remote-gw-preempt-interval 0\n",
        ),
    );
    wait_for("vpn1 up with gwa and monitored", WAIT * 3, || {
        (gw.up_with(SiteToSite::GWA_OUTER) && gw.monitor_state() == "up")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), gw.tunnel()))
    });
    assert_eq!(gw.tunnel()["monitor"]["action"], "fail-over");

    line.gwb
        .nft(&black_hole(SiteToSite::GWA_OUTER))
        .expect("black hole gwa");
    let t = Instant::now();
    wait_for("vpn1 fails over to gwc", WAIT * 2, || {
        (gw.up_with(GWC_OUTER) && !gw.up_with(SiteToSite::GWA_OUTER))
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), gw.tunnel()))
    });
    println!("on gwc {:?} after the black hole", t.elapsed());
    assert!(
        gw.log("ikemgr")
            .contains("tunnel monitor failed, fail-over: flushing the tunnel like a dead peer"),
        "{}",
        gw.logs()
    );
    wait_for("the monitor answers through gwc", WAIT, || {
        (gw.monitor_state() == "up")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", gw.logs(), gw.tunnel()))
    });
    wait_for("the route through vpn1 is back", WAIT, || {
        let r = lan_a_routes(&line.gwb);
        r.contains("dev vpn1").then_some(()).ok_or(r)
    });
    line.server
        .ping(MON_DST, 2)
        .expect("ping through the tunnel to gwc");
    assert!(
        c.list_sas().is_ok_and(|l| !l.is_empty()),
        "gwc carries the tunnel"
    );
}
