//! ikemgr against strongSwan on the wire: a strongSwan dial-up client (charon in gwa, PSK,
//! `encap = yes`) initiates to Haven's `type dynamic` gateway (ikemgr + espd in gwb, each
//! with its own run-dir); both sides must agree on SPIs and algorithms, and client-to-server
//! pings must pass through the tunnel. A wrong PSK must be refused.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (ikemgr+espd) - 10.99.2.2 server
//! ```
//!
//! Needs root, iproute2 and the strongSwan packages (see INTEROP.md); without them the tests
//! FAIL naming what is missing.

use std::time::Duration;

use haven_tests::daemons::{vpnctl, wait_for};
use haven_tests::gateway::{require_strongswan as require, Gateway};
use haven_tests::netns::{Netns, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, IkeSa, SwanctlConf};
use serde_json::Value;

const PSK: &str = "haven-ikemgr-interop-psk-0123456789";
const WAIT: Duration = Duration::from_secs(20);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";

haven_tests::gateway_newtype!(
    /// Our gateway in gwb: ikemgr and espd, each with its own log (not waited for).
    Haven
);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [("ikemgr", "127.0.0.1:19701"), ("espd", "127.0.0.1:19704")];
        Haven(Gateway::spawn(ns, label, conf_text, &daemons))
    }
}

/// Haven's dial-up gateway `vpn1` with the given phase1/phase2 proposals and groups.
fn dialup_config(p1: &str, dh: &str, p2: &str) -> String {
    dialup_config_to(p1, dh, p2, SiteToSite::LAN_A)
}

/// As [`dialup_config`], with the phase2 `dst-subnet` given.
fn dialup_config_to(p1: &str, dh: &str, p2: &str, dst: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"out0\"
        set ike-version 2
        set proposal {p1}
        set dhgrp {dh}
        set localid \"{GW_ID}\"
        set dpd disable
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal {p2}
        set pfs disable
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::LAN_B,
        dst
    )
}

fn client_conf(name: &str, ike: &str, esp: &str, psk: &str) -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk(
            name,
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            psk.as_bytes(),
        )
        .ids(CLIENT_ID, GW_ID)
        .proposals(&[ike])
        .child(ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B).esp_proposals(&[esp])),
    )
}

fn hex_u64(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

fn hex_u32(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

/// Brings the tunnel up from the client and checks that both sides agree; returns
/// strongSwan's view.
fn up_and_agree(
    a: &Charon,
    gw: &Haven,
    encr: &str,
    keysize: Option<u32>,
    transform: &str,
) -> IkeSa {
    if let Err(e) = a.initiate("net", WAIT) {
        panic!(
            "initiate failed: {e}\ncharon:\n{}\nikemgr:\n{}",
            a.log(),
            gw.log("ikemgr")
        );
    }
    let ss = a
        .wait_child_installed("dial", "net", WAIT)
        .expect("client CHILD SA");
    assert_eq!(ss.state, "ESTABLISHED");
    let list = wait_for("ikemgr lists the IKE SA", WAIT, || {
        let v = gw.ike_list();
        match v.as_array().and_then(|a| a.first()) {
            Some(sa) if sa["children"].as_array().is_some_and(|c| !c.is_empty()) => Ok(sa.clone()),
            _ => Err(format!("{v}\n{}", gw.log("ikemgr"))),
        }
    });
    assert_eq!(list["name"], "vpn1_1", "{list}");
    assert_eq!(list["phase1"], "vpn1");
    assert_eq!(
        (hex_u64(&list["spi_i"]), hex_u64(&list["spi_r"])),
        ss.spis(),
        "IKE SPIs differ: {list}\n{ss:#?}"
    );
    assert_eq!(list["initiator"], false);
    assert_eq!(
        list["remote_id"].as_str().map(|s| s.contains(CLIENT_ID)),
        Some(true),
        "{list}"
    );
    assert_eq!(ss.encr_alg.as_deref(), Some(encr));
    assert_eq!(ss.encr_keysize, keysize);
    assert_eq!(
        ss.get("remote-port"),
        Some("4500"),
        "encap = yes floats IKE to 4500"
    );
    let child = ss.child("net").expect("strongSwan CHILD");
    let ours = &list["children"][0];
    assert_eq!(
        hex_u32(&ours["spi_in"]),
        child.spi_out,
        "{ours} vs {child:?}"
    );
    assert_eq!(
        hex_u32(&ours["spi_out"]),
        child.spi_in,
        "{ours} vs {child:?}"
    );
    assert_eq!(ours["transform"], transform);
    assert_eq!(ours["local_ts"][0], SiteToSite::LAN_B);
    assert_eq!(ours["remote_ts"][0], SiteToSite::LAN_A);
    assert_eq!(child.local_ts, [SiteToSite::LAN_A]);
    assert_eq!(child.remote_ts, [SiteToSite::LAN_B]);
    // espd installed the same SA.
    let sa_in = child.spi_out;
    wait_for("espd has the SA", WAIT, || {
        let v = gw.tunnel_list();
        let found = v["tunnels"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["sas"].as_array().is_some_and(|sas| {
                    sas.iter()
                        .any(|s| s.to_string().contains(&format!("{sa_in:08x}")))
                })
            })
        });
        found
            .then_some(())
            .ok_or_else(|| format!("{v}\nespd:\n{}", gw.log("espd")))
    });
    ss
}

