//! Seed 000's FGSP lab, shared by `ha_fgsp_seed000` (test) and `ha_fgsp_bench` (example):
//! four FGSP members (all four daemons each) sharing the `local-gw` loopback
//! 192.168.202.31 behind an ECMP router, DC1_VM4 with `fgsp-sync disable`, a strongSwan
//! dial-up client and a server on the members' inside LAN.
//!
//! ```text
//! client 192.168.1.2 (charon, 10.10.1.2 inside) - cl0 192.168.1.1 router
//!     router m<i> 192.168.12<4+i>.1 ---- port2 192.168.12<4+i>.254 DC1_VM<i> (lo 192.168.202.31/32)
//!     router br-fgsp: port4 172.31.1.<i>/24 of every member (FGSP, UDP 708)
//!     server br0 172.31.0.100/24: port3 172.31.0.1<i>/24 of every member
//! ```
//!
//! The router reaches 192.168.202.31 by ECMP over the members. The client's traffic is
//! steered by a rule (`from 192.168.1.2 lookup 100`) to ECMP over the three members with
//! `fgsp-sync enable` only: DC1_VM4 can neither hold nor take over its tunnel, so an
//! operator keeps synced clients off it. The server's route back to the client's inside
//! network points at the member that carries the tunnel: in a data centre the owner
//! advertises the route it adds; here the lab moves it ([`Lab::route_back_via`]).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus_schema::DaemonKind;
use haven_tests::daemons::wait_for;
use haven_tests::member;
use haven_tests::netns::{veth, Netns, Proc, ScratchDir};
use haven_tests::strongswan::{self, Charon, ChildSa, IkeSa};
use serde_json::Value;

pub const PSK: &str = "haven-fgsp-seed000-psk-0123456789";
pub const FGSP_SECRET: &str = "fgsp-seed000-link-secret";
pub const GW_ID: &str = "gw.haven.test";
pub const CLIENT_ID: &str = "client.haven.test";
pub const LB1: &str = "192.168.202.31";
pub const CLIENT: &str = "192.168.1.2";
pub const CLIENT_INNER: &str = "10.10.1.2";
pub const SERVER: &str = "172.31.0.100";
pub const WAIT: Duration = Duration::from_secs(30);
/// Members: DC1_VM1..DC1_VM4; the last one has `fgsp-sync disable`.
pub const MEMBERS: usize = 4;

/// DPD as seed 000 (`on-idle`), with a 2 s retry interval instead of 60 s.
pub const DPD: &str = "        set dpd on-idle
        set dpd-retryinterval 2
        set dpd-retrycount 3
";

pub fn port2_net(i: usize) -> String {
    format!("192.168.{}", 125 + i)
}

/// Member `i` (0-based)'s outside address, the router's next hop.
pub fn port2_addr(i: usize) -> String {
    format!("{}.254", port2_net(i))
}

pub fn port3_addr(i: usize) -> String {
    format!("172.31.0.{}", 11 + i)
}

pub fn port4_addr(i: usize) -> String {
    format!("172.31.1.{}", i + 1)
}

/// The client's tunnel instance when member `i` (0-based, `group-member-id` `i + 1`)
/// establishes it: FGSP members name a synced dial-up phase1's instances from their member
/// id's class, so DC1_VM1's first is `vpn1_1` (as in seed 000) and DC1_VM2's `vpn1_2`.
pub fn tunnel_of(i: usize) -> String {
    format!("vpn1_{}", i + 1)
}

/// Seed 000's member configuration (standalone-cluster, vpn1 with DPD), for member `i`.
pub fn config(i: usize) -> String {
    config_with(i, "")
}

