//! Inner IPv6 through espd (IPv4 outside addresses): the client's and the server's LANs are
//! `fd00:99:1::/64` and `fd00:99:2::/64`. Two Haven gateways with a manual key
//! (`addr-type 6`, `src-subnet6`/`dst-subnet6`) and with IKEv2 (phase2 `subnet6`
//! selectors): ICMPv6 echo both ways (client to server and server to client), an inner
//! IPv6 packet whose payload length lies (under a valid ICV) dropped as `inner_header`, one
//! outside the selectors dropped as `selector`. And a strongSwan client gateway (charon,
//! kernel-libipsec) in gwa against our gateway in gwb with IPv6 selectors: ping6 both ways.

mod espd_common;

use std::time::Duration;

use espd_common::{
    add_inner6, ike_config, parse_ping, Gw, Pair, CLIENT6, KEY_GCM, LAN_A6, LAN_B6, SERVER6, SPI_B,
    TUNNEL,
};
use haven_tests::daemons::{bin, wait_for};
use haven_tests::netns::{Netns, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};

const WAIT: Duration = Duration::from_secs(30);

/// `count` ICMPv6 echoes from `ns` to `to`, 0.2 s apart: (sent, answered).
fn ping6(ns: &Netns, to: &str, count: u32) -> (u32, u32) {
    let out = ns
        .exec(
            "ping",
            &[
                "-6",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                to,
            ],
        )
        .expect("ping -6");
    parse_ping(&String::from_utf8_lossy(&out.stdout))
}

/// Waits until one ICMPv6 echo from `ns` to `to` comes back (`why` names the logs to show).
fn wait_ping6(ns: &Netns, to: &str, why: impl Fn() -> String) {
    wait_for("first ping6 through the tunnel", WAIT, || {
        ns.run("ping", &["-6", "-n", "-c", "1", "-W", "1", to])
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", why()))
    });
}

/// Ping6 both ways through `pair`; both gateways' SA counted them in each direction, and
/// nothing was dropped as a bad inner header or a selector mismatch.
fn pings_both_ways(pair: &Pair) {
    let why = || {
        format!(
            "gwa:\n{}\ngwb:\n{}\ngwa espd:\n{}\ngwb espd:\n{}",
            pair.a.tunnel_list_text(),
            pair.b.tunnel_list_text(),
            pair.a.log("espd"),
            pair.b.log("espd")
        )
    };
    wait_ping6(&pair.topo.client, SERVER6, why);
    let (sent, got) = ping6(&pair.topo.client, SERVER6, 10);
    assert!(sent == 10 && got >= 9, "client -> server: {got}/{sent}");
    let (sent, got) = ping6(&pair.topo.server, CLIENT6, 10);
    assert!(sent == 10 && got >= 9, "server -> client: {got}/{sent}");
    for (side, gw) in [("gwa", &pair.a), ("gwb", &pair.b)] {
        let sa = gw.sa().unwrap_or_else(|| panic!("{side}: no SA"));
        assert!(sa["dec_pkts"].as_u64().unwrap_or(0) >= 19, "{side}: {sa}");
        assert!(sa["enc_pkts"].as_u64().unwrap_or(0) >= 19, "{side}: {sa}");
        // The kernel's own IPv6 packets on the TUN device (multicast listener reports and
        // router solicitations from its link-local address) are `link_scope`, not `no_sa`.
        for reason in ["inner_header", "selector", "no_sa"] {
            assert_eq!(gw.drop_total(reason), 0, "{side} {reason}: {}", why());
        }
    }
}

