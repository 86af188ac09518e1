//! The FGCP pair of `ha_failover` (test) and `ha_failover_bench` (example): topology,
//! members (all four daemons each), the strongSwan client and helpers.
//!
//! ```text
//! client 192.168.7.2 (charon, 10.10.1.2 inside) - 192.168.7.1 router 192.168.129.1 [br0]
//!     br0: gw1 port2 / gw2 port2 (shared 192.168.129.254), server 192.168.129.50
//!     gw1 port4 169.254.0.1 ---- 169.254.0.2 gw2 port4 (FGCP heartbeats and sync)
//! ```

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus_schema::DaemonKind;
use haven_tests::daemons::{vpnctl_json, wait_for};
use haven_tests::member;
use haven_tests::netns::{veth, Netns, Proc, ScratchDir};
use haven_tests::strongswan::{self, Charon, ChildCfg, ChildSa, Conn, IkeSa, SwanctlConf};
use serde_json::Value;

pub const PSK: &str = "haven-ha-failover-psk-0123456789";
pub const GW_ID: &str = "gw.haven.test";
pub const CLIENT_ID: &str = "client.haven.test";
pub const SHARED: &str = "192.168.129.254";
pub const SERVER: &str = "192.168.129.50";
pub const CLIENT_INNER: &str = "10.10.1.2";
pub const WAIT: Duration = Duration::from_secs(30);

/// The phase1's DPD lines in [`config`] unless a test asks for others.
pub const NO_DPD: &str = "        set dpd disable\n";

pub fn config(priority: u8, dpd: &str) -> String {
    config_hb(priority, dpd, HEARTBEAT)
}

/// FortiOS `hb-interval` (in 100 ms) and `hb-lost-threshold` of [`config`].
pub const HEARTBEAT: (u32, u32) = (1, 3);

/// `hb-interval` 200 ms, `hb-lost-threshold` 20 (4 s), for tests in which nothing must fail
/// over: a loaded machine that stalls a member for a few hundred ms, or a daemon restart,
/// must not make the secondary take the tunnel (seen once with [`HEARTBEAT`]: both members
/// primary, pings lost).
pub const QUIET_HEARTBEAT: (u32, u32) = (2, 20);

/// [`config`] with the heartbeat `(hb-interval, hb-lost-threshold)`.
pub fn config_hb(priority: u8, dpd: &str, hb: (u32, u32)) -> String {
    let (hb_interval, hb_lost) = hb;
    format!(
        "config system ha
    set group-id 5
    set group-name \"HV_PAIR\"
    set mode a-p
    set password \"ha-pair-password\"
    set hbdev \"port4\" 50
    set priority {priority}
    set hb-interval {hb_interval}
    set hb-lost-threshold {hb_lost}
end
config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"port2\"
        set ike-version 2
        set local-gw {SHARED}
        set peertype any
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
{dpd}        set nattraversal enable
        set psksecret \"{PSK}\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {SERVER} 255.255.255.255
        set dst-subnet 10.10.1.0 255.255.255.0
    next
end
"
    )
}

pub struct Member {
    pub ns: Netns,
    pub dir: PathBuf,
    pub run: PathBuf,
    pub procs: Vec<Proc>,
    /// The phase1's DPD lines (see [`config`]).
    pub dpd: String,
    /// `hb-interval` and `hb-lost-threshold` ([`config_hb`]).
    pub hb: (u32, u32),
}

impl Member {
    pub fn start(ns: Netns, dir: &Path, name: &str, priority: u8, dpd: &str) -> Member {
        Member::start_hb(ns, dir, name, priority, dpd, HEARTBEAT)
    }

    /// [`Member::start`] with the heartbeat `hb` ([`config_hb`]).
    pub fn start_hb(
        ns: Netns,
        dir: &Path,
        name: &str,
        priority: u8,
        dpd: &str,
        hb: (u32, u32),
    ) -> Member {
        let dir = dir.join(name);
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let mut m = Member {
            ns,
            dir,
            run,
            procs: Vec::new(),
            dpd: dpd.to_string(),
            hb,
        };
        m.spawn(priority);
        m
    }
    /// Writes the configuration with `priority` and starts the four daemons (logs appended).
    pub fn spawn(&mut self, priority: u8) {
        let conf = self.dir.join("haven.conf");
        std::fs::write(&conf, config_hb(priority, &self.dpd, self.hb)).unwrap();
        self.procs = member::spawn_all(&self.ns, &conf, &self.run, &self.dir);
    }

    pub fn log(&self, d: &str) -> String {
        member::read_log(&self.dir, d)
    }

    /// `d`'s log after its first `at` bytes (its length when a step began).
    pub fn log_since(&self, d: &str, at: usize) -> String {
        let l = self.log(d);
        l.get(at.min(l.len())..).unwrap_or_default().to_string()
    }