/// [`config`] with `peer_set` (`set` lines, each ending in a newline) in every
/// `config cluster-peer` entry, such as a longer `hb-lost-threshold`.
pub fn config_with(i: usize, peer_set: &str) -> String {
    let mut peers = String::new();
    for (n, j) in (0..MEMBERS).filter(|j| *j != i).enumerate() {
        peers.push_str(&format!(
            "        edit {}\n            set peerip {}\n{peer_set}        next\n",
            n + 1,
            port4_addr(j)
        ));
    }
    let sync = if i + 1 == MEMBERS {
        "disable"
    } else {
        "enable"
    };
    format!(
        "config system standalone-cluster
    set standalone-group-id 1
    set group-member-id {me}
    set encryption enable
    set psksecret \"{FGSP_SECRET}\"
    config cluster-peer
{peers}    end
end
config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type dynamic
        set interface \"port2\"
        set ike-version 2
        set local-gw {LB1}
        set peertype any
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
{DPD}        set fgsp-sync {sync}
        set nattraversal enable
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
",
        me = i + 1
    )
}

pub struct Member {
    pub i: usize,
    pub ns: Netns,
    pub dir: PathBuf,
    pub run: PathBuf,
    pub procs: Vec<Proc>,
    /// `set` lines for every cluster-peer entry ([`config_with`]).
    pub peer_set: String,
    /// The client's tunnel instance ([`tunnel_of`] the member the router sends it to).
    pub tunnel: String,
}

impl Member {
    pub fn start(ns: Netns, dir: &Path, i: usize, peer_set: &str) -> Member {
        let dir = dir.join(format!("vm{}", i + 1));
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let mut m = Member {
            i,
            ns,
            dir,
            run,
            procs: Vec::new(),
            peer_set: peer_set.to_string(),
            tunnel: String::new(),
        };
        m.spawn();
        m
    }

    pub fn name(&self) -> String {
        format!("DC1_VM{}", self.i + 1)
    }

    /// Writes the configuration and starts the four daemons (logs appended).
    pub fn spawn(&mut self) {
        let conf = self.dir.join("haven.conf");
        std::fs::write(&conf, config_with(self.i, &self.peer_set)).unwrap();
        self.procs = member::spawn_all(&self.ns, &conf, &self.run, &self.dir);
    }

    pub fn log(&self, d: &str) -> String {
        member::read_log(&self.dir, d)
    }

    pub fn logs(&self) -> String {
        member::log_tails(&self.dir, &self.name(), 40)
    }

    pub fn view(&self, daemon: DaemonKind, name: &str) -> Result<Value, String> {
        member::view(&self.run, daemon, name)
    }

    /// FGSP peers hasyncd detects.
    pub fn detected(&self) -> Result<u64, String> {
        let v = self.view(DaemonKind::Hasyncd, "standalone-peers")?;
        v["detected_peers"]
            .as_u64()
            .ok_or_else(|| format!("no detected_peers in {v}"))
    }

    /// hasyncd's role for the tunnel (`sync-primary`, `standby`), if it has one.
    pub fn role(&self) -> Option<String> {
        let v = self.view(DaemonKind::Hasyncd, "roles").ok()?;
        v.get(&self.tunnel)?.as_str().map(str::to_string)
    }

    /// `vpnctl diagnose vpn tunnel list name <tunnel>`'s `role=` for the tunnel, if listed.
    pub fn listed_role(&self) -> Option<String> {
        haven_tests::daemons::listed_role(&self.run, &self.tunnel)
    }

    /// ikemgr's IKE SA of the tunnel: (spi_i, spi_r).
    pub fn ike_sa(&self) -> Option<(u64, u64)> {
        member::ike_spis(&self.run, &self.tunnel)
    }

    /// hasyncd's standby copies of the tunnel: (IKE SA copies, CHILD SA copies).
    pub fn copies(&self) -> Result<(usize, usize), String> {
        member::copies(&self.run, &self.tunnel)
    }

    /// espd's outbound SAs of the tunnel: (spi_out, next sequence number).
    pub fn esp_seqs(&self) -> Vec<(u32, u64)> {
        member::esp_seqs(&self.run, &self.tunnel)
    }

    /// dpdmon's counters: (probes sent, replies, dead peers).
    pub fn dpd_stats(&self) -> Result<(u64, u64, u64), String> {
        let v = self.view(DaemonKind::Dpdmon, "stats")?;
        let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k} in {v}"));
        Ok((n("probes_sent")?, n("probe_replies")?, n("dead_peers")?))
    }

    pub fn kill_all(&mut self) {
        member::kill_all(&mut self.procs);
    }
}