fn ping_through(line: &SiteToSite, a: &Charon, gw: &Haven) {
    wait_for("ping client -> server through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "{e}\nroutes gwb: {}\ntunnels: {}\nikemgr:\n{}\nespd:\n{}\ncharon:\n{}",
                    gw.ns.ip(&["route"]).unwrap_or_default(),
                    gw.tunnel_list(),
                    gw.log("ikemgr"),
                    gw.log("espd"),
                    a.log()
                )
            })
    });
    line.client
        .ping(SiteToSite::SERVER, 3)
        .expect("three pings through the tunnel");
    let child = a.list_sas().expect("list")[0]
        .child("net")
        .cloned()
        .expect("child");
    assert!(child.get_u64("packets-out").unwrap_or(0) >= 3, "{child:?}");
    assert!(child.get_u64("packets-in").unwrap_or(0) >= 3, "{child:?}");
}

/// One dial-up proposal set: strongSwan's spelling, Haven's, and what both must show.
struct Case<'a> {
    label: &'a str,
    /// strongSwan IKE and ESP proposals.
    ss_ike: &'a str,
    ss_esp: &'a str,
    /// Haven phase1 proposal, dhgrp, phase2 proposal.
    p1: &'a str,
    dh: &'a str,
    p2: &'a str,
    /// strongSwan's name of the ESP cipher and its key size; Haven's transform name.
    encr: &'a str,
    keysize: Option<u32>,
    transform: &'a str,
}

fn dialup_case(c: Case<'_>) {
    let Case {
        label,
        ss_ike,
        ss_esp,
        p1,
        dh,
        p2,
        encr,
        keysize,
        transform,
    } = c;
    require();
    let line = SiteToSite::new(label).expect("topology");
    assert!(
        line.client.ping(SiteToSite::SERVER, 1).is_err(),
        "client reached server without a tunnel: the test would prove nothing"
    );
    let gw = Haven::start(
        &line.gwb,
        &format!("{label}-gw"),
        &dialup_config(p1, dh, p2),
    );
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf("dial", ss_ike, ss_esp, PSK))
        .expect("load client");
    // Give ikemgr time to open UDP 500.
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    up_and_agree(&a, &gw, encr, keysize, transform);
    // The text views render the instance.
    let text = |args: &[&str]| String::from_utf8_lossy(&vpnctl(&gw.run, args).stdout).into_owned();
    let list = text(&[
        "diagnose", "vpn", "ike", "gateway", "list", "name", "vpn1_1",
    ]);
    assert!(list.contains("name: vpn1_1"), "{list}");
    assert!(list.contains("IPsec SA: spi in="), "{list}");
    let summary = text(&["get", "vpn", "ipsec", "tunnel", "summary"]);
    assert!(summary.contains("'vpn1_1' 172.31.0.1:4500"), "{summary}");
    ping_through(&line, &a, &gw);

    // Closing from the client removes the instance, its SAs and the route.
    a.terminate_ike("dial", WAIT).expect("terminate");
    wait_for("ikemgr drops the IKE SA", WAIT, || {
        let v = gw.ike_list();
        v.as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(())
            .ok_or_else(|| v.to_string())
    });
    wait_for("route removed", WAIT, || {
        let r = gw.ns.ip(&["route"]).unwrap_or_default();
        (!r.contains("10.99.1.0/24 dev vpn1"))
            .then_some(())
            .ok_or(r)
    });
    assert!(
        line.client.ping(SiteToSite::SERVER, 1).is_err(),
        "path must close with the SA"
    );
}

#[test]
fn strongswan_dialup_client_gcm_gets_a_tunnel_that_carries_ping() {
    dialup_case(Case {
        label: "ikgcm",
        ss_ike: "aes128gcm16-prfsha256-ecp256",
        ss_esp: "aes128gcm16",
        p1: "aes128gcm-prfsha256",
        dh: "19",
        p2: "aes128gcm",
        encr: "AES_GCM_16",
        keysize: Some(128),
        transform: "aes128gcm",
    });
}

