//! A gateway whose phase1 says `set local-gw` with an address on its loopback (as seed 001
//! and the ops lab do) sends every IKE message and every ESP packet from that address, not
//! from the outgoing interface's: a capture on gwb's outer interface (tcpdump -w, read back
//! here) holds no IKE or ESP packet towards the client with another source.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (ikemgr+espd) - 10.99.2.2 server
//!                                                  lo: 192.168.202.35 (local-gw)
//! ```
//!
//! `ike_and_udp_esp_leave_from_local_gw`: a strongSwan dial-up client. Its charon runs
//! kernel-libipsec, which needs UDP encapsulation: IKE_SA_INIT goes
//! over UDP 500 (ikemgr's own socket), IKE_AUTH and ESP over UDP 4500 (espd's socket, IKE
//! relayed for ikemgr). `raw_esp_leaves_from_local_gw`: a manual-key tunnel between two Haven
//! gateways over raw ESP (IP protocol 50, espd's raw socket). Needs root, iproute2,
//! iputils-ping, tcpdump and strongSwan.

mod espd_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use haven_tests::daemons::wait_for;
use haven_tests::gateway::Gateway;
use haven_tests::netns::{Netns, Proc, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};

const PSK: &str = "haven-local-gw-psk-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";
/// gwb's loopback address, its phase1's local-gw.
const LOCAL_GW: [u8; 4] = [192, 168, 202, 35];
const LOCAL_GW_STR: &str = "192.168.202.35";

haven_tests::gateway_newtype!(Haven);

impl Haven {
    fn start(ns: &Netns, label: &str, conf_text: &str) -> Haven {
        let daemons = [("ikemgr", "127.0.0.1:19721"), ("espd", "127.0.0.1:19724")];
        Haven(Gateway::start(ns, label, conf_text, &daemons, WAIT))
    }
}

fn gateway_config() -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"out0\"
        set local-gw {LOCAL_GW_STR}
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