#[test]
fn manual_key_pair_carries_inner_ipv6() {
    let pair = Pair::inner6("espd-in6", false);
    // The selectors as the tunnel list shows them (`proto:first-last:port`).
    const A6: &str = "0:fd00:99:1::-fd00:99:1:0:ffff:ffff:ffff:ffff:0";
    const B6: &str = "0:fd00:99:2::-fd00:99:2:0:ffff:ffff:ffff:ffff:0";
    for (side, gw, local, remote) in [("gwa", &pair.a, A6, B6), ("gwb", &pair.b, B6, A6)] {
        let v = gw.tunnel_list();
        let t = v["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == TUNNEL))
            .unwrap_or_else(|| panic!("{side}: no {TUNNEL} in {v}"));
        let sa = &t["sas"][0];
        assert_eq!(
            (&sa["src"][0], &sa["dst"][0]),
            (&local.into(), &remote.into()),
            "{side}: {t}"
        );
    }
    pings_both_ways(&pair);

    // Hostile inner IPv6 under valid ICVs, from gwa to gwb's SA. Sequence numbers well
    // above what the pings used and inside the 2048-packet window, so the tunnel's own
    // traffic stays acceptable.
    let inject = bin("esp-inject");
    let send = |kind: &str, seq: u64, src: &str, dst: &str| {
        let args = [
            SiteToSite::GWB_OUTER.to_string(),
            format!("{SPI_B:x}"),
            KEY_GCM.to_string(),
            "aes128gcm".to_string(),
            kind.to_string(),
            seq.to_string(),
            src.to_string(),
            dst.to_string(),
        ];
        let out = pair
            .topo
            .gwa
            .exec(inject.to_str().unwrap(), &args)
            .expect("esp-inject");
        assert!(
            out.status.success(),
            "esp-inject {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let before = pair
        .b
        .sa()
        .map(|s| s["dec_pkts"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    send("inner-length", 1000, CLIENT6, SERVER6);
    send("valid", 1001, "fd00:77::1", SERVER6);
    send("valid", 1002, CLIENT6, SERVER6);
    let b = &pair.b;
    wait_for("inner IPv6 drops counted", Duration::from_secs(5), || {
        let got = (
            b.sa_drop("inner_header"),
            b.sa_drop("selector"),
            b.sa()
                .map(|s| s["dec_pkts"].as_u64().unwrap_or(0))
                .unwrap_or(0)
                - before,
        );
        if got == (1, 1, 1) {
            Ok(())
        } else {
            Err(format!(
                "(inner_header, selector, delivered) = {got:?}\n{}",
                b.tunnel_list()
            ))
        }
    });
    assert!(pair.b.espd.is_some(), "espd not started");
    let (sent, got) = ping6(&pair.topo.client, SERVER6, 5);
    assert!(
        sent == 5 && got >= 4,
        "after the hostile packets: {got}/{sent}"
    );
    assert_eq!(pair.b.sa_drop("replay"), 0, "{}", pair.b.tunnel_list());
}

/// iperf3 TCP over inner IPv6 from the client to the server (`reverse`: the server sends)
/// for `secs` seconds; returns the bytes the receiver got. The sending gateway's kernel
/// hands espd TSO packets (TUN_F_TSO6) that espd cuts into segments.
fn iperf3_6(pair: &Pair, secs: u32, reverse: bool) -> u64 {
    haven_tests::member::iperf3_tcp(&pair.topo.client, SERVER6, secs, reverse)
}

#[test]
fn ike_pair_carries_inner_ipv6() {
    let pair = Pair::ike_inner6("espd-ike-in6");
    pings_both_ways(&pair);
    // TCP both ways (TSO over IPv6 on each sending gateway's TUN device): the bytes arrive,
    // and no packet is dropped as a bad inner header or outside the selectors.
    let _server = pair
        .topo
        .server
        .spawn("iperf3", &["-6", "-s", "-B", SERVER6])
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    for reverse in [false, true] {
        let got = iperf3_6(&pair, 2, reverse);
        assert!(
            got > 1_000_000,
            "iperf3 -6 (reverse {reverse}): {got} bytes"
        );
    }
    for (side, gw) in [("gwa", &pair.a), ("gwb", &pair.b)] {
        for reason in ["inner_header", "selector"] {
            assert_eq!(
                gw.sa_drop(reason),
                0,
                "{side} {reason}: {}",
                gw.tunnel_list()
            );
        }
    }
    // ikemgr routed the remote IPv6 LAN into the tunnel itself (add-route).
    for (side, gw, remote) in [("gwa", &pair.a, LAN_B6), ("gwb", &pair.b, LAN_A6)] {
        let routes = gw
            .ns
            .ip(&["-6", "route", "show", "dev", TUNNEL])
            .unwrap_or_default();
        assert!(routes.contains(remote), "{side}: {routes}");
    }
}

/// An initiator that waits for traffic (`auto-negotiate disable`): ikemgr routes the remote
/// IPv6 LAN into the TUN device before any SA, the client's first ping6 finds no SA in
/// espd, which notes the IPv6 packet and publishes `esp.acquire` for the subnet6 phase2,
/// and ikemgr negotiates the tunnel: the pings then pass.
#[test]
fn inner_ipv6_traffic_brings_the_tunnel_up() {
    let topo = SiteToSite::new("espd-acq6").expect("topology");
    add_inner6(&topo);
    let ca = ike_config(SiteToSite::GWB_OUTER, false, LAN_A6, LAN_B6, "").replace(
        "        set dpd disable\n",
        "        set dpd disable\n        set auto-negotiate disable\n",
    );
    let cb = ike_config(SiteToSite::GWA_OUTER, true, LAN_B6, LAN_A6, "");
    let mut a = Gw::new(&topo.gwa, "espd-acq6-a", &ca, LAN_B6);
    let mut b = Gw::new(&topo.gwb, "espd-acq6-b", &cb, LAN_A6);
    for g in [&mut b, &mut a] {
        g.start_ikemgr();
        g.start_espd();
    }
    wait_for("gwa's route for traffic", WAIT, || {
        let routes = topo
            .gwa
            .ip(&["-6", "route", "show", "dev", TUNNEL])
            .unwrap_or_default();
        routes
            .contains(LAN_B6)
            .then_some(())
            .ok_or_else(|| format!("{routes}\n{}", a.log("ikemgr")))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(a.sa().is_none(), "gwa negotiated without traffic");
    let why = || {
        format!(
            "gwa ikemgr:\n{}\ngwa espd:\n{}\ngwb ikemgr:\n{}",
            a.log("ikemgr"),
            a.log("espd"),
            b.log("ikemgr")
        )
    };
    wait_ping6(&topo.client, SERVER6, why);
    let espd = a.log("espd");
    assert!(
        espd.contains(&format!(
            "no SA for {CLIENT6} -> {SERVER6} (phase2 \"{TUNNEL}\")"
        )) && espd.contains("acquire"),
        "{}",
        why()
    );
    assert!(
        a.log("ikemgr").contains(&format!(
            "traffic {CLIENT6} -> {SERVER6} for phase2 {TUNNEL} (waiting for traffic): initiating"
        )),
        "{}",
        why()
    );
}

#[test]
fn strongswan_gateway_carries_inner_ipv6() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let topo = SiteToSite::new("espd-swan-in6").expect("topology");
    add_inner6(&topo);
    let conf = ike_config(SiteToSite::GWA_OUTER, true, LAN_B6, LAN_A6, "");
    let mut gw = Gw::new(&topo.gwb, "espd-swan-in6-b", &conf, LAN_A6);
    gw.start_ikemgr();
    gw.start_espd();
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    let mut charon = Charon::start(&topo.gwa).expect("charon in gwa");
    charon
        .load(
            &SwanctlConf::new().conn(
                Conn::psk(
                    "gw",
                    SiteToSite::GWA_OUTER,
                    SiteToSite::GWB_OUTER,
                    espd_common::IKE_PSK.as_bytes(),
                )
                .proposals(&["aes128gcm16-prfsha256-ecp256"])
                .child(ChildCfg::new("net", LAN_A6, LAN_B6).esp_proposals(&["aes128gcm16"])),
            ),
        )
        .expect("load swanctl.conf");
    if let Err(e) = charon.initiate("net", WAIT) {
        panic!(
            "initiate failed: {e}\ncharon:\n{}\nikemgr:\n{}\nespd:\n{}",
            charon.log(),
            gw.log("ikemgr"),
            gw.log("espd")
        );
    }
    charon
        .wait_child_installed("gw", "net", WAIT)
        .expect("strongSwan CHILD SA");
    gw.wait_tunnel();
    let why = || format!("charon:\n{}\nespd:\n{}", charon.log(), gw.log("espd"));
    wait_ping6(&topo.client, SERVER6, why);
    let (sent, got) = ping6(&topo.client, SERVER6, 10);
    assert!(sent == 10 && got >= 9, "client -> server: {got}/{sent}");
    let (sent, got) = ping6(&topo.server, CLIENT6, 10);
    assert!(sent == 10 && got >= 9, "server -> client: {got}/{sent}");
    let sa = gw.sa().expect("SA");
    assert!(sa["dec_pkts"].as_u64().unwrap_or(0) >= 19, "{sa}");
    assert!(sa["enc_pkts"].as_u64().unwrap_or(0) >= 19, "{sa}");
    for reason in ["inner_header", "selector", "icv", "replay"] {
        assert_eq!(gw.drop_total(reason), 0, "{reason}: {}", gw.tunnel_list());
    }
}
