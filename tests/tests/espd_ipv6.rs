//! Two Haven gateways (ikemgr + espd on each) whose outside addresses are IPv6
//! (`fd00:31::1` and `fd00:31::2` on `out0`) carry IPv4 client-to-server traffic through a
//! manual-key tunnel (`ip-version 6`, `local-gw6`, `remote-gw6`), over raw ESP (IPv6 next
//! header 50) and over UDP 4500 on IPv6: pings and a TCP transfer pass, the tunnel list
//! names the IPv6 peer, and only ESP over IPv6 crosses the outside link (no IPv4 ESP, UDP
//! 4500 or cleartext ICMP). And an IKEv2 tunnel between the two (`ip-version 6`,
//! `remote-gw6`): ikemgr negotiates over UDP 500 on IPv6, espd carries the CHILD SA as raw
//! ESP over IPv6.

mod espd_common;

use espd_common::{carries_tcp, count_wire6, wire_counters6, Pair, GWA_OUTER6, GWB_OUTER6, TUNNEL};

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
        assert_eq!(gw.drop_total("replay"), 0);
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
