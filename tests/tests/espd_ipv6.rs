//! Two Haven gateways (ikemgr + espd on each) whose outside addresses are IPv6
//! (`fd00:31::1` and `fd00:31::2` on `out0`) carry IPv4 client-to-server traffic through a
//! manual-key tunnel (`ip-version 6`, `local-gw6`, `remote-gw6`), over raw ESP (IPv6 next
//! header 50) and over UDP 4500 on IPv6: pings and a TCP transfer pass, the tunnel list
//! names the IPv6 peer, and only ESP over IPv6 crosses the outside link (no IPv4 ESP, UDP
//! 4500 or cleartext ICMP). And an IKEv2 tunnel between the two (`ip-version 6`,
//! `remote-gw6`): ikemgr negotiates over UDP 500 on IPv6, espd carries the CHILD SA as raw
//! ESP over IPv6. And a strongSwan client (charon with kernel-libipsec, so ESP in UDP)
//! in gwa against our gateway in gwb over IPv6: IKE moves to UDP 4500 on IPv6 (through
//! espd's relay), ESP runs in UDP 4500 over IPv6.

mod espd_common;

use std::time::Duration;

use espd_common::{
    carries_tcp, count_wire6, ike_config, wire_counters6, Gw, Pair, GWA_OUTER6, GWB_OUTER6, TUNNEL,
};
use haven_tests::daemons::wait_for;
use haven_tests::netns::SiteToSite;
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};

