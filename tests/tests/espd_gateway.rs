//! Two Haven gateways (ikemgr + espd on each) carry client-to-server traffic through a
//! manual-key ESP tunnel, over raw ESP and over UDP 4500: pings pass, the counters of
//! `vpnctl diagnose vpn tunnel list` move on both sides, and only ESP crosses the outside
//! link (no cleartext ICMP).

mod espd_common;

use espd_common::{count_wire, wire_counters, Pair, TUNNEL};

fn carries_traffic(label: &str, udp: bool) {
    let pair = Pair::new(label, udp);
    count_wire(&pair.topo.gwb);
    pair.wait_ping();
    let (sent, got) = pair.ping(10);
    assert_eq!(sent, 10);
    assert!(got >= 9, "only {got}/10 pings came back");

    for (side, gw) in [("gwa", &pair.a), ("gwb", &pair.b)] {
        let v = gw.tunnel_list();
        let t = v["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == TUNNEL))
            .unwrap_or_else(|| panic!("{side}: no {TUNNEL} in {v}"));
        assert_eq!(t["ver"], 2);
        assert_eq!(t["encap"], if udp { "udp" } else { "none" });
        let st = &t["stat"];
        for k in ["rxp", "txp", "rxb", "txb"] {
            assert!(
                st[k].as_u64().unwrap_or(0) >= 10,
                "{side}: stat {k} did not move: {t}"
            );
        }
        let sa = &t["sas"][0];
        assert!(sa["dec_pkts"].as_u64().unwrap_or(0) >= 10, "{side}: {sa}");
        assert!(sa["enc_pkts"].as_u64().unwrap_or(0) >= 10, "{side}: {sa}");
        assert_eq!(sa["dec"]["esp"], "aes-gcm");
        assert_eq!(sa["replaywin"], 2048);
        assert!(
            !v.to_string().contains("0102030405060708"),
            "{side}: key material in the view"
        );
        let text = gw.tunnel_list_text();
        for needle in [
            "name=vpn1 ver=2",
            "stat: rxp=",
            "dec: spi=",
            "enc: spi=",
            "dec:pkts/bytes=",
            "replaywin=2048",
        ] {
            assert!(
                text.contains(needle),
                "{side}: {needle:?} missing from:\n{text}"
            );
        }
    }

    let (esp, udp4500, icmp) = wire_counters(&pair.topo.gwb);
    assert_eq!(icmp, 0, "cleartext ICMP on the outside link");
    if udp {
        assert!(udp4500 >= 10 && esp == 0, "esp={esp} udp4500={udp4500}");
    } else {
        assert!(esp >= 10 && udp4500 == 0, "esp={esp} udp4500={udp4500}");
    }
    for gw in [&pair.a, &pair.b] {
        assert_eq!(gw.drop_total("replay"), 0);
        assert_eq!(gw.drop_total("icv"), 0);
    }
}

#[test]
fn gateway_pair_raw_esp() {
    carries_traffic("espd-raw", false);
}

#[test]
fn gateway_pair_udp_4500() {
    carries_traffic("espd-udp", true);
}