/// What a capture holds towards the client, by kind.
#[derive(Debug, Default)]
struct Seen {
    ike: usize,
    /// ESP as IP protocol 50.
    esp_raw: usize,
    /// ESP in UDP 4500.
    esp_udp: usize,
    /// (source, kind) of every IKE/ESP packet towards the client not from LOCAL_GW.
    wrong: Vec<(String, &'static str)>,
}

/// Reads a classic pcap file of Ethernet frames and classifies every IPv4 packet towards
/// `client` that is IKE or ESP (protocol 50, or UDP from/to 500 or 4500).
fn scan_pcap(path: &Path, client: [u8; 4]) -> Seen {
    let d = std::fs::read(path).expect("read pcap");
    assert!(
        d.len() >= 24,
        "pcap shorter than its header: {} bytes",
        d.len()
    );
    let le = match d[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file: {:02x?}", &d[..4]),
    };
    let u32_at = |o: usize| {
        let b = [d[o], d[o + 1], d[o + 2], d[o + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    assert_eq!(u32_at(20), 1, "link type is not Ethernet");
    let mut seen = Seen::default();
    let mut o = 24;
    while o + 16 <= d.len() {
        let caplen = u32_at(o + 8) as usize;
        let Some(frame) = d.get(o + 16..o + 16 + caplen) else {
            break;
        };
        o += 16 + caplen;
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[16..20] != client || ip.len() < ihl + 4 {
            continue;
        }
        let ports = |p: &[u8]| {
            let s = u16::from_be_bytes([p[0], p[1]]);
            let t = u16::from_be_bytes([p[2], p[3]]);
            [s, t]
        };
        let kind = match ip[9] {
            50 => "esp",
            17 => {
                let pp = ports(&ip[ihl..]);
                if pp.contains(&500) {
                    "ike"
                } else if pp.contains(&4500) {
                    // Non-ESP marker (four zero octets) before IKE; else ESP in UDP.
                    match ip.get(ihl + 8..ihl + 12) {
                        Some([0, 0, 0, 0]) => "ike",
                        _ => "esp-udp",
                    }
                } else {
                    continue;
                }
            }
            _ => continue,
        };
        match kind {
            "ike" => seen.ike += 1,
            "esp" => seen.esp_raw += 1,
            _ => seen.esp_udp += 1,
        }
        if ip[12..16] != LOCAL_GW {
            let s = format!("{}.{}.{}.{}", ip[12], ip[13], ip[14], ip[15]);
            seen.wrong.push((s, kind));
        }
    }
    seen
}

/// Starts tcpdump on gwb's out0 writing `pcap`, and waits for its file header.
fn capture(ns: &Netns, pcap: &Path) -> Proc {
    let cap = ns
        .spawn(
            "tcpdump",
            &[
                "-U",
                "--immediate-mode",
                "-n",
                "-s",
                "128",
                "-i",
                "out0",
                "-w",
                pcap.to_str().expect("utf-8 path"),
                "ip",
            ],
        )
        .expect("tcpdump (Debian package tcpdump)");
    wait_for("tcpdump writing", WAIT, || {
        std::fs::metadata(pcap)
            .ok()
            .filter(|m| m.len() >= 24)
            .map(|_| ())
            .ok_or_else(|| "no pcap header yet".to_string())
    });
    cap
}

/// gwb's loopback address and gwa's route to it.
fn add_local_gw(line: &SiteToSite) {
    line.gwb
        .add_addr("lo", &format!("{LOCAL_GW_STR}/32"))
        .expect("loopback address");
    line.gwa
        .add_route(&format!("{LOCAL_GW_STR}/32"), SiteToSite::GWB_OUTER)
        .expect("route to local-gw");
}

fn run(label: &str) {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let line = SiteToSite::new(label).expect("topology");
    add_local_gw(&line);
    let gw = Haven::start(&line.gwb, &format!("{label}-gw"), &gateway_config());
    let pcap: PathBuf = gw.dir.path().join("out0.pcap");
    let mut cap = capture(&line.gwb, &pcap);

    let mut a: Charon = Charon::start(&line.gwa).expect("charon in gwa");
    let child = ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B);
    a.load(
        &SwanctlConf::new().conn(
            Conn::psk("dial", SiteToSite::GWA_OUTER, LOCAL_GW_STR, PSK.as_bytes())
                .ids(CLIENT_ID, GW_ID)
                .proposals(&["aes128gcm16-prfsha256-ecp256"])
                .child(child.esp_proposals(&["aes128gcm16"])),
        ),
    )
    .expect("load client");
    let ctx = |a: &Charon| {
        format!(
            "charon:\n{}\nikemgr:\n{}\nespd:\n{}",
            a.log(),
            gw.log("ikemgr"),
            gw.log("espd")
        )
    };
    if let Err(e) = a.initiate("net", WAIT) {
        panic!("initiate failed: {e}\n{}", ctx(&a));
    }
    a.wait_child_installed("dial", "net", WAIT)
        .unwrap_or_else(|e| panic!("client CHILD SA: {e}\n{}", ctx(&a)));
    wait_for("a ping through the tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    line.client
        .ping(SiteToSite::SERVER, 5)
        .unwrap_or_else(|e| panic!("pings: {e}\n{}", ctx(&a)));
    // SIGTERM: tcpdump writes out what it holds and ends.
    let _ = cap.stop(Duration::from_secs(5));

    let client = [172, 31, 0, 1];
    let seen = scan_pcap(&pcap, client);
    assert!(
        seen.wrong.is_empty(),
        "IKE/ESP packets towards the client not from local-gw {LOCAL_GW_STR}: {seen:?}\n{}",
        ctx(&a)
    );
    // The IKE_SA_INIT and IKE_AUTH responses, and the echo replies in UDP 4500.
    assert!(
        seen.ike >= 2 && seen.esp_udp >= 5,
        "too little captured towards the client: {seen:?}\n{}",
        ctx(&a)
    );
}

#[test]
fn ike_and_udp_esp_leave_from_local_gw() {
    run("lgwu");
}

#[test]
fn raw_esp_leaves_from_local_gw() {
    use espd_common::{config, Gw, Pair, SPI_A, SPI_B};
    let topo = SiteToSite::new("lgwe").expect("topology");
    add_local_gw(&topo);
    let ca = config(
        SiteToSite::GWA_OUTER,
        LOCAL_GW_STR,
        SPI_A,
        SPI_B,
        SiteToSite::LAN_A,
        SiteToSite::LAN_B,
        false,
    );
    let cb = config(
        LOCAL_GW_STR,
        SiteToSite::GWA_OUTER,
        SPI_B,
        SPI_A,
        SiteToSite::LAN_B,
        SiteToSite::LAN_A,
        false,
    );
    let mut a = Gw::new(&topo.gwa, "lgwe-a", &ca, SiteToSite::LAN_B);
    let mut b = Gw::new(&topo.gwb, "lgwe-b", &cb, SiteToSite::LAN_A);
    for g in [&mut a, &mut b] {
        g.start_ikemgr();
        g.start_espd();
    }
    a.wait_tunnel();
    b.wait_tunnel();
    let pcap = b.dir.path().join("out0.pcap");
    let pair = Pair { topo, a, b };
    let mut cap = capture(&pair.topo.gwb, &pcap);
    pair.wait_ping();
    let (tx, rx) = pair.ping(5);
    std::thread::sleep(Duration::from_millis(500));
    let _ = cap.kill_now();
    let seen = scan_pcap(&pcap, [172, 31, 0, 1]);
    let ctx = || format!("gwb espd log:\n{}", pair.b.log("espd"));
    assert!(
        seen.wrong.is_empty(),
        "ESP towards gwa not from local-gw {LOCAL_GW_STR}: {seen:?}\n{}",
        ctx()
    );
    assert!(
        rx == tx && seen.esp_raw >= 5 && seen.esp_udp == 0,
        "pings {rx}/{tx}; too little raw ESP captured towards gwa: {seen:?}\n{}",
        ctx()
    );
}