#[test]
fn strongswan_dialup_client_cbc_hmac() {
    dialup_case(Case {
        label: "ikcbc",
        ss_ike: "aes256-sha256-modp2048",
        ss_esp: "aes256-sha256",
        p1: "aes256-sha256",
        dh: "14",
        p2: "aes256-sha256",
        encr: "AES_CBC",
        keysize: Some(256),
        transform: "aes256-sha256",
    });
}

#[test]
fn strongswan_dialup_client_x25519_chacha() {
    dialup_case(Case {
        label: "ikx25",
        ss_ike: "chacha20poly1305-prfsha256-x25519",
        ss_esp: "chacha20poly1305",
        p1: "chacha20poly1305-prfsha256",
        dh: "31",
        p2: "chacha20poly1305",
        encr: "CHACHA20_POLY1305",
        keysize: None,
        transform: "chacha20poly1305",
    });
}

#[test]
fn wrong_psk_is_refused() {
    require();
    let line = SiteToSite::new("ikpsk").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "ikpsk-gw",
        &dialup_config("aes128gcm-prfsha256", "19", "aes128gcm"),
    );
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(
        "dial",
        "aes128gcm16-prfsha256-ecp256",
        "aes128gcm16",
        "not-the-right-key",
    ))
    .expect("load client");
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    assert!(a.initiate("net", Duration::from_secs(8)).is_err());
    let _ = a.terminate_ike("dial", Duration::from_secs(3));
    let v = gw.ike_list();
    assert!(
        v.as_array()
            .is_some_and(|l| l.iter().all(|s| s["established"] == false)),
        "{v}"
    );
    assert!(
        gw.log("ikemgr").contains("authentication failed"),
        "{}",
        gw.log("ikemgr")
    );
    assert!(line.client.ping(SiteToSite::SERVER, 1).is_err());
}

/// Two strongSwan clients at once (charon in gwa for LAN_A, charon in the client namespace
/// for 10.77.0.1/32): two instances vpn1_1 and vpn1_2, each with its own
/// SAs, and traffic from both reaches the server.
#[test]
fn two_dialup_clients_get_two_instances() {
    require();
    let line = SiteToSite::new("ik2c").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "ik2c-gw",
        &dialup_config_to("aes128gcm-prfsha256", "19", "aes128gcm", "0.0.0.0/0"),
    );
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(
        "dial",
        "aes128gcm16-prfsha256-ecp256",
        "aes128gcm16",
        PSK,
    ))
    .expect("load client 1");
    a.initiate("net", WAIT).expect("client 1 up");
    let s1 = a
        .wait_child_installed("dial", "net", WAIT)
        .expect("client 1 SA");

    line.client
        .add_addr("lo", "10.77.0.1/32")
        .expect("client 2 address");
    // gwb has no route back to the client LAN (only client 1's tunnel covers it): client 2's
    // UDP (IKE, ESP in UDP) is routed back in clear through gwa; its ICMP is not.
    line.gwb
        .ip(&[
            "route",
            "add",
            "10.99.1.2/32",
            "via",
            SiteToSite::GWA_OUTER,
            "table",
            "100",
        ])
        .expect("table 100");
    line.gwb
        .ip(&[
            "rule",
            "add",
            "to",
            "10.99.1.2",
            "ipproto",
            "udp",
            "lookup",
            "100",
        ])
        .expect("rule for client 2's UDP");
    let mut b = Charon::start(&line.client).expect("charon in client");
    b.load(
        &SwanctlConf::new().conn(
            Conn::psk(
                "dial",
                SiteToSite::CLIENT,
                SiteToSite::GWB_OUTER,
                PSK.as_bytes(),
            )
            .ids("client2.haven.test", GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(
                ChildCfg::new("net", "10.77.0.1/32", SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
        ),
    )
    .expect("load client 2");
    b.initiate("net", WAIT).expect("client 2 up");
    let s2 = b
        .wait_child_installed("dial", "net", WAIT)
        .expect("client 2 SA");

    let list = wait_for("two IKE SAs in ikemgr", WAIT, || {
        let v = gw.ike_list();
        (v.as_array().map(|a| a.len()) == Some(2))
            .then(|| v.clone())
            .ok_or_else(|| v.to_string())
    });
    let by_name = |n: &str| {
        list.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == n))
            .cloned()
            .unwrap_or_else(|| panic!("no {n} in {list}"))
    };
    let (i1, i2) = (by_name("vpn1_1"), by_name("vpn1_2"));
    assert_eq!((hex_u64(&i1["spi_i"]), hex_u64(&i1["spi_r"])), s1.spis());
    assert_eq!((hex_u64(&i2["spi_i"]), hex_u64(&i2["spi_r"])), s2.spis());
    assert_eq!(i2["children"][0]["remote_ts"][0], "10.77.0.1/32", "{i2}");
    assert_eq!(i1["children"][0]["remote_ts"][0], SiteToSite::LAN_A, "{i1}");

    // The client namespace now routes the server's LAN into client 2's tunnel (charon's
    // table 220), so the client's pings travel through vpn1_2.
    ping_through(&line, &b, &gw);
    let _ = &a;
    wait_for("ping from client 2 through its tunnel", WAIT, || {
        line.client
            .run(
                "ping",
                &[
                    "-n",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    "-I",
                    "10.77.0.1",
                    SiteToSite::SERVER,
                ],
            )
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", gw.log("ikemgr")))
    });
}