// The member harness shared with the FGCP suites (`haven_tests::member`).
#[allow(unused_imports)]
pub use haven_tests::member::{client_sa, hex_u32, hex_u64, received_seqs, replay_failures, rt};

/// `count` pings from the client's inside address, 0.2 s apart; (sent, answered).
pub fn ping_burst(client: &Netns, count: u32) -> (u32, u32) {
    (
        count,
        member::ping_answered(client, CLIENT_INNER, SERVER, count),
    )
}

/// The whole lab, up to a tunnel that carries ping through one of DC1_VM1..3.
pub struct Lab {
    pub scratch: ScratchDir,
    pub router: Netns,
    pub client: Netns,
    pub server: Netns,
    pub members: Vec<Member>,
    pub charon: Charon,
    pub before: IkeSa,
    pub child_before: ChildSa,
    /// Index of the member the router sends the client to.
    pub owner: usize,
    /// Members still in the client's ECMP route (table 100).
    pub in_ecmp: Vec<usize>,
}

impl Lab {
    pub fn new(tag: &str, label: &str) -> Lab {
        Lab::with_peer_set(tag, label, "")
    }

    /// [`Lab::new`] with `peer_set` in every member's cluster-peer entries ([`config_with`]).
    pub fn with_peer_set(tag: &str, label: &str, peer_set: &str) -> Lab {
        if let Err(e) = strongswan::preflight() {
            panic!("cannot run strongSwan tests on this machine: {e}");
        }
        let scratch = ScratchDir::new(tag).expect("scratch dir");
        let router = Netns::new(&format!("{label}-r")).unwrap();
        let client = Netns::new(&format!("{label}-c")).unwrap();
        let server = Netns::new(&format!("{label}-s")).unwrap();
        veth(&client, "wan0", &router, "cl0").unwrap();
        client.add_addr("wan0", &format!("{CLIENT}/24")).unwrap();
        client.default_route("192.168.1.1").unwrap();
        client
            .add_addr("lo", &format!("{CLIENT_INNER}/32"))
            .unwrap();
        router.add_addr("cl0", "192.168.1.1/24").unwrap();
        router.ip_forward(true).unwrap();
        router.add_bridge("brf").unwrap();
        router.link_up("brf").unwrap();
        server.add_bridge("br0").unwrap();
        server.add_addr("br0", &format!("{SERVER}/24")).unwrap();
        server.link_up("br0").unwrap();
        let mut nss = Vec::new();
        for i in 0..MEMBERS {
            let ns = Netns::new(&format!("{label}-m{}", i + 1)).unwrap();
            veth(&ns, "port2", &router, &format!("m{i}")).unwrap();
            ns.add_addr("port2", &format!("{}/24", port2_addr(i)))
                .unwrap();
            router
                .add_addr(&format!("m{i}"), &format!("{}.1/24", port2_net(i)))
                .unwrap();
            veth(&ns, "port3", &server, &format!("s{i}")).unwrap();
            server.enslave(&format!("s{i}"), "br0").unwrap();
            server.link_up(&format!("s{i}")).unwrap();
            ns.add_addr("port3", &format!("{}/24", port3_addr(i)))
                .unwrap();
            veth(&ns, "port4", &router, &format!("f{i}")).unwrap();
            router.enslave(&format!("f{i}"), "brf").unwrap();
            router.link_up(&format!("f{i}")).unwrap();
            ns.add_addr("port4", &format!("{}/24", port4_addr(i)))
                .unwrap();
            // FortiOS's loopback lb1: the host's `lo` (no dummy module on every host).
            ns.add_addr("lo", &format!("{LB1}/32")).unwrap();
            ns.default_route(&format!("{}.1", port2_net(i))).unwrap();
            ns.ip_forward(true).unwrap();
            nss.push(ns);
        }
        // Every member behind one ECMP route; the client's flows over the synced three.
        let all: Vec<usize> = (0..MEMBERS).collect();
        router
            .ip(&ecmp_args("main", &all))
            .expect("ECMP route to lb1");
        let synced: Vec<usize> = (0..MEMBERS - 1).collect();
        router
            .ip(&ecmp_args("100", &synced))
            .expect("client ECMP route");
        router
            .ip(&[
                "rule", "add", "from", CLIENT, "lookup", "100", "pref", "100",
            ])
            .unwrap();

        let mut members: Vec<Member> = nss
            .into_iter()
            .enumerate()
            .map(|(i, ns)| Member::start(ns, scratch.path(), i, peer_set))
            .collect();
        for m in &members {
            wait_for(&format!("{} detects 3 peers", m.name()), WAIT, || {
                match m.detected()? {
                    3 => Ok(()),
                    n => Err(format!("{n} detected")),
                }
            });
        }
        // The router's choice for the client, so the server's route back can follow.
        let owner = router_choice(&router);
        for m in &mut members {
            m.tunnel = tunnel_of(owner);
        }
        server
            .ip(&[
                "route",
                "replace",
                "10.10.1.0/24",
                "via",
                &port3_addr(owner),
            ])
            .unwrap();

        let charon = member::dial_client(
            &client,
            CLIENT,
            LB1,
            PSK,
            (CLIENT_ID, GW_ID),
            CLIENT_INNER,
            SERVER,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", members[owner].logs()));
        let before = client_sa(&charon).expect("client IKE SA");
        let child_before = before.child("net").expect("client CHILD SA").clone();
        wait_for("the owner's IKE SA", WAIT, || {
            members[owner]
                .ike_sa()
                .filter(|s| *s == before.spis())
                .ok_or_else(|| members[owner].logs())
        });
        wait_for("ping through the owner", WAIT, || {
            let (sent, got) = ping_burst(&client, 1);
            (got > 0)
                .then_some(())
                .ok_or_else(|| format!("{got}/{sent}\n{}", members[owner].logs()))
        });
        Lab {
            scratch,
            router,
            client,
            server,
            members,
            charon,
            before,
            child_before,
            owner,
            in_ecmp: synced,
        }
    }

    /// strongSwan's CHILD SA SPIs now: (in, out).
    pub fn charon_child_spis(&self) -> (u32, u32) {
        let sa = client_sa(&self.charon).expect("client IKE SA");
        let c = sa.child("net").expect("client CHILD SA");
        (c.spi_in, c.spi_out)
    }

    /// The server's route back to the client's inside network via member `i`.
    pub fn route_back_via(&self, i: usize) {
        self.server
            .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(i)])
            .unwrap();
    }

    /// Withdraws member `i` from the client's ECMP route; returns the member the router
    /// now sends the client to.
    pub fn withdraw(&mut self, i: usize) -> usize {
        self.in_ecmp.retain(|j| *j != i);
        self.router
            .ip(&ecmp_args("100", &self.in_ecmp))
            .expect("ECMP route without the member");
        router_choice(&self.router)
    }

    /// Puts member `i` back into the client's ECMP route.
    pub fn restore(&mut self, i: usize) -> usize {
        if !self.in_ecmp.contains(&i) {
            self.in_ecmp.push(i);
            self.in_ecmp.sort_unstable();
        }
        self.router
            .ip(&ecmp_args("100", &self.in_ecmp))
            .expect("ECMP route with the member");
        router_choice(&self.router)
    }
}

/// `ip route replace [table T] 192.168.202.31/32 nexthop via ... nexthop via ...`.
fn ecmp_args(table: &str, members: &[usize]) -> Vec<String> {
    let mut a: Vec<String> = ["route", "replace", "table", table, &format!("{LB1}/32")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in members {
        a.extend(
            ["nexthop", "via", &port2_addr(*i), "dev", &format!("m{i}")]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    a
}

/// The member the router forwards the client's packets to lb1 through.
pub fn router_choice(router: &Netns) -> usize {
    let out = router
        .ip(&["route", "get", LB1, "from", CLIENT, "iif", "cl0"])
        .expect("ip route get");
    (0..MEMBERS)
        .find(|i| out.contains(&format!("via {} ", port2_addr(*i))))
        .unwrap_or_else(|| panic!("router sends the client nowhere known: {out}"))
}
