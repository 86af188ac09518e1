//! Shared by the `espd_*` suites: two Haven gateways (ikemgr + espd each, started directly
//! inside the gateway namespaces of a [`SiteToSite`] line, each with its own run-dir) joined
//! by a manual-key tunnel `vpn1`, so ESP runs without IKE.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use haven_tests::daemons::{bin, vpnctl, vpnctl_json, wait_for};
use haven_tests::netns::{Netns, Proc, ScratchDir, SiteToSite};
use serde_json::Value;

/// The tunnel (and TUN device) name on both gateways.
pub const TUNNEL: &str = "vpn1";
/// SPIs: gwa receives on SPI_A, gwb on SPI_B.
pub const SPI_A: u32 = 0x1001;
pub const SPI_B: u32 = 0x2001;
/// A test key (AES-128-GCM key + salt). Never use it for anything real.
pub const KEY_GCM: &str = "0102030405060708-090a0b0c0d0e0f10-11121314";

/// One gateway: its namespace, run-dir, config and daemons.
pub struct Gw {
    pub ns: Netns,
    pub dir: ScratchDir,
    pub run: PathBuf,
    pub conf: PathBuf,
    pub ikemgr: Option<Proc>,
    pub espd: Option<Proc>,
    pub lan_remote: &'static str,
    /// espd's packet threads (`ESPD_WORKERS`); `None`: one per core.
    pub workers: Option<usize>,
    starts: u32,
}

/// IPv6 addresses of gwa's and gwb's outside interfaces for the IPv6 pairs.
pub const GWA_OUTER6: &str = "fd00:31::1";
pub const GWB_OUTER6: &str = "fd00:31::2";

/// Gives gwa's and gwb's `out0` their IPv6 addresses [`GWA_OUTER6`] and [`GWB_OUTER6`]
/// (no duplicate address detection, so they work at once).
pub fn add_outer6(topo: &SiteToSite) {
    for (ns, addr) in [(&topo.gwa, GWA_OUTER6), (&topo.gwb, GWB_OUTER6)] {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "out0",
            "nodad",
        ])
        .expect("IPv6 address on out0");
    }
}

/// Inner IPv6 addressing for the inner-IPv6 suites: the client's LAN and the server's.
pub const LAN_A6: &str = "fd00:99:1::/64";
pub const LAN_B6: &str = "fd00:99:2::/64";
pub const CLIENT6: &str = "fd00:99:1::2";
pub const SERVER6: &str = "fd00:99:2::2";
const GWA_INNER6: &str = "fd00:99:1::1";
const GWB_INNER6: &str = "fd00:99:2::1";

/// Gives the client, the server and the gateways' inside interfaces the IPv6 addresses of
/// [`LAN_A6`] and [`LAN_B6`] (no duplicate address detection), default routes from client
/// and server to their gateway, and IPv6 forwarding on both gateways.
pub fn add_inner6(topo: &SiteToSite) {
    for (ns, dev, addr) in [
        (&topo.client, "c0", CLIENT6),
        (&topo.gwa, "in0", GWA_INNER6),
        (&topo.gwb, "in0", GWB_INNER6),
        (&topo.server, "s0", SERVER6),
    ] {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ])
        .expect("inner IPv6 address");
    }
    for (ns, via) in [(&topo.client, GWA_INNER6), (&topo.server, GWB_INNER6)] {
        ns.ip(&["-6", "route", "add", "default", "via", via])
            .expect("IPv6 default route");
    }
    for ns in [&topo.gwa, &topo.gwb] {
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("IPv6 forwarding");
    }
}

/// The manual-key configuration of one side (`ip-version 6` with `local-gw6`/`remote-gw6`
/// when the addresses are IPv6).
pub fn config(
    local: &str,
    remote: &str,
    spi_in: u32,
    spi_out: u32,
    src: &str,
    dst: &str,
    udp: bool,
) -> String {
    let gateways = if remote.contains(':') {
        format!("        set ip-version 6\n        set local-gw6 {local}\n        set remote-gw6 {remote}\n")
    } else {
        format!("        set local-gw {local}\n        set remote-gw {remote}\n")
    };
    let selectors = if src.contains(':') {
        format!("        set addr-type 6\n        set src-subnet6 {src}\n        set dst-subnet6 {dst}\n")
    } else {
        format!("        set src-subnet {src}\n        set dst-subnet {dst}\n")
    };
    format!(
        "config vpn ipsec manualkey-interface\n    edit \"{TUNNEL}\"\n        set interface \"out0\"\n{gateways}        set enc-alg aes128gcm\n        set enc-key {KEY_GCM}\n        set local-spi {spi_in:#x}\n        set remote-spi {spi_out:#x}\n        set encapsulation {}\n{selectors}    next\nend\n",
        if udp { "udp" } else { "none" }
    )
}