    pub fn logs(&self) -> String {
        member::log_tails(&self.dir, self.ns.label(), 60)
    }

    pub fn role(&self) -> Option<String> {
        vpnctl_json(&self.run, &["diagnose", "sys", "ha", "status"])
            .ok()?
            .get("role")?
            .as_str()
            .map(str::to_string)
    }

    /// `vpnctl diagnose vpn tunnel list name vpn1_1`'s `role=`, if listed.
    pub fn listed_role(&self) -> Option<String> {
        haven_tests::daemons::listed_role(&self.run, "vpn1_1")
    }

    pub fn holds_shared(&self) -> bool {
        self.ns
            .run("ip", &["-4", "-o", "addr", "show", "dev", "port2"])
            .is_ok_and(|o| o.contains(SHARED))
    }

    pub fn view(&self, daemon: DaemonKind, name: &str) -> Result<Value, String> {
        member::view(&self.run, daemon, name)
    }

    pub fn command(&self, name: &str, args: &[&str]) -> Result<Value, String> {
        member::ikemgr_command(&self.run, name, args)
    }

    /// ikemgr's IKE SA of vpn1_1: (spi_i, spi_r, child inbound SPIs).
    pub fn ike_sa(&self) -> Option<(u64, u64, Vec<u32>)> {
        let v = self.view(DaemonKind::Ikemgr, "ike-gateways").ok()?;
        let sa = v.as_array()?.iter().find(|s| s["name"] == "vpn1_1")?;
        let children = sa["children"]
            .as_array()?
            .iter()
            .map(|c| hex_u32(&c["spi_in"]))
            .collect();
        Some((hex_u64(&sa["spi_i"]), hex_u64(&sa["spi_r"]), children))
    }

    /// espd's outbound SAs of vpn1_1: (spi_out, next sequence number).
    pub fn esp_seqs(&self) -> Vec<(u32, u64)> {
        member::esp_seqs(&self.run, "vpn1_1")
    }

    /// `kill -9` of one daemon, then started again at once with the same configuration and
    /// run-dir, as supervisord or systemd would (its log is appended to).
    pub fn kill9_and_restart(&mut self, daemon: &str) {
        self.kill9(daemon);
        self.restart(daemon);
    }

    /// `kill -9` of one daemon, left down.
    pub fn kill9(&mut self, daemon: &str) {
        let (i, _) = member::daemon_index(daemon).expect("a daemon name");
        let _ = self.procs[i].kill_now();
    }

    /// Starts one daemon again with the same configuration and run-dir (its log appended).
    pub fn restart(&mut self, daemon: &str) {
        let (i, port) = member::daemon_index(daemon).expect("a daemon name");
        let conf = self.dir.join("haven.conf");
        self.procs[i] = member::spawn_daemon(&self.ns, daemon, port, &conf, &self.run, &self.dir);
    }

    pub fn kill_all(&mut self) {
        member::kill_all(&mut self.procs);
    }
}

// Shared with the FGSP suites (`haven_tests::member`); not every test uses each.
#[allow(unused_imports)]
pub use haven_tests::member::{client_sa, hex_u32, hex_u64, received_seqs, replay_failures, rt};

/// Pings from the client's inner address until `count` were sent; (sent, answered).
pub fn ping_burst(client: &Netns, count: u32) -> (u32, u32) {
    (
        count,
        member::ping_answered(client, CLIENT_INNER, SERVER, count),
    )
}

/// A member's LAN routes (the kernel drops them when port2 goes down).
pub fn lan_routes(gw: &Netns) {
    gw.ip(&["route", "replace", "192.168.129.0/24", "dev", "port2"])
        .unwrap();
    gw.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "192.168.129.1",
        "dev",
        "port2",
        "onlink",
    ])
    .unwrap();
}

/// The whole lab, up to a tunnel that carries ping through gw1 (primary).
pub struct Lab {
    pub scratch: ScratchDir,
    pub router: Netns,
    pub client: Netns,
    pub server: Netns,
    pub gw1: Netns,
    pub gw2: Netns,
    pub m1: Member,
    pub m2: Member,
    pub charon: Charon,
    pub before: IkeSa,
    pub child_before: ChildSa,
}

impl Lab {
    /// Builds the lab: namespaces labelled `label-*`, scratch files tagged `tag`.
    pub fn new(tag: &str, label: &str) -> Lab {
        Lab::with_dpd(tag, label, NO_DPD)
    }

    /// [`Lab::new`] with the members' phase1 DPD lines `dpd`.
    pub fn with_dpd(tag: &str, label: &str, dpd: &str) -> Lab {
        Lab::with_heartbeat(tag, label, dpd, HEARTBEAT)
    }