/// Haven's static gateway `vpn1` in gwb towards strongSwan in gwa (NAT-T forced: libipsec
/// speaks ESP in UDP only).
fn static_config(keylife: u32, keylifeseconds: u32) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type static
        set remote-gw {}
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set keylife {keylife}
        set localid \"{GW_ID}\"
        set nattraversal forced
        set dpd disable
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set keylifeseconds {keylifeseconds}
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

/// Haven's static gateway `vpn1` in gwb initiates (auto-negotiate) to a strongSwan responder in
/// gwa; then strongSwan rekeys the CHILD SA and the IKE SA while pings keep passing.
#[test]
fn static_gateway_initiates_to_strongswan_and_survives_peer_rekeys() {
    require();
    let line = SiteToSite::new("ikst").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(
        &SwanctlConf::new().conn(
            Conn::psk(
                "gw",
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
    .expect("load responder");
    let conf = static_config(86400, 43200);
    let gw = Haven::start(&line.gwb, "ikst-gw", &conf);
    let ss = wait_for("strongSwan responder has the SA", WAIT, || {
        a.list_sas()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|s| s.child("net").is_some_and(|c| c.state == "INSTALLED"))
            .ok_or_else(|| format!("{}\n{}", gw.log("ikemgr"), a.log()))
    });
    assert!(!ss.initiator, "Haven initiated");
    let list = wait_for("ikemgr lists the SA", WAIT, || {
        let v = gw.ike_list();
        v.as_array()
            .and_then(|l| l.first())
            .filter(|s| s["children"].as_array().is_some_and(|c| !c.is_empty()))
            .cloned()
            .ok_or_else(|| v.to_string())
    });
    assert_eq!(list["name"], "vpn1");
    assert_eq!(list["initiator"], true);
    assert_eq!(
        (hex_u64(&list["spi_i"]), hex_u64(&list["spi_r"])),
        ss.spis()
    );
    let child = ss.child("net").expect("child");
    assert_eq!(hex_u32(&list["children"][0]["spi_in"]), child.spi_out);
    ping_through(&line, &a, &gw);

    // strongSwan rekeys the CHILD SA: new SPIs on both sides, ping still passes.
    let old_spi = child.spi_in;
    a.rekey_child("net").expect("rekey child");
    wait_for("CHILD SA rekeyed", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        sas.iter()
            .flat_map(|s| s.children.iter())
            .any(|c| c.state == "INSTALLED" && c.spi_in != old_spi)
            .then_some(())
            .ok_or_else(|| format!("{sas:?}\n{}", gw.log("ikemgr")))
    });
    wait_for("ping after CHILD rekey", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.log("ikemgr"), gw.log("espd")))
    });

    // strongSwan rekeys the IKE SA: new IKE SPIs, ping still passes, ikemgr follows.
    let old_ike = ss.spis();
    a.rekey_ike("gw").expect("rekey ike");
    wait_for("IKE SA rekeyed in ikemgr", WAIT, || {
        let v = gw.ike_list();
        let l = v
            .as_array()
            .and_then(|l| l.first())
            .cloned()
            .unwrap_or_default();
        ((hex_u64(&l["spi_i"]), hex_u64(&l["spi_r"])) != old_ike && l["established"] == true)
            .then_some(())
            .ok_or_else(|| format!("{v}\n{}", gw.log("ikemgr")))
    });
    wait_for("ping after IKE rekey", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", gw.log("ikemgr")))
    });
}

fn strongswan_responder(line: &SiteToSite) -> Charon {
    strongswan_responder_psk(line, PSK)
}