/// The pre-shared key of [`ike_config`] (a test key).
pub const IKE_PSK: &str = "haven-espd-pair-psk-0123456789";

/// The IKEv2 (PSK, AES-GCM) configuration of one side of `vpn1` between two Haven
/// gateways: static to `remote`, only answering with `passive` (so that one side
/// initiates), phase2 `src`/`dst` with `p2_extra` lines added.
pub fn ike_config(remote: &str, passive: bool, src: &str, dst: &str, p2_extra: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface
    edit \"{TUNNEL}\"
        set type static
{}        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set dpd disable
        set psksecret \"{IKE_PSK}\"
{}    next
end
config vpn ipsec phase2-interface
    edit \"{TUNNEL}\"
        set phase1name \"{TUNNEL}\"
        set proposal aes128gcm
        set pfs disable
{}{p2_extra}    next
end
",
        if remote.contains(':') {
            format!("        set ip-version 6\n        set remote-gw6 {remote}\n")
        } else {
            format!("        set remote-gw {remote}\n")
        },
        if passive {
            "        set passive-mode enable\n"
        } else {
            ""
        },
        if src.contains(':') {
            format!("        set src-addr-type subnet6\n        set src-subnet6 {src}\n        set dst-addr-type subnet6\n        set dst-subnet6 {dst}\n")
        } else {
            format!("        set src-subnet {src}\n        set dst-subnet {dst}\n")
        }
    )
}

impl Gw {
    pub fn new(ns: &Netns, label: &str, conf_text: &str, lan_remote: &'static str) -> Gw {
        let dir = ScratchDir::new(label).expect("scratch dir");
        let run = dir.path().join("run");
        let conf = dir.path().join("haven.conf");
        std::fs::write(&conf, conf_text).expect("write config");
        Gw {
            ns: ns.clone(),
            dir,
            run,
            conf,
            ikemgr: None,
            espd: None,
            lan_remote,
            workers: None,
            starts: 0,
        }
    }