    /// [`Lab::with_dpd`] with the members' heartbeat `hb` ([`config_hb`]): tests that are
    /// not about failover use a slower one, so a loaded machine does not fail a member
    /// over by accident.
    pub fn with_heartbeat(tag: &str, label: &str, dpd: &str, hb: (u32, u32)) -> Lab {
        Lab::with_options(tag, label, dpd, hb, None)
    }

    /// [`Lab::with_heartbeat`], the strongSwan client also running its own liveness checks
    /// every `client_dpd` (`dpd_delay`) when set.
    pub fn with_options(
        tag: &str,
        label: &str,
        dpd: &str,
        hb: (u32, u32),
        client_dpd: Option<Duration>,
    ) -> Lab {
        if let Err(e) = strongswan::preflight() {
            panic!("cannot run strongSwan tests on this machine: {e}");
        }
        let scratch = ScratchDir::new(tag).expect("scratch dir");

        // Topology.
        let router = Netns::new(&format!("{label}-r")).unwrap();
        let client = Netns::new(&format!("{label}-c")).unwrap();
        let server = Netns::new(&format!("{label}-s")).unwrap();
        let gw1 = Netns::new(&format!("{label}-g1")).unwrap();
        let gw2 = Netns::new(&format!("{label}-g2")).unwrap();
        router.add_bridge("br0").unwrap();
        router.add_addr("br0", "192.168.129.1/24").unwrap();
        veth(&client, "wan0", &router, "cl0").unwrap();
        client.add_addr("wan0", "192.168.7.2/24").unwrap();
        client.default_route("192.168.7.1").unwrap();
        client
            .add_addr("lo", &format!("{CLIENT_INNER}/32"))
            .unwrap();
        router.add_addr("cl0", "192.168.7.1/24").unwrap();
        router.ip_forward(true).unwrap();
        for (ns, port) in [(&server, "sv0"), (&gw1, "g10"), (&gw2, "g20")] {
            let inner = if ns.label() == server.label() {
                "eth0"
            } else {
                "port2"
            };
            veth(ns, inner, &router, port).unwrap();
            router.enslave(port, "br0").unwrap();
            router.link_up(port).unwrap();
        }
        server.add_addr("eth0", &format!("{SERVER}/24")).unwrap();
        server.default_route("192.168.129.1").unwrap();
        server
            .add_route("10.10.1.0/24", SHARED)
            .expect("server route to the client's inside via the shared address");
        veth(&gw1, "port4", &gw2, "port4").unwrap();
        for (i, gw) in [&gw1, &gw2].into_iter().enumerate() {
            gw.add_addr("port4", &format!("169.254.0.{}/24", i + 1))
                .unwrap();
            // No address of its own on the LAN (the primary holds the shared one) beyond a
            // host-scoped one that is never a source: without any address on port2 the kernel
            // drops port2's routes when the shared address is removed.
            gw.ip(&[
                "addr",
                "add",
                &format!("192.168.200.{}/32", i + 1),
                "dev",
                "port2",
                "scope",
                "host",
            ])
            .unwrap();
            lan_routes(gw);
            gw.ip_forward(true).unwrap();
            // During a takeover the shared address can come up a moment before ikemgr's route
            // into the tunnel: a reply forwarded back out of port2 then triggers an ICMP
            // redirect that the server would cache for minutes. Members send none.
            for k in ["all", "default", "port2"] {
                gw.sysctl(&format!("net.ipv4.conf.{k}.send_redirects"), "0")
                    .unwrap();
            }
        }

        // The pair: gw1 (priority 200) primary, gw2 (100) secondary.
        let m1 = Member::start_hb(gw1.clone(), scratch.path(), "gw1", 200, dpd, hb);
        let m2 = Member::start_hb(gw2.clone(), scratch.path(), "gw2", 100, dpd, hb);
        wait_for("gw1 primary, gw2 secondary", WAIT, || {
            match (m1.role(), m2.role()) {
                (Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        wait_for("gw1 holds the shared address", WAIT, || {
            (m1.holds_shared() && !m2.holds_shared())
                .then_some(())
                .ok_or_else(|| format!("gw1 {} gw2 {}", m1.holds_shared(), m2.holds_shared()))
        });

        // The client dials in.
        let mut charon = Charon::start(&client).expect("charon");
        let with_dpd = |c: Conn| match client_dpd {
            Some(d) => c.dpd_delay(d),
            None => c,
        };
        charon
            .load(
                &SwanctlConf::new().conn(with_dpd(
                    Conn::psk("dial", "192.168.7.2", SHARED, PSK.as_bytes())
                        .ids(CLIENT_ID, GW_ID)
                        // The second for labs whose phase1 lines ask for CBC.
                        .proposals(&["aes128gcm16-prfsha256-ecp256", "aes256-sha256-ecp256"])
                        .child(
                            ChildCfg::new(
                                "net",
                                &format!("{CLIENT_INNER}/32"),
                                &format!("{SERVER}/32"),
                            )
                            .esp_proposals(&["aes128gcm16"]),
                        ),
                )),
            )
            .expect("swanctl load");
        if let Err(e) = charon.initiate("net", WAIT) {
            panic!("initiate: {e}\n{}\n{}", charon.log(), m1.logs());
        }
        let before = client_sa(&charon).expect("client IKE SA");
        let child_before = before.child("net").expect("client CHILD SA").clone();
        wait_for("gw1's IKE SA", WAIT, || {
            m1.ike_sa()
                .filter(|(i, r, _)| (*i, *r) == before.spis())
                .ok_or_else(|| m1.logs())
        });
        wait_for("ping through gw1", WAIT, || {
            let (sent, got) = ping_burst(&client, 1);
            (got > 0)
                .then_some(())
                .ok_or_else(|| format!("{got}/{sent}\n{}", m1.logs()))
        });
        Lab {
            scratch,
            router,
            client,
            server,
            gw1,
            gw2,
            m1,
            m2,
            charon,
            before,
            child_before,
        }
    }
}

/// Rekeys on the tunnel `m` carries, from each side in turn, each followed by traffic (at
/// least 3 of 5 pings from `client`): strongSwan's CHILD SA rekey, strongSwan's IKE SA rekey
/// (`m`, named `name`, must follow it), Haven's CHILD SA rekey, Haven's IKE SA rekey. Then no
/// replay failure at strongSwan and still one IKE SA `dial` there (every step in place).
/// `before` and `child_before` are the client's SAs before the first rekey.
pub fn rekey_from_both_sides(
    charon: &Charon,
    client: &Netns,
    m: &Member,
    name: &str,
    before: &IkeSa,
    child_before: &ChildSa,
) {
    let check_traffic = |what: &str| {
        let (sent, got) = ping_burst(client, 5);
        assert!(
            got >= 3,
            "ping after {what}: {got}/{sent}\n{}\n{}",
            m.logs(),
            charon.log()
        );
    };
    // 1. strongSwan rekeys the CHILD SA.
    charon.rekey_child("net").expect("swanctl --rekey --child");
    let c1 = wait_for("client CHILD SA rekeyed", WAIT, || {
        let sa = client_sa(charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        if c.spi_in != child_before.spi_in && c.state == "INSTALLED" {
            Ok(c)
        } else {
            Err(format!("{c:?}\n{}", m.logs()))
        }
    });
    check_traffic("strongSwan's CHILD SA rekey");
    // 2. strongSwan rekeys the IKE SA.
    charon.rekey_ike("dial").expect("swanctl --rekey --ike");
    let ike1 = wait_for("client IKE SA rekeyed", WAIT, || {
        let sa = client_sa(charon).ok_or("no IKE SA")?;
        (sa.spis() != before.spis())
            .then_some(sa.spis())
            .ok_or_else(|| format!("{:?}\n{}", sa.spis(), m.logs()))
    });
    wait_for(&format!("{name} follows the IKE rekey"), WAIT, || {
        m.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == ike1)
            .ok_or_else(|| m.logs())
    });
    check_traffic("strongSwan's IKE SA rekey");
    // 3. Haven rekeys the CHILD SA.
    m.command("ike-rekey", &["vpn1_1", "child"])
        .expect("ikemgr CHILD rekey");
    wait_for("client sees Haven's CHILD SA rekey", WAIT, || {
        let sa = client_sa(charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        (c.spi_in != c1.spi_in && c.state == "INSTALLED")
            .then_some(())
            .ok_or_else(|| format!("{c:?}\n{}", m.logs()))
    });
    check_traffic("Haven's CHILD SA rekey");
    // 4. Haven rekeys the IKE SA.
    m.command("ike-rekey", &["vpn1_1", "ike"])
        .expect("ikemgr IKE rekey");
    wait_for("client sees Haven's IKE SA rekey", WAIT, || {
        let sa = client_sa(charon).ok_or("no IKE SA")?;
        (sa.spis() != ike1)
            .then_some(())
            .ok_or_else(|| format!("{:?}\n{}", sa.spis(), m.logs()))
    });
    check_traffic("Haven's IKE SA rekey");
    assert_eq!(
        replay_failures(charon),
        0,
        "strongSwan dropped ESP packets as replays:\n{}",
        charon.log()
    );
    // Still one IKE SA on the client: every step was done in place.
    let sas = charon.list_sas().unwrap();
    assert_eq!(
        sas.iter().filter(|s| s.name == "dial").count(),
        1,
        "{sas:#?}"
    );
}