fn strongswan_responder_psk(line: &SiteToSite, psk: &str) -> Charon {
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(
        &SwanctlConf::new().conn(
            Conn::psk(
                "gw",
                SiteToSite::GWA_OUTER,
                SiteToSite::GWB_OUTER,
                psk.as_bytes(),
            )
            .ids(CLIENT_ID, GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
        ),
    )
    .expect("load responder");
    a
}

/// Haven's own soft lifetimes (keylife and keylifeseconds 120 s, the FortiOS minimum) make it
/// rekey the CHILD SA and the IKE SA itself; strongSwan follows and pings keep passing.
/// Takes about two minutes.
#[test]
fn static_gateway_rekeys_child_and_ike_on_its_own_lifetimes() {
    require();
    let line = SiteToSite::new("ikrk").expect("topology");
    let a = strongswan_responder(&line);
    let gw = Haven::start(&line.gwb, "ikrk-gw", &static_config(120, 120));
    let first = wait_for("strongSwan responder has the SA", WAIT, || {
        a.list_sas()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|s| s.child("net").is_some_and(|c| c.state == "INSTALLED"))
            .ok_or_else(|| format!("{}\n{}", gw.log("ikemgr"), a.log()))
    });
    ping_through(&line, &a, &gw);
    let old_child = first.child("net").map(|c| c.spi_in).unwrap_or(0);
    let old_ike = first.spis();
    wait_for(
        "Haven rekeyed the CHILD and the IKE SA",
        Duration::from_secs(150),
        || {
            let _ = line.client.ping(SiteToSite::SERVER, 1);
            let sas = a.list_sas().map_err(|e| e.to_string())?;
            let ike_new = sas
                .iter()
                .any(|s| s.state == "ESTABLISHED" && s.spis() != old_ike);
            let child_new = sas
                .iter()
                .flat_map(|s| s.children.iter())
                .any(|c| c.state == "INSTALLED" && c.spi_in != old_child);
            (ike_new && child_new)
                .then_some(())
                .ok_or_else(|| format!("{sas:?}\n{}", gw.log("ikemgr")))
        },
    );
    wait_for("ping after Haven's rekeys", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.log("ikemgr"), gw.log("espd")))
    });
    assert!(
        gw.log("ikemgr").contains("IKE SA rekeyed"),
        "{}",
        gw.log("ikemgr")
    );
    assert!(
        gw.log("ikemgr").contains("replaces"),
        "{}",
        gw.log("ikemgr")
    );
}

/// The dial-up client rekeys its CHILD SA and its IKE SA: the instance keeps its name, the
/// new SPIs agree on both sides and pings keep passing.
#[test]
fn dialup_client_rekeys_child_and_ike() {
    require();
    let line = SiteToSite::new("ikdr").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "ikdr-gw",
        &dialup_config("aes128gcm-prfsha256", "19", "aes128gcm"),
    );
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&client_conf(
        "dial",
        "aes128gcm16-prfsha256-ecp256",
        "aes128gcm16",
        PSK,
    ))
    .expect("load client");
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    let ss = up_and_agree(&a, &gw, "AES_GCM_16", Some(128), "aes128gcm");
    ping_through(&line, &a, &gw);
    let old_child = ss.child("net").map(|c| c.spi_in).unwrap_or(0);
    a.rekey_child("net").expect("rekey child");
    let agreed = |what: &str| {
        wait_for(what, WAIT, || {
            let sas = a.list_sas().map_err(|e| e.to_string())?;
            let s = sas.first().ok_or("no SA")?;
            let c = s
                .children
                .iter()
                .find(|c| c.state == "INSTALLED")
                .ok_or("no child")?;
            let v = gw.ike_list();
            let ours = v
                .as_array()
                .and_then(|l| l.first())
                .cloned()
                .unwrap_or_default();
            let ok = ours["name"] == "vpn1_1"
                && (hex_u64(&ours["spi_i"]), hex_u64(&ours["spi_r"])) == s.spis()
                && ours["children"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|x| hex_u32(&x["spi_in"]) == c.spi_out));
            ok.then(|| (s.spis(), c.spi_in))
                .ok_or_else(|| format!("{sas:?}\n{v}\n{}", gw.log("ikemgr")))
        })
    };
    let (ike1, child1) = agreed("CHILD rekey agreed");
    assert_ne!(child1, old_child);
    ping_through(&line, &a, &gw);
    a.rekey_ike("dial").expect("rekey ike");
    let (ike2, _) = wait_for("IKE SPIs changed", WAIT, || {
        let (ike, c) = agreed("IKE rekey agreed");
        (ike != ike1)
            .then_some((ike, c))
            .ok_or("old IKE SPIs".to_string())
    });
    assert_ne!(ike2, ss.spis());
    ping_through(&line, &a, &gw);
    let v = gw.ike_list();
    assert_eq!(v.as_array().map(|l| l.len()), Some(1), "{v}");
}