fn carries_traffic_over_ipv6(label: &str, udp: bool) {
    let pair = Pair::ipv6(label, udp);
    count_wire6(&pair.topo.gwb);
    pair.wait_ping();
    let (sent, got) = pair.ping(10);
    assert_eq!(sent, 10);
    assert!(got >= 9, "only {got}/10 pings came back");
    for (side, gw, peer) in [("gwa", &pair.a, GWB_OUTER6), ("gwb", &pair.b, GWA_OUTER6)] {
        let v = gw.tunnel_list();
        let t = v["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == TUNNEL))
            .unwrap_or_else(|| panic!("{side}: no {TUNNEL} in {v}"));
        assert_eq!(t["remote_gw"], peer, "{side}: {t}");
        assert_eq!(t["encap"], if udp { "udp" } else { "none" });
        let sa = &t["sas"][0];
        assert!(sa["dec_pkts"].as_u64().unwrap_or(0) >= 10, "{side}: {sa}");
        assert!(sa["enc_pkts"].as_u64().unwrap_or(0) >= 10, "{side}: {sa}");
        // 1500 - 40 (IPv6) - 8 (UDP) - 37 (AES-GCM's largest ESP overhead), 20 less than
        // over IPv4.
        assert_eq!(sa["mtu"], 1415, "{side}: {sa}");
        eprintln!("{side}:\n{}", gw.tunnel_list_text());
    }
    // No replay drop for the pings. After a TCP burst on a loaded machine the receiving
    // gateway of ESP in UDP 4500 sometimes counts a few (over IPv4 too, in espd_gateway with
    // the same check added: 1 run in 8 with two suites side by side; cause not found), so
    // this is checked before the transfer, as espd_gateway does.
    for gw in [&pair.a, &pair.b] {
        assert_eq!(gw.drop_total("replay"), 0, "{}", gw.tunnel_list_text());
    }
    carries_tcp(&pair);
    let (esp6, udp6, v4) = wire_counters6(&pair.topo.gwb);
    assert_eq!(
        v4, 0,
        "IPv4 ESP, UDP 4500 or cleartext ICMP on the outside link"
    );
    if udp {
        assert!(udp6 >= 10 && esp6 == 0, "esp6={esp6} udp6={udp6}");
    } else {
        assert!(esp6 >= 10 && udp6 == 0, "esp6={esp6} udp6={udp6}");
    }
    for gw in [&pair.a, &pair.b] {
        assert_eq!(gw.drop_total("icv"), 0);
        assert_eq!(gw.drop_total("tx_error"), 0);
    }
}

#[test]
fn gateway_pair_raw_esp_over_ipv6() {
    carries_traffic_over_ipv6("espd-raw6", false);
}

#[test]
fn gateway_pair_udp_4500_over_ipv6() {
    carries_traffic_over_ipv6("espd-udp6", true);
}

#[test]
fn ike_tunnel_over_ipv6() {
    let pair = Pair::ike_over("espd-ike6", true, "", "");
    count_wire6(&pair.topo.gwb);
    pair.wait_ping();
    let (sent, got) = pair.ping(5);
    assert!(sent == 5 && got >= 4, "{got}/{sent}");
    for (side, gw, peer) in [("gwa", &pair.a, GWB_OUTER6), ("gwb", &pair.b, GWA_OUTER6)] {
        let v = gw.tunnel_list();
        let t = v["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == TUNNEL))
            .unwrap_or_else(|| panic!("{side}: no {TUNNEL} in {v}"));
        assert_eq!(t["remote_gw"], peer, "{side}: {t}");
        assert_eq!(t["encap"], "none", "{side}: {t}");
        assert!(
            gw.log("ikemgr").contains(peer),
            "{side}: ikemgr log does not name {peer}:\n{}",
            gw.log("ikemgr")
        );
    }
    let (esp6, udp6, v4) = wire_counters6(&pair.topo.gwb);
    assert_eq!(
        v4, 0,
        "IPv4 ESP, UDP 4500 or cleartext ICMP on the outside link"
    );
    assert!(esp6 >= 5 && udp6 == 0, "esp6={esp6} udp6={udp6}");
}

#[test]
fn strongswan_client_over_ipv6() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    const WAIT: Duration = Duration::from_secs(30);
    let topo = SiteToSite::new("espd-swan6").expect("topology");
    espd_common::add_outer6(&topo);
    let conf = ike_config(GWA_OUTER6, true, SiteToSite::LAN_B, SiteToSite::LAN_A, "");
    let mut gw = Gw::new(&topo.gwb, "espd-swan6-b", &conf, SiteToSite::LAN_A);
    gw.start_ikemgr();
    gw.start_espd();
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    count_wire6(&topo.gwb);
    let mut charon = Charon::start(&topo.gwa).expect("charon in gwa");
    charon
        .load(
            &SwanctlConf::new().conn(
                Conn::psk(
                    "gw6",
                    GWA_OUTER6,
                    GWB_OUTER6,
                    espd_common::IKE_PSK.as_bytes(),
                )
                .proposals(&["aes128gcm16-prfsha256-ecp256"])
                .child(
                    ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                        .esp_proposals(&["aes128gcm16"]),
                ),
            ),
        )
        .expect("load swanctl.conf");
    if let Err(e) = charon.initiate("net", WAIT) {
        panic!(
            "initiate over IPv6 failed: {e}\ncharon:\n{}\nikemgr:\n{}\nespd:\n{}",
            charon.log(),
            gw.log("ikemgr"),
            gw.log("espd")
        );
    }
    charon
        .wait_child_installed("gw6", "net", WAIT)
        .expect("strongSwan CHILD SA");
    gw.wait_tunnel();
    wait_for("ping through the IPv6 tunnel", WAIT, || {
        topo.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\nespd:\n{}", gw.log("espd")))
    });
    let out = topo
        .client
        .exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "10",
                "-i",
                "0.1",
                "-W",
                "2",
                SiteToSite::SERVER,
            ],
        )
        .expect("ping");
    let (sent, got) = espd_common::parse_ping(&String::from_utf8_lossy(&out.stdout));
    assert!(sent == 10 && got >= 9, "{got}/{sent}");
    let v = gw.tunnel_list();
    let t = v["tunnels"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == TUNNEL))
        .unwrap_or_else(|| panic!("no {TUNNEL} in {v}"));
    assert_eq!(t["remote_gw"], GWA_OUTER6, "{t}");
    assert_eq!(t["encap"], "udp", "{t}");
    let (esp6, udp6, v4) = wire_counters6(&topo.gwb);
    assert_eq!(
        v4, 0,
        "IPv4 ESP, UDP 4500 or cleartext ICMP on the outside link"
    );
    assert!(udp6 >= 10 && esp6 == 0, "esp6={esp6} udp6={udp6}");
    assert!(
        gw.tunnel_list()["drops"]["ike_relay"].as_u64().unwrap_or(0) == 0,
        "{}",
        gw.tunnel_list()
    );
    // IKE_AUTH (and everything after) went through espd's relay on [::]:4500.
    let metrics = topo
        .gwb
        .run("curl", &["-sf", "http://127.0.0.1:9704/metrics"])
        .expect("espd metrics");
    for dir in ["in", "out"] {
        let n = metrics
            .lines()
            .find(|l| l.starts_with(&format!("espd_ike_relayed_total{{direction=\"{dir}\"}}")))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(n >= 1.0, "IKE relayed {dir}: {n}\n{metrics}");
    }
}