    fn spawn(&mut self, daemon: &str) -> Proc {
        self.starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("{daemon}-{}.log", self.starts));
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd: Command = self.ns.command(bin(daemon));
        if let (Some(n), "espd") = (self.workers, daemon) {
            cmd.env("ESPD_WORKERS", n.to_string());
        }
        cmd.arg("--config")
            .arg(&self.conf)
            .arg("--run-dir")
            .arg(&self.run)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f);
        self.ns.spawn_command(cmd).expect("spawn daemon")
    }

    pub fn start_ikemgr(&mut self) {
        self.ikemgr = Some(self.spawn("ikemgr"));
    }

    pub fn start_espd(&mut self) {
        self.espd = Some(self.spawn("espd"));
    }

    /// `vpnctl --json diagnose vpn tunnel list` on this gateway.
    pub fn tunnel_list(&self) -> Value {
        vpnctl_json(&self.run, &["diagnose", "vpn", "tunnel", "list"]).expect("tunnel list")
    }

    /// The text form (for failure messages and to check it renders).
    pub fn tunnel_list_text(&self) -> String {
        let out = vpnctl(
            &self.run,
            &["diagnose", "vpn", "tunnel", "list", "name", TUNNEL],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The SA object of `vpn1` (first SA) in the tunnel list, if installed.
    pub fn sa(&self) -> Option<Value> {
        let v = vpnctl_json(&self.run, &["diagnose", "vpn", "tunnel", "list"]).ok()?;
        v["tunnels"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == TUNNEL)?["sas"]
            .as_array()?
            .first()
            .cloned()
    }

    /// A drop counter of the SA.
    pub fn sa_drop(&self, reason: &str) -> u64 {
        self.sa()
            .map(|s| s["drops"][reason].as_u64().unwrap_or(0))
            .unwrap_or(0)
    }

    /// A datapath-wide drop counter.
    pub fn drop_total(&self, reason: &str) -> u64 {
        self.tunnel_list()["drops"][reason].as_u64().unwrap_or(0)
    }

    /// Waits until espd has the SA and its TUN device, then routes the far LAN into it (the
    /// test plays the part of the routes a phase1 would install).
    pub fn wait_tunnel(&self) {
        wait_for("SA installed in espd", Duration::from_secs(20), || {
            self.sa()
                .map(|_| ())
                .ok_or_else(|| format!("no SA yet; espd log:\n{}", self.log("espd")))
        });
        wait_for("TUN device", Duration::from_secs(10), || {
            self.ns
                .ip(&["link", "show", TUNNEL])
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        self.ns
            .ip(&["route", "replace", self.lan_remote, "dev", TUNNEL])
            .expect("route into the tunnel");
    }

    /// The latest log of `daemon`.
    pub fn log(&self, daemon: &str) -> String {
        let mut best = String::new();
        for n in 1..=self.starts {
            if let Ok(s) =
                std::fs::read_to_string(self.dir.path().join(format!("{daemon}-{n}.log")))
            {
                if !s.is_empty() {
                    best = s;
                }
            }
        }
        best
    }
}

/// Two gateways with a manual-key AES-GCM tunnel over raw ESP (`udp = false`) or UDP 4500.
pub struct Pair {
    pub topo: SiteToSite,
    pub a: Gw,
    pub b: Gw,
}

impl Pair {
    pub fn new(label: &str, udp: bool) -> Pair {
        Pair::with_extra(label, udp, "")
    }

    /// As [`Pair::new`], with `extra_b` appended to gwb's configuration.
    pub fn with_extra(label: &str, udp: bool, extra_b: &str) -> Pair {
        Pair::build(label, udp, extra_b, None)
    }

    /// As [`Pair::new`], each espd with `workers` packet threads.
    pub fn with_workers(label: &str, udp: bool, workers: usize) -> Pair {
        Pair::build(label, udp, "", Some(workers))
    }

    fn build(label: &str, udp: bool, extra_b: &str, workers: Option<usize>) -> Pair {
        let topo = SiteToSite::new(label).expect("topology");
        let ca = config(
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            SPI_A,
            SPI_B,
            SiteToSite::LAN_A,
            SiteToSite::LAN_B,
            udp,
        );
        let cb = config(
            SiteToSite::GWB_OUTER,
            SiteToSite::GWA_OUTER,
            SPI_B,
            SPI_A,
            SiteToSite::LAN_B,
            SiteToSite::LAN_A,
            udp,
        ) + extra_b;
        let mut a = Gw::new(&topo.gwa, &format!("{label}-a"), &ca, SiteToSite::LAN_B);
        let mut b = Gw::new(&topo.gwb, &format!("{label}-b"), &cb, SiteToSite::LAN_A);
        for g in [&mut a, &mut b] {
            g.workers = workers;
            g.start_ikemgr();
            g.start_espd();
        }
        a.wait_tunnel();
        b.wait_tunnel();
        Pair { topo, a, b }
    }

    /// As [`Pair::new`] with IPv6 outer addresses: gwa's and gwb's `out0` get
    /// [`GWA_OUTER6`] and [`GWB_OUTER6`], and the manual-key tunnel runs between them.
    pub fn ipv6(label: &str, udp: bool) -> Pair {
        let topo = SiteToSite::new(label).expect("topology");
        add_outer6(&topo);
        let ca = config(
            GWA_OUTER6,
            GWB_OUTER6,
            SPI_A,
            SPI_B,
            SiteToSite::LAN_A,
            SiteToSite::LAN_B,
            udp,
        );
        let cb = config(
            GWB_OUTER6,
            GWA_OUTER6,
            SPI_B,
            SPI_A,
            SiteToSite::LAN_B,
            SiteToSite::LAN_A,
            udp,
        );
        let mut a = Gw::new(&topo.gwa, &format!("{label}-a"), &ca, SiteToSite::LAN_B);
        let mut b = Gw::new(&topo.gwb, &format!("{label}-b"), &cb, SiteToSite::LAN_A);
        for g in [&mut a, &mut b] {
            g.start_ikemgr();
            g.start_espd();
        }
        a.wait_tunnel();
        b.wait_tunnel();
        Pair { topo, a, b }
    }

    /// As [`Pair::new`] (IPv4 outside, raw ESP or UDP 4500) carrying inner IPv6: the LANs
    /// get [`LAN_A6`] and [`LAN_B6`] ([`add_inner6`]) and the manual key `addr-type 6`
    /// selectors between them.
    pub fn inner6(label: &str, udp: bool) -> Pair {
        let topo = SiteToSite::new(label).expect("topology");
        add_inner6(&topo);
        let ca = config(
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            SPI_A,
            SPI_B,
            LAN_A6,
            LAN_B6,
            udp,
        );
        let cb = config(
            SiteToSite::GWB_OUTER,
            SiteToSite::GWA_OUTER,
            SPI_B,
            SPI_A,
            LAN_B6,
            LAN_A6,
            udp,
        );
        let mut a = Gw::new(&topo.gwa, &format!("{label}-a"), &ca, LAN_B6);
        let mut b = Gw::new(&topo.gwb, &format!("{label}-b"), &cb, LAN_A6);
        for g in [&mut a, &mut b] {
            g.start_ikemgr();
            g.start_espd();
        }
        a.wait_tunnel();
        b.wait_tunnel();
        Pair { topo, a, b }
    }

    /// An IKEv2 tunnel as [`Pair::ike`] whose phase2 selectors are the IPv6 LANs
    /// [`LAN_A6`] and [`LAN_B6`] (`subnet6`), over IPv4 outside addresses.
    pub fn ike_inner6(label: &str) -> Pair {
        let topo = SiteToSite::new(label).expect("topology");
        add_inner6(&topo);
        let ca = ike_config(SiteToSite::GWB_OUTER, false, LAN_A6, LAN_B6, "");
        let cb = ike_config(SiteToSite::GWA_OUTER, true, LAN_B6, LAN_A6, "");
        let mut a = Gw::new(&topo.gwa, &format!("{label}-a"), &ca, LAN_B6);
        let mut b = Gw::new(&topo.gwb, &format!("{label}-b"), &cb, LAN_A6);
        for g in [&mut b, &mut a] {
            g.start_ikemgr();
            g.start_espd();
        }
        a.wait_tunnel();
        b.wait_tunnel();
        Pair { topo, a, b }
    }

    /// Two gateways with an IKEv2 tunnel `vpn1` over raw ESP: gwa initiates, gwb only
    /// answers; `p2_a` and `p2_b` are extra phase2 lines of each side.
    pub fn ike(label: &str, p2_a: &str, p2_b: &str) -> Pair {
        Pair::ike_over(label, false, p2_a, p2_b)
    }

    /// As [`Pair::ike`]; with `ipv6` the gateways' outside addresses are [`GWA_OUTER6`] and
    /// [`GWB_OUTER6`] (`ip-version 6`, `remote-gw6`): IKE on UDP 500 and ESP over IPv6.
    pub fn ike_over(label: &str, ipv6: bool, p2_a: &str, p2_b: &str) -> Pair {
        let topo = SiteToSite::new(label).expect("topology");
        let (gwa, gwb) = if ipv6 {
            add_outer6(&topo);
            (GWA_OUTER6, GWB_OUTER6)
        } else {
            (SiteToSite::GWA_OUTER, SiteToSite::GWB_OUTER)
        };
        let ca = ike_config(gwb, false, SiteToSite::LAN_A, SiteToSite::LAN_B, p2_a);
        let cb = ike_config(gwa, true, SiteToSite::LAN_B, SiteToSite::LAN_A, p2_b);
        let mut a = Gw::new(&topo.gwa, &format!("{label}-a"), &ca, SiteToSite::LAN_B);
        let mut b = Gw::new(&topo.gwb, &format!("{label}-b"), &cb, SiteToSite::LAN_A);
        for g in [&mut b, &mut a] {
            g.start_ikemgr();
            g.start_espd();
        }
        a.wait_tunnel();
        b.wait_tunnel();
        Pair { topo, a, b }
    }

    /// Pings the server from the client until one reply comes back.
    pub fn wait_ping(&self) {
        wait_for(
            "first ping through the tunnel",
            Duration::from_secs(15),
            || {
                self.topo
                    .client
                    .run("ping", &["-n", "-c", "1", "-W", "1", SiteToSite::SERVER])
                    .map(|_| ())
                    .map_err(|e| {
                        format!(
                            "{e}\ngwa:\n{}\ngwb:\n{}\ngwa espd log:\n{}",
                            self.a.tunnel_list_text(),
                            self.b.tunnel_list_text(),
                            self.a.log("espd")
                        )
                    })
            },
        );
    }

    /// `count` pings at 0.2 s; returns (sent, received).
    pub fn ping(&self, count: u32) -> (u32, u32) {
        let out = self
            .topo
            .client
            .exec(
                "ping",
                &[
                    "-n",
                    "-q",
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    SiteToSite::SERVER,
                ],
            )
            .expect("ping");
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }
}

/// (transmitted, received) from ping's summary line.
pub fn parse_ping(out: &str) -> (u32, u32) {
    for line in out.lines() {
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if nums.len() >= 2 {
                return (nums[0], nums[1]);
            }
        }
    }
    (0, 0)
}

/// Loads an nftables table in `ns` counting what arrives on `out0` (ESP, UDP 4500, ICMP in
/// clear); read it back with [`wire_counters`].
pub fn count_wire(ns: &Netns) {
    ns.nft(
        "table ip espdtest {\n chain pre {\n  type filter hook prerouting priority -300;\n  iifname \"out0\" ip protocol esp counter comment \"esp\"\n  iifname \"out0\" udp dport 4500 counter comment \"udp4500\"\n  iifname \"out0\" ip protocol icmp counter comment \"icmp\"\n }\n}\n",
    )
    .expect("nft counters");
}

/// The packet count of the nft counter commented `tag` in a table `listing` (0 if absent).
fn nft_counter(listing: &str, tag: &str) -> u64 {
    listing
        .lines()
        .find(|l| l.contains(&format!("comment \"{tag}\"")))
        .and_then(|l| {
            let i = l.find("packets ")? + "packets ".len();
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// (esp, udp4500, cleartext icmp) packets counted on `out0`.
pub fn wire_counters(ns: &Netns) -> (u64, u64, u64) {
    let out = ns
        .run("nft", &["list", "table", "ip", "espdtest"])
        .expect("nft list");
    let get = |tag: &str| nft_counter(&out, tag);
    (get("esp"), get("udp4500"), get("icmp"))
}

/// Loads an nftables table in `ns` counting what arrives on `out0` over IPv6 (ESP, UDP
/// 4500) and over IPv4 (ESP, UDP 4500, ICMP in clear); read it back with
/// [`wire_counters6`].
pub fn count_wire6(ns: &Netns) {
    ns.nft(
        "table inet espdtest6 {\n chain pre {\n  type filter hook prerouting priority -300;\n  iifname \"out0\" meta nfproto ipv6 meta l4proto esp counter comment \"esp6\"\n  iifname \"out0\" meta nfproto ipv6 udp dport 4500 counter comment \"udp6\"\n  iifname \"out0\" meta nfproto ipv4 meta l4proto { esp, icmp } counter comment \"v4\"\n  iifname \"out0\" meta nfproto ipv4 udp dport 4500 counter comment \"v4udp\"\n }\n}\n",
    )
    .expect("nft counters");
}

/// (IPv6 ESP, IPv6 UDP 4500, IPv4 ESP/ICMP/UDP 4500) packets counted on `out0`.
pub fn wire_counters6(ns: &Netns) -> (u64, u64, u64) {
    let out = ns
        .run("nft", &["list", "table", "inet", "espdtest6"])
        .expect("nft list");
    let get = |tag: &str| nft_counter(&out, tag);
    (get("esp6"), get("udp6"), get("v4") + get("v4udp"))
}

/// A TCP transfer (iperf3, 1 s) from the client to the server through the tunnel:
/// exercises the TSO segmentation on the sending gateway and the coalescing on the
/// receiving one. Asserts that data arrived and nothing was dropped for a bad offload
/// header, not how fast.
/// Starts `iperf3 -s` (with `args`) in the server namespace and waits until it listens.
pub fn iperf_server(pair: &Pair, args: &[&str]) -> Proc {
    let mut all = vec!["-s"];
    all.extend_from_slice(args);
    let server = pair
        .topo
        .server
        .spawn("iperf3", &all)
        .expect("iperf3 server");
    wait_for("iperf3 server", Duration::from_secs(10), || {
        let out = pair
            .topo
            .server
            .run("ss", &["-ltn"])
            .map_err(|e| e.to_string())?;
        if out.contains(":5201 ") {
            Ok(())
        } else {
            Err(out)
        }
    });
    server
}

pub fn carries_tcp(pair: &Pair) {
    let mut server = iperf_server(pair, &["-1"]);
    let out = pair
        .topo
        .client
        .exec("iperf3", &["-c", SiteToSite::SERVER, "-t", "1", "-J"])
        .expect("iperf3 client");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        bytes > 1_000_000,
        "TCP through the tunnel moved {bytes} bytes: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = server.kill_now();
    for gw in [&pair.a, &pair.b] {
        assert_eq!(gw.drop_total("offload"), 0);
        assert_eq!(gw.drop_total("inner_header"), 0);
        assert_eq!(gw.drop_total("tun_write"), 0);
    }
}
