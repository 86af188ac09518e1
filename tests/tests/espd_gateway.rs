//! Two Haven gateways (ikemgr + espd on each) carry client-to-server traffic through a
//! manual-key ESP tunnel, over raw ESP and over UDP 4500: pings pass, the counters of
//! `vpnctl diagnose vpn tunnel list` move on both sides, and only ESP crosses the outside
//! link (no cleartext ICMP); a short TCP transfer (iperf3) gets through as well.

mod espd_common;

use espd_common::{carries_tcp, count_wire, wire_counters, Pair, TUNNEL};

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
        eprintln!("{side} ({}):\n{text}", if udp { "udp" } else { "raw" });
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
        // The kernel's IPv6 discovery and MLD on the TUN device is link-scope, not a
        // missing SA (which would also ask ikemgr to negotiate).
        assert_eq!(gw.drop_total("no_sa"), 0, "{}", gw.tunnel_list());
    }
    carries_tcp(&pair);
    metrics_move(&pair);
}

/// espd's Prometheus metrics on gwb (default listener 127.0.0.1:9704 inside its namespace):
/// packets in both directions, drops by reason, valid for promtool when it is installed.
fn metrics_move(pair: &Pair) {
    use std::time::Duration;
    let text = haven_tests::daemons::wait_for("espd metrics", Duration::from_secs(10), || {
        let t = pair
            .topo
            .gwb
            .run("curl", &["-sf", "http://127.0.0.1:9704/metrics"])
            .map_err(|e| e.to_string())?;
        let moved = t.lines().any(|l| {
            l.starts_with("espd_packets_total{direction=\"in\"}")
                && l.split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    >= 10.0
        });
        if moved {
            Ok(t)
        } else {
            Err(t)
        }
    });
    for needle in [
        "espd_packets_total{direction=\"out\"}",
        "espd_bytes_total{direction=\"in\"}",
        "espd_drops_total{reason=\"replay\"} 0",
        "espd_drops_total{reason=\"selector\"}",
        "espd_sas 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = pair.a.dir.path().join("metrics.txt");
        std::fs::write(&dir, &text).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", dir.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

/// `vpnctl diagnose vpn tunnel flush name vpn1` takes the SA out of the datapath (ikemgr is
/// told with a hard `esp.expire`); the tunnel list shows the tunnel without SAs and traffic
/// stops. A manual-key SA stays out until ikemgr publishes it again.
#[test]
fn flush_removes_the_sas() {
    let pair = Pair::new("espd-flush", false);
    pair.wait_ping();
    let v = haven_tests::daemons::vpnctl_json(
        &pair.a.run,
        &["diagnose", "vpn", "tunnel", "flush", "name", TUNNEL],
    )
    .expect("flush");
    assert_eq!(v["flushed"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert!(
        pair.a.sa().is_none(),
        "SA still listed: {}",
        pair.a.tunnel_list()
    );
    let (sent, got) = pair.ping(3);
    assert_eq!((sent, got), (3, 0), "traffic still passes after the flush");
    assert!(pair.a.drop_total("no_sa") >= 3, "{}", pair.a.tunnel_list());
}