/// Our static gateway initiating with a PSK the strongSwan responder does not share: nothing
/// is established on either side and ikemgr says why.
#[test]
fn static_gateway_with_wrong_psk_is_refused_by_strongswan() {
    require();
    let line = SiteToSite::new("ikwp").expect("topology");
    let a = strongswan_responder_psk(&line, "a-different-secret");
    let gw = Haven::start(&line.gwb, "ikwp-gw", &static_config(86400, 43200));
    wait_for("ikemgr reports the refusal", WAIT, || {
        let log = gw.log("ikemgr");
        (log.contains("AUTHENTICATION_FAILED")
            || log.contains("authentication failed")
            || log.contains("AuthFailed"))
        .then_some(())
        .ok_or(log)
    });
    let sas = a.list_sas().expect("list");
    assert!(sas.iter().all(|s| s.state != "ESTABLISHED"), "{sas:?}");
    let v = gw.ike_list();
    assert!(
        v.as_array()
            .is_some_and(|l| l.iter().all(|s| s["established"] == false)),
        "{v}"
    );
    assert!(line.client.ping(SiteToSite::SERVER, 1).is_err());
}

/// The second pair of networks for the two-phase2 tests: second addresses on the LAN links
/// (client 10.98.1.2 behind gwa 10.98.1.1, server 10.98.2.2 behind gwb 10.98.2.1). charon
/// needs an address of its own inside a CHILD SA's local selectors to install its route.
const LAN2_A: &str = "10.98.1.0/24";
const LAN2_B: &str = "10.98.2.0/24";
const CLIENT2: &str = "10.98.1.2";
const SERVER2: &str = "10.98.2.2";

fn second_lans(line: &SiteToSite) {
    for (ns, dev, cidr) in [
        (&line.client, "c0", "10.98.1.2/24"),
        (&line.gwa, "in0", "10.98.1.1/24"),
        (&line.gwb, "in0", "10.98.2.1/24"),
        (&line.server, "s0", "10.98.2.2/24"),
    ] {
        ns.add_addr(dev, cidr).expect("second LAN address");
    }
}

/// One ping from `src` to `dst` in the client namespace.
fn ping_from(line: &SiteToSite, src: &str, dst: &str) -> Result<String, String> {
    line.client
        .run("ping", &["-n", "-q", "-c", "1", "-W", "2", "-I", src, dst])
        .map_err(|e| e.to_string())
}

/// A second phase2 `p2name` of phase1 `vpn1` between `src` and `dst` (CBC+HMAC, PFS 31).
fn second_phase2(p2name: &str, src: &str, dst: &str) -> String {
    format!(
        "config vpn ipsec phase2-interface
    edit \"{p2name}\"
        set phase1name \"vpn1\"
        set proposal aes256-sha256
        set pfs enable
        set dhgrp 31
        set src-subnet {src}
        set dst-subnet {dst}
    next
end
"
    )
}

/// Pings through both CHILD SAs and checks strongSwan counted them on the right one.
fn ping_both(line: &SiteToSite, a: &Charon, gw: &Haven) {
    for (src, dst, child) in [
        (SiteToSite::CLIENT, SiteToSite::SERVER, "net"),
        (CLIENT2, SERVER2, "net2"),
    ] {
        wait_for(
            &format!("ping {src} -> {dst} through {child}"),
            WAIT,
            || {
                ping_from(line, src, dst).map(|_| ()).map_err(|e| {
                    format!(
                        "{e}\ntunnels: {}\nikemgr:\n{}\nespd:\n{}\ncharon:\n{}",
                        gw.tunnel_list(),
                        gw.log("ikemgr"),
                        gw.log("espd"),
                        a.log()
                    )
                })
            },
        );
        let before = a.list_sas().expect("list")[0]
            .children
            .iter()
            .filter(|c| c.name == child && c.state == "INSTALLED")
            .filter_map(|c| c.get_u64("packets-in"))
            .sum::<u64>();
        for _ in 0..3 {
            ping_from(line, src, dst).expect("ping through the tunnel");
        }
        let after = a.list_sas().expect("list")[0]
            .children
            .iter()
            .filter(|c| c.name == child && c.state == "INSTALLED")
            .filter_map(|c| c.get_u64("packets-in"))
            .sum::<u64>();
        assert!(
            after >= before + 3,
            "{child}: {before} -> {after} packets in"
        );
    }
}

/// Both sides' views of the two CHILD SAs agree: strongSwan's `net` is our phase2 `vpn1`
/// and its `net2` our `vpn1-b`, SPIs mirrored, selectors as configured (waits while a rekey
/// settles).
fn two_children_agree(a: &Charon, gw: &Haven) {
    wait_for("both sides agree on two CHILD SAs", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        let ss = sas.first().cloned().ok_or("no IKE SA in strongSwan")?;
        let v = gw.ike_list();
        let ours = v
            .as_array()
            .and_then(|l| l.first())
            .cloned()
            .ok_or_else(|| format!("no IKE SA in ikemgr: {v}"))?;
        let diag = |what: &str| {
            format!(
                "{what}
{ss:?}
{ours}
{}",
                gw.log("ikemgr")
            )
        };
        if (hex_u64(&ours["spi_i"]), hex_u64(&ours["spi_r"])) != ss.spis() {
            return Err(diag("IKE SPIs differ"));
        }
        if ours["children"].as_array().map(|c| c.len()) != Some(2) {
            return Err(diag("ikemgr does not have exactly two CHILD SAs"));
        }
        for (name, local, remote, transform) in [
            ("net", SiteToSite::LAN_A, SiteToSite::LAN_B, "aes128gcm"),
            ("net2", LAN2_A, LAN2_B, "aes256-sha256"),
        ] {
            let installed: Vec<_> = ss
                .children
                .iter()
                .filter(|c| c.name == name && c.state == "INSTALLED")
                .collect();
            let [c] = installed.as_slice() else {
                return Err(diag(&format!("strongSwan: not one installed {name}")));
            };
            assert_eq!(c.local_ts, [local], "{c:?}");
            assert_eq!(c.remote_ts, [remote], "{c:?}");
            let Some(mine) = ours["children"]
                .as_array()
                .and_then(|l| l.iter().find(|x| hex_u32(&x["spi_in"]) == c.spi_out))
            else {
                return Err(diag(&format!("no CHILD SA with spi_in {:08x}", c.spi_out)));
            };
            assert_eq!(hex_u32(&mine["spi_out"]), c.spi_in, "{mine}");
            assert_eq!(mine["transform"], transform, "{mine}");
            assert_eq!(mine["local_ts"][0], remote, "{mine}");
            assert_eq!(mine["remote_ts"][0], local, "{mine}");
        }
        Ok(())
    });
}

fn two_child_swanctl(name: &str, remote: &str) -> Conn {
    Conn::psk(name, SiteToSite::GWA_OUTER, remote, PSK.as_bytes())
        .ids(CLIENT_ID, GW_ID)
        .proposals(&["aes128gcm16-prfsha256-ecp256"])
        .child(
            ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                .esp_proposals(&["aes128gcm16"]),
        )
        .child(ChildCfg::new("net2", LAN2_A, LAN2_B).esp_proposals(&["aes256-sha256-x25519"]))
}

/// A strongSwan dial-up client brings up two CHILD SAs with different selectors over one IKE
/// SA (the second with CREATE_CHILD_SA); our `type dynamic` gateway answers each with the
/// phase2 whose selectors fit, and pings pass through both.
#[test]
fn dialup_client_with_two_children_gets_one_per_phase2() {
    require();
    let line = SiteToSite::new("ik2p").expect("topology");
    second_lans(&line);
    assert!(ping_from(&line, CLIENT2, SERVER2).is_err(), "no clear path");
    let conf = dialup_config("aes128gcm-prfsha256", "19", "aes128gcm")
        + &second_phase2("vpn1-b", LAN2_B, LAN2_A);
    let gw = Haven::start(&line.gwb, "ik2p-gw", &conf);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&SwanctlConf::new().conn(two_child_swanctl("dial", SiteToSite::GWB_OUTER)))
        .expect("load client");
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    a.initiate("net", WAIT).expect("first child");
    a.initiate("net2", WAIT).expect("second child");
    two_children_agree(&a, &gw);
    let list = gw.ike_list();
    assert_eq!(
        list.as_array().map(|l| l.len()),
        Some(1),
        "one IKE SA: {list}"
    );
    ping_both(&line, &a, &gw);
}

/// Our static gateway with two phase2s initiates to a strongSwan responder: the first CHILD
/// SA comes with IKE_AUTH, the second with CREATE_CHILD_SA; strongSwan picks its own child
/// config for each by the selectors; pings pass through both, also after strongSwan rekeyed
/// the second one.
#[test]
fn static_gateway_with_two_phase2s_initiates_two_children() {
    require();
    let line = SiteToSite::new("ik2s").expect("topology");
    second_lans(&line);
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    a.load(&SwanctlConf::new().conn(two_child_swanctl("gw", SiteToSite::GWB_OUTER)))
        .expect("load responder");
    let conf = static_config(86400, 43200) + &second_phase2("vpn1-b", LAN2_B, LAN2_A);
    let gw = Haven::start(&line.gwb, "ik2s-gw", &conf);
    two_children_agree(&a, &gw);
    ping_both(&line, &a, &gw);
    let old = a.list_sas().expect("list")[0]
        .child("net2")
        .map(|c| c.spi_in)
        .unwrap_or(0);
    a.rekey_child("net2").expect("rekey net2");
    wait_for("net2 rekeyed", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        sas.iter()
            .flat_map(|s| s.children.iter())
            .any(|c| c.name == "net2" && c.state == "INSTALLED" && c.spi_in != old)
            .then_some(())
            .ok_or_else(|| format!("{sas:?}\n{}", gw.log("ikemgr")))
    });
    two_children_agree(&a, &gw);
    ping_both(&line, &a, &gw);
}

/// Operator commands against a strongSwan responder: our static gateway has `auto-negotiate
/// disable` and stays down until `vpnctl execute vpn ipsec tunnel up vpn1`; `tunnel rekey`
/// and `ike rekey` give new SPIs on both sides with ping passing; `diagnose vpn ike gateway
/// clear` sends a DELETE that strongSwan acts on.
#[test]
fn vpnctl_brings_the_tunnel_up_rekeys_it_and_clears_it() {
    require();
    let line = SiteToSite::new("ikop").expect("topology");
    let a = strongswan_responder(&line);
    let conf = static_config(86400, 43200).replace(
        "set dpd disable\n",
        "set dpd disable\n        set auto-negotiate disable\n",
    );
    let gw = Haven::start(&line.gwb, "ikop-gw", &conf);
    wait_for("ikemgr listening", WAIT, || {
        gw.log("ikemgr")
            .contains("listening on UDP 500")
            .then_some(())
            .ok_or_else(|| gw.log("ikemgr"))
    });
    let exec = |args: &[&str]| {
        let mut full = vec!["execute", "vpn", "ipsec"];
        full.extend_from_slice(args);
        let out = vpnctl(&gw.run, &full);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = exec(&["tunnel", "up", "no-such-phase2"]);
    assert!(!ok, "{text}");
    assert!(text.contains("no phase2"), "{text}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        a.list_sas().expect("list").is_empty(),
        "auto-negotiate disable: nothing before the command"
    );

    let (ok, text) = exec(&["tunnel", "up", "vpn1", "vpn1"]);
    assert!(ok, "{text}");
    assert!(text.contains("1 IKE SA(s) initiated"), "{text}");
    let first = a
        .wait_child_installed("gw", "net", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log("ikemgr")));
    assert!(!first.initiator, "Haven initiated");
    ping_through(&line, &a, &gw);

    let old_child = first.child("net").map(|c| c.spi_in).unwrap_or(0);
    let (ok, text) = exec(&["tunnel", "rekey", "vpn1"]);
    assert!(ok && text.contains("1 exchange(s) started"), "{text}");
    wait_for("our CHILD rekey reached strongSwan", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        let installed: Vec<u32> = sas
            .iter()
            .flat_map(|s| s.children.iter())
            .filter(|c| c.state == "INSTALLED")
            .map(|c| c.spi_in)
            .collect();
        (installed.len() == 1 && installed[0] != old_child)
            .then_some(())
            .ok_or_else(|| format!("{sas:?}\n{}", gw.log("ikemgr")))
    });
    ping_through(&line, &a, &gw);

    let (ok, text) = exec(&["ike", "rekey", "vpn1"]);
    assert!(ok && text.contains("1 exchange(s) started"), "{text}");
    let new_ike = wait_for("our IKE rekey reached strongSwan", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        match sas.as_slice() {
            [s] if s.state == "ESTABLISHED" && s.spis() != first.spis() => Ok(s.spis()),
            _ => Err(format!("{sas:?}\n{}", gw.log("ikemgr"))),
        }
    });
    let ours = gw.ike_list();
    assert_eq!(
        (hex_u64(&ours[0]["spi_i"]), hex_u64(&ours[0]["spi_r"])),
        new_ike,
        "{ours}"
    );
    ping_through(&line, &a, &gw);

    // `tunnel down` first, so the gateway does not come back on its own after the clear.
    let (ok, text) = exec(&["tunnel", "down", "vpn1"]);
    assert!(ok, "{text}");
    wait_for("strongSwan saw the CHILD SA deleted", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        sas.iter()
            .all(|s| s.children.iter().all(|c| c.state != "INSTALLED"))
            .then_some(())
            .ok_or_else(|| format!("{sas:?}"))
    });
    let out = vpnctl(
        &gw.run,
        &["diagnose", "vpn", "ike", "gateway", "clear", "name", "vpn1"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("cleared 1 IKE SA"), "{text}");
    wait_for("strongSwan deleted the IKE SA on our DELETE", WAIT, || {
        let sas = a.list_sas().map_err(|e| e.to_string())?;
        (sas.iter().all(|s| s.spis() != new_ike) && a.log().contains("received DELETE for IKE_SA"))
            .then_some(())
            .ok_or_else(|| format!("{sas:?}\n{}", a.log()))
    });
    assert!(
        line.client.ping(SiteToSite::SERVER, 1).is_err(),
        "path must close with the SA"
    );
}
