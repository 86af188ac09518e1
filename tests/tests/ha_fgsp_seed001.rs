//! FGCP over FGSP (seed 001; issue 6, DESIGN.md §6): two FGCP a-p pairs that are FGSP peers
//! of each other, the tunnel carried by cluster 1's primary with standby copies in cluster 1's
//! secondary (FGCP) and in cluster 2's primary (FGSP, `fgsp-sync enable`).
//!
//! ```text
//! client 192.168.1.2 (charon, 10.10.1.2 inside) - cl0 192.168.1.1 router
//!     router br<k> 192.168.<129+k>.1: port2 of cluster k's members (lb1 192.168.202.35 on the primary)
//!     router brf: port5 172.31.2.<1..4>/24 of every member (FGSP, UDP 708)
//!     member pairs: port4 veth 169.254.<k>.1-2 (FGCP heartbeats and sync)
//!     server br0 172.31.0.100/24: port3 172.31.0.1<i>/24 of every member
//! ```
//!
//! Members: C1A (priority 200) and C1B (100) in FGCP group 1, FGSP member 1; C2A (200) and
//! C2B (100) in group 2, FGSP member 2. The router reaches lb1 on cluster 1's LAN; the
//! server's route back to the client's inside network follows the member carrying the
//! tunnel (the owner advertises it in a data centre; here the test moves it).
//!
//! Asserted, in order:
//! 1. C1A carries the tunnel; C2A holds IKE and CHILD SA copies of it (FGSP).
//! 2. Continuous ping; all of C1A's daemons are killed and its port2 goes down: C1B becomes
//!    primary and carries strongSwan's IKE SA, sends beyond C1A's sequence numbers; the ping
//!    resumes, no renegotiation, no replay failure at strongSwan. C2A's lease marks follow
//!    C1B's leases (they were acknowledged over FGSP before being granted).
//! 3. Continuous ping; C1B's daemons are killed too and the router moves lb1 to cluster 2:
//!    C2A (cluster 2's primary) takes the tunnel over with the same IKE SA, sends beyond
//!    C1B's sequence numbers; the ping resumes, no renegotiation, no replay failure.
//! 4. A CHILD SA rekey and an IKE SA rekey started by strongSwan, then by C2A, complete in
//!    place with traffic after each (the IKE SA is replaced by the rekey, not renegotiated).
//!
//! C1A starts with an HA link epoch an hour ahead of the wall clock (its clock ran ahead):
//! step 2's FGSP acknowledgements of C1B's leases show C2A accepts C1B as the cluster's new
//! voice anyway.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bus_schema::DaemonKind;
use haven_tests::daemons::{vpnctl_json, wait_for};
use haven_tests::member::{self, client_sa, replay_failures};
use haven_tests::netns::{veth, Netns, Proc, ScratchDir};
use haven_tests::strongswan::{self, Charon};
use serde_json::Value;

const PSK: &str = "haven-fgsp-seed001-psk-0123456789";
const FGSP_SECRET: &str = "fgsp-seed001-link-secret";
const GW_ID: &str = "gw.haven.test";
const CLIENT_ID: &str = "client.haven.test";
const LB1: &str = "192.168.202.35";
const CLIENT: &str = "192.168.1.2";
const CLIENT_INNER: &str = "10.10.1.2";
const SERVER: &str = "172.31.0.100";
const TUNNEL: &str = "vpn1_1";
const WAIT: Duration = Duration::from_secs(30);
const NAMES: [&str; 4] = ["C1A", "C1B", "C2A", "C2B"];

/// Cluster (0 or 1) of member `i`.
fn cluster(i: usize) -> usize {
    i / 2
}

fn port5_addr(i: usize) -> String {
    format!("172.31.2.{}", i + 1)
}

fn port3_addr(i: usize) -> String {
    format!("172.31.0.{}", 11 + i)
}

/// Seed 001's member configuration: FGCP pair `group-id` k+1 (200/100), FGSP member k+1
/// whose peers are the other cluster's members.
fn config(i: usize, knobs: &Knobs) -> String {
    let k = cluster(i);
    let mut peers = String::new();
    for (n, j) in (0..4).filter(|j| cluster(*j) != k).enumerate() {
        peers.push_str(&format!(
            "        edit {}\n            set peerip {}\n        next\n",
            n + 1,
            port5_addr(j)
        ));
    }
    let priority = if i % 2 == 0 { 200 } else { 100 };
    format!(
        "config system ha
    set group-id {g}
    set group-name \"DC2_VM{g}\"
    set mode a-p
    set password \"seed001-pair-{g}-password\"
    set hbdev \"port4\" 50
    set session-pickup enable
    set override disable
    set priority {priority}
    set hb-interval 2
    set hb-lost-threshold {fgcp_lost}
end
config system standalone-cluster
    set standalone-group-id 1
    set group-member-id {g}
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
{dpd}        set fgsp-sync enable
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
        g = k + 1,
        dpd = knobs.dpd,
        fgcp_lost = knobs.fgcp_lost_threshold,
    )
}

struct Member {
    i: usize,
    ns: Netns,
    dir: PathBuf,
    run: PathBuf,
    procs: Vec<Proc>,
}

impl Member {
    fn start(ns: Netns, dir: &Path, i: usize, knobs: &Knobs) -> Member {
        let dir = dir.join(NAMES[i]);
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let conf = dir.join("haven.conf");
        std::fs::write(&conf, config(i, knobs)).unwrap();
        if i == 0 {
            // C1A's clock runs an hour ahead of C1B's, as its HA link epoch file records
            // (hasyncd takes every epoch above it). After the failover C1B must still be
            // heard on the FGSP link under the cluster's member id, so its epoch must be
            // above C1A's, which its own clock is not.
            let ahead = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                + 3_600_000;
            std::fs::write(run.join("ha-link-epoch"), format!("{ahead}\n")).unwrap();
        }
        let procs = member::spawn_all(&ns, &conf, &run, &dir);
        Member {
            i,
            ns,
            dir,
            run,
            procs,
        }
    }

    fn name(&self) -> &'static str {
        NAMES[self.i]
    }

    fn log(&self, d: &str) -> String {
        member::read_log(&self.dir, d)
    }

    fn logs(&self) -> String {
        member::log_tails(&self.dir, self.name(), 30)
    }

    fn view(&self, daemon: DaemonKind, name: &str) -> Result<Value, String> {
        member::view(&self.run, daemon, name)
    }

    fn ikemgr_command(&self, args: &[&str]) -> Result<(), String> {
        member::ikemgr_command(&self.run, "ike-rekey", args).map(|_| ())
    }

    /// FGCP role (`primary`, `secondary`).
    fn role(&self) -> Option<String> {
        vpnctl_json(&self.run, &["diagnose", "sys", "ha", "status"])
            .ok()?
            .get("role")?
            .as_str()
            .map(str::to_string)
    }

    fn detected(&self) -> u64 {
        self.view(DaemonKind::Hasyncd, "standalone-peers")
            .ok()
            .and_then(|v| v["detected_peers"].as_u64())
            .unwrap_or(0)
    }

    /// ikemgr's IKE SA of the tunnel: (spi_i, spi_r).
    fn ike_sa(&self) -> Option<(u64, u64)> {
        member::ike_spis(&self.run, TUNNEL)
    }

    /// hasyncd's standby copies of the tunnel: (IKE SA copies, CHILD SA copies).
    fn copies(&self) -> Result<(usize, usize), String> {
        member::copies(&self.run, TUNNEL)
    }

    /// espd's outbound SAs of the tunnel: (spi_out, next sequence number).
    fn esp_seqs(&self) -> Vec<(u32, u64)> {
        member::esp_seqs(&self.run, TUNNEL)
    }

    /// Reboot: every daemon killed, the LAN port down.
    fn kill_all(&mut self) {
        member::kill_all(&mut self.procs);
        let _ = self.ns.ip(&["link", "set", "port2", "down"]);
    }
}

fn ping_burst(client: &Netns, count: u32) -> u32 {
    member::ping_answered(client, CLIENT_INNER, SERVER, count)
}

/// Seed 001's lab, up: the tunnel carried by C1A, its copies in C1B (FGCP) and C2A (FGSP).
struct Seed001 {
    _scratch: ScratchDir,
    router: Netns,
    client: Netns,
    server: Netns,
    members: Vec<Member>,
    charon: Charon,
    /// strongSwan's IKE SA (spi_i, spi_r) and CHILD SA (spi_in, spi_out) at the start.
    spis: (u64, u64),
    child: (u32, u32),
}

/// Builds seed 001's topology (namespaces named `<prefix>-…`, files in scratch dir `name`),
/// starts the four members and the client, and waits for the tunnel and its copies.
fn seed001(name: &str, prefix: &str) -> Seed001 {
    seed001_with(name, prefix, &Knobs::DEFAULT)
}

/// What a scenario changes in the members' configuration.
struct Knobs {
    /// The phase1's DPD lines.
    dpd: &'static str,
    /// `config system ha` `hb-lost-threshold` (heartbeats every 200 ms).
    fgcp_lost_threshold: u8,
}

impl Knobs {
    /// DPD off; an FGCP failover (600 ms) faster than the FGSP loss time (1.2 s).
    const DEFAULT: Knobs = Knobs {
        dpd: DPD_OFF,
        fgcp_lost_threshold: 3,
    };
}

/// The phase1's DPD lines: off (the lab's default), or on when idle every 2 s, 3 retries.
const DPD_OFF: &str = "        set dpd disable\n";
const DPD_ON_IDLE: &str =
    "        set dpd on-idle\n        set dpd-retryinterval 2\n        set dpd-retrycount 3\n";

/// [`seed001`] with other [`Knobs`].
fn seed001_with(name: &str, prefix: &str, knobs: &Knobs) -> Seed001 {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
    let scratch = ScratchDir::new(name).expect("scratch dir");
    let router = Netns::new(&format!("{prefix}-r")).unwrap();
    let client = Netns::new(&format!("{prefix}-c")).unwrap();
    let server = Netns::new(&format!("{prefix}-s")).unwrap();
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
    for k in 0..2 {
        let br = format!("br{k}");
        router.add_bridge(&br).unwrap();
        router
            .add_addr(&br, &format!("192.168.{}.1/24", 129 + k))
            .unwrap();
        router.link_up(&br).unwrap();
    }
    server.add_bridge("br0").unwrap();
    server.add_addr("br0", &format!("{SERVER}/24")).unwrap();
    server.link_up("br0").unwrap();
    let mut nss = Vec::new();
    for i in 0..4 {
        let k = cluster(i);
        let ns = Netns::new(&format!("{prefix}-m{}", i + 1)).unwrap();
        veth(&ns, "port2", &router, &format!("m{i}")).unwrap();
        router.enslave(&format!("m{i}"), &format!("br{k}")).unwrap();
        router.link_up(&format!("m{i}")).unwrap();
        // A host-scoped address of its own keeps port2's routes when the shared one goes.
        ns.ip(&[
            "addr",
            "add",
            &format!("192.168.200.{}/32", i + 1),
            "dev",
            "port2",
            "scope",
            "host",
        ])
        .unwrap();
        let net = format!("192.168.{}", 129 + k);
        ns.ip(&["route", "replace", &format!("{net}.0/24"), "dev", "port2"])
            .unwrap();
        ns.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &format!("{net}.1"),
            "dev",
            "port2",
            "onlink",
        ])
        .unwrap();
        veth(&ns, "port3", &server, &format!("s{i}")).unwrap();
        server.enslave(&format!("s{i}"), "br0").unwrap();
        server.link_up(&format!("s{i}")).unwrap();
        ns.add_addr("port3", &format!("{}/24", port3_addr(i)))
            .unwrap();
        veth(&ns, "port5", &router, &format!("f{i}")).unwrap();
        router.enslave(&format!("f{i}"), "brf").unwrap();
        router.link_up(&format!("f{i}")).unwrap();
        ns.add_addr("port5", &format!("{}/24", port5_addr(i)))
            .unwrap();
        ns.ip_forward(true).unwrap();
        for key in ["all", "default", "port2"] {
            ns.sysctl(&format!("net.ipv4.conf.{key}.send_redirects"), "0")
                .unwrap();
        }
        nss.push(ns);
    }
    for k in 0..2 {
        veth(&nss[2 * k], "port4", &nss[2 * k + 1], "port4").unwrap();
        for j in 0..2 {
            nss[2 * k + j]
                .add_addr("port4", &format!("169.254.{}.{}/24", k + 1, j + 1))
                .unwrap();
        }
    }
    // lb1 lives on cluster 1's LAN (the member holding it answers ARP).
    router
        .ip(&["route", "replace", &format!("{LB1}/32"), "dev", "br0"])
        .unwrap();
    server
        .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(0)])
        .unwrap();

    // Each cluster's primary first, then its secondary (a loaded machine starting all
    // sixteen daemons at once can miss heartbeats and split a pair for a moment).
    let mut slots: Vec<Option<Member>> = (0..4).map(|_| None).collect();
    for order in [[0, 2], [1, 3]] {
        for i in order {
            slots[i] = Some(Member::start(nss[i].clone(), scratch.path(), i, knobs));
        }
        for i in order {
            let m = slots[i].as_ref().expect("started above");
            let want = if i % 2 == 0 { "primary" } else { "secondary" };
            wait_for(&format!("{} {want}", m.name()), WAIT, || match m.role() {
                Some(r) if r == want => Ok(()),
                other => Err(format!("{other:?}\n{}", m.logs())),
            });
        }
    }
    let members: Vec<Member> = slots.into_iter().flatten().collect();
    for i in [0, 2] {
        let m = &members[i];
        wait_for(&format!("{} detects its FGSP peer", m.name()), WAIT, || {
            (m.detected() == 1).then_some(()).ok_or_else(|| m.logs())
        });
    }

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
    .unwrap_or_else(|e| panic!("{e}\n{}", members[0].logs()));
    let before = client_sa(&charon).expect("client IKE SA");
    let spis = before.spis();
    let child_before = before.child("net").expect("client CHILD SA").clone();
    wait_for("C1A's IKE SA", WAIT, || {
        members[0]
            .ike_sa()
            .filter(|s| *s == spis)
            .ok_or_else(|| members[0].logs())
    });
    wait_for("ping through C1A", WAIT, || {
        (ping_burst(&client, 1) > 0)
            .then_some(())
            .ok_or_else(|| members[0].logs())
    });

    // 1. Copies: C1B over FGCP, C2A over FGSP.
    for i in [1, 2] {
        let m = &members[i];
        wait_for(&format!("{}'s standby copies", m.name()), WAIT, || {
            let (ike, child) = m.copies()?;
            (ike == 1 && child >= 1)
                .then_some(())
                .ok_or_else(|| format!("ike {ike} child {child}\n{}", m.logs()))
        });
        assert!(m.ike_sa().is_none(), "{} must not carry it", m.name());
    }

    Seed001 {
        _scratch: scratch,
        router,
        client,
        server,
        members,
        charon,
        spis,
        child: (child_before.spi_in, child_before.spi_out),
    }
}

/// strongSwan kept its IKE and CHILD SAs (no renegotiation) and dropped nothing as a replay.
fn check_client(charon: &Charon, spis: (u64, u64), child: (u32, u32), step: &str) {
    let after = client_sa(charon).unwrap_or_else(|| panic!("{step}: client IKE SA gone"));
    assert_eq!(after.spis(), spis, "{step}: IKE SA renegotiated");
    let c = after.child("net").expect("client CHILD SA");
    assert_eq!(
        (c.spi_in, c.spi_out),
        child,
        "{step}: CHILD SA renegotiated"
    );
    assert_eq!(
        replay_failures(charon),
        0,
        "{step}: strongSwan dropped ESP packets as replays:\n{}",
        charon.log()
    );
}

#[test]
fn fgcp_clusters_as_fgsp_peers_hand_the_tunnel_over_without_renegotiation() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001("ha-fgsp-seed001", "fgsp1");

    // 2. C1A reboots: its FGCP partner C1B takes over.
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    std::thread::sleep(Duration::from_secs(2));
    let seq_a = members[0].esp_seqs();
    let killed = Instant::now();
    members[0].kill_all();
    server
        .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(1)])
        .unwrap();
    {
        let m = &members[1];
        wait_primary(m);
        wait_carries(m, spis);
    }
    let primary_after = killed.elapsed();
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    let seq_b = members[1].esp_seqs();
    eprintln!(
        "FGCP: C1B primary {} ms after the kill; {} of 200 answered; longest gap {gap} pings (~{} ms); seqs C1A {seq_a:?} C1B {seq_b:?}",
        primary_after.as_millis(),
        seqs.len(),
        gap * 50
    );
    assert_resumed(&seqs, 150, &out, &members[1]);
    for (spi, a) in &seq_a {
        if let Some((_, b)) = seq_b.iter().find(|(s, _)| s == spi) {
            assert!(b > a, "C1B must send beyond C1A ({spi:08x}: {b} <= {a})");
        }
    }
    check_client(&charon, spis, child, "after C1A's reboot");
    assert!(
        members[2].detected() == 1,
        "C2A must still see cluster 1 (C1B speaks for it now)"
    );
    // C1B's leases reached C2A before they were granted: the FGSP table logs them.
    wait_for("C1B's leases acknowledged by C2A", WAIT, || {
        members[1]
            .log("hasyncd")
            .contains("FGSP: member 2 acknowledged vpn1_1")
            .then_some(())
            .ok_or_else(|| members[1].logs())
    });

    // 3. The whole of cluster 1 goes: cluster 2's primary C2A takes over.
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 300, "0.05", "1");
    std::thread::sleep(Duration::from_secs(2));
    let seq_b = members[1].esp_seqs();
    let killed = Instant::now();
    members[1].kill_all();
    move_lb1_to_cluster2(&router, &server, 2);
    {
        let m = &members[2];
        wait_carries(m, spis);
        assert!(
            m.log("hasyncd")
                .contains("FGSP: taking over vpn1_1 from member 1"),
            "{}",
            m.logs()
        );
    }
    let taken = killed.elapsed();
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    let seq_c = members[2].esp_seqs();
    eprintln!(
        "FGSP: C2A carries the tunnel {} ms after cluster 1 went; {} of 300 answered; longest gap {gap} pings (~{} ms); seqs C1B {seq_b:?} C2A {seq_c:?}",
        taken.as_millis(),
        seqs.len(),
        gap * 50
    );
    assert_resumed(&seqs, 250, &out, &members[2]);
    for (spi, b) in &seq_b {
        if let Some((_, c)) = seq_c.iter().find(|(s, _)| s == spi) {
            assert!(c > b, "C2A must send beyond C1B ({spi:08x}: {c} <= {b})");
        }
    }
    check_client(&charon, spis, child, "after cluster 1 went");

    // 4. Rekeys on the taken-over tunnel, from each side.
    let rekeys: [(&str, bool, bool); 4] = [
        ("strongSwan CHILD", true, false),
        ("strongSwan IKE", true, true),
        ("C2A CHILD", false, false),
        ("C2A IKE", false, true),
    ];
    for (what, by_client, ike) in rekeys {
        let sa0 = client_sa(&charon).expect("client IKE SA");
        let child0 = sa0.child("net").expect("CHILD SA").spi_in;
        if by_client {
            if ike {
                charon.rekey_ike("dial").expect("swanctl --rekey --ike");
            } else {
                charon.rekey_child("net").expect("swanctl --rekey --child");
            }
        } else {
            members[2]
                .ikemgr_command(&[TUNNEL, if ike { "ike" } else { "child" }])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        wait_for(&format!("{what} rekey"), WAIT, || {
            let sa = client_sa(&charon).ok_or("no IKE SA")?;
            let done = if ike {
                // Rekeyed in place: new IKE SPIs, the CHILD SA kept (a renegotiation
                // would have replaced it too).
                sa.spis() != sa0.spis() && sa.child("net").is_some_and(|c| c.spi_in == child0)
            } else {
                sa.child("net").is_some_and(|c| c.spi_in != child0)
            };
            done.then_some(())
                .ok_or_else(|| format!("{sa:?}\n{}", members[2].logs()))
        });
        assert!(
            ping_burst(&client, 3) >= 2,
            "{what}: no traffic after the rekey\n{}",
            members[2].logs()
        );
        assert_eq!(replay_failures(&charon), 0, "{what}: {}", charon.log());
    }
    assert!(
        !charon.log().contains("INVALID_SYNTAX") && !charon.log().contains("AUTHENTICATION_FAILED"),
        "{}",
        charon.log()
    );
    for m in &mut members {
        m.kill_all();
    }
}

/// The router moves lb1 to cluster 2 while cluster 1 is alive (seed 001's per-tunnel
/// failover, FGSP's own case): C2A, cluster 2's primary, takes the tunnel over when its
/// traffic arrives, and cluster 1's primary C1A, which still carried it, drops it at once
/// (the tunnel is `standby` there now) instead of sending on the same SAs until a DPD gives
/// up, and keeps C2A's copies for the way back. No renegotiation, no replay failure, and a
/// CHILD SA rekey started by strongSwan completes through C2A.
#[test]
fn a_cluster_whose_tunnel_another_cluster_took_drops_it_and_keeps_the_copies() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001("ha-fgsp-seed001-move", "fgsp2");
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    std::thread::sleep(Duration::from_secs(2));
    let seq_a = members[0].esp_seqs();
    assert!(!seq_a.is_empty(), "C1A sends:\n{}", members[0].logs());
    let moved = Instant::now();
    move_lb1_to_cluster2(&router, &server, 2);
    wait_carries(&members[2], spis);
    let taken = moved.elapsed();
    wait_dropped("C1A drops the tunnel C2A took", &members[0], &members[2]);
    let dropped = moved.elapsed();
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    let seq_c = members[2].esp_seqs();
    eprintln!(
        "router move: C2A carries the tunnel {} ms after the move, C1A dropped it after {} ms; {} of 200 answered; longest gap {gap} pings; seqs C1A {seq_a:?} C2A {seq_c:?}",
        taken.as_millis(),
        dropped.as_millis(),
        seqs.len()
    );
    assert_resumed(&seqs, 150, &out, &members[2]);
    for (spi, a) in &seq_a {
        if let Some((_, c)) = seq_c.iter().find(|(s, _)| s == spi) {
            assert!(c > a, "C2A must send beyond C1A ({spi:08x}: {c} <= {a})");
        }
    }
    assert!(
        members[0]
            .log("ikemgr")
            .contains("another member carries the tunnel now; dropped here"),
        "{}",
        members[0].logs()
    );
    // C1A keeps C2A's copies (the tunnel can come back to cluster 1).
    wait_for("C1A's copies of C2A's tunnel", WAIT, || {
        let (ike, child) = members[0].copies()?;
        (ike == 1 && child >= 1)
            .then_some(())
            .ok_or_else(|| format!("ike {ike} child {child}\n{}", members[0].logs()))
    });
    check_client(&charon, spis, child, "after the router moved the tunnel");

    let child0 = client_sa(&charon)
        .and_then(|sa| sa.child("net").map(|c| c.spi_in))
        .expect("CHILD SA");
    charon.rekey_child("net").expect("swanctl --rekey --child");
    wait_for("strongSwan's CHILD SA rekey through C2A", WAIT, || {
        client_sa(&charon)
            .and_then(|sa| sa.child("net").map(|c| c.spi_in))
            .filter(|spi| *spi != child0)
            .map(|_| ())
            .ok_or_else(|| members[2].logs())
    });
    assert!(
        ping_burst(&client, 3) >= 2,
        "no traffic after the rekey\n{}",
        members[2].logs()
    );
    let sa = client_sa(&charon).expect("client IKE SA");
    assert_eq!(sa.spis(), spis, "IKE SA renegotiated");
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());
    // C1A did not take the tunnel back meanwhile.
    assert!(members[0].ike_sa().is_none(), "{}", members[0].logs());
    for m in &mut members {
        m.kill_all();
    }
}

/// Cuts the FGSP link between the clusters (cluster 2's FGSP ports go down at the router)
/// until C2A, no longer hearing cluster 1, has taken the tunnel as its successor, then
/// heals it. C1A, which never stopped carrying the tunnel, keeps it (a claim made only
/// because a cluster fell silent is no proof the tunnel moved), and the traffic still goes
/// through it.
fn cut_until_c2a_takes_over(router: &Netns, client: &Netns, members: &[Member], spis: (u64, u64)) {
    for f in ["f2", "f3"] {
        router.ip(&["link", "set", f, "down"]).unwrap();
    }
    // C2A takes the tunnel as cluster 1's successor.
    wait_carries(&members[2], spis);
    for f in ["f2", "f3"] {
        router.ip(&["link", "set", f, "up"]).unwrap();
    }
    for i in [0, 2] {
        let m = &members[i];
        wait_for(
            &format!("{} hears its FGSP peer again", m.name()),
            WAIT,
            || (m.detected() == 1).then_some(()).ok_or_else(|| m.logs()),
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(members[0].ike_sa(), Some(spis), "{}", members[0].logs());
    assert!(
        ping_burst(client, 3) >= 2,
        "no traffic through C1A after the cut\n{}",
        members[0].logs()
    );
}

/// The FGSP link between the clusters is cut while cluster 1 carries the tunnel, and C2A
/// takes it as successor ([`cut_until_c2a_takes_over`]). Then the router moves lb1 to
/// cluster 2: the traffic reaches the SAs C2A already installed, C2A tells cluster 1 it
/// carries the tunnel now, and C1A drops it at once (DPD is off: nothing else would ever
/// make it let go). C2A's RFC 6311 sync, whose answer went to C1A, was not sent again
/// (strongSwan destroys an AEAD IKE SA asked twice): a CHILD SA rekey from each side
/// completes through C2A. No renegotiation, no replay failure.
#[test]
fn a_tunnel_taken_as_successor_during_a_cut_moves_for_good_when_its_traffic_follows() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001("ha-fgsp-seed001-cut", "fgsp3");
    cut_until_c2a_takes_over(&router, &client, &members, spis);
    let seq_a = members[0].esp_seqs();

    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    let moved = Instant::now();
    move_lb1_to_cluster2(&router, &server, 2);
    wait_dropped(
        "C1A drops the tunnel C2A carries now",
        &members[0],
        &members[2],
    );
    let dropped = moved.elapsed();
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    let seq_c = members[2].esp_seqs();
    eprintln!(
        "after the cut: C1A dropped the tunnel {} ms after the move; {} of 200 answered; longest gap {gap} pings; seqs C1A {seq_a:?} C2A {seq_c:?}",
        dropped.as_millis(),
        seqs.len()
    );
    assert_resumed(&seqs, 150, &out, &members[2]);
    assert!(
        members[2]
            .log("hasyncd")
            .contains("arrived at this member's SAs: it carries the tunnel"),
        "{}",
        members[2].logs()
    );
    assert!(
        members[2]
            .log("ikemgr")
            .contains("RFC 6311 sync unanswered"),
        "{}",
        members[2].logs()
    );
    check_client(&charon, spis, child, "after the router moved the tunnel");
    assert_eq!(members[2].ike_sa(), Some(spis), "{}", members[2].logs());
    // C2A continues at the message IDs it announced: a CHILD SA rekey from each side.
    rekey_child_by(&charon, &members[2]);
    let child0 = client_sa(&charon)
        .and_then(|sa| sa.child("net").map(|c| c.spi_in))
        .expect("CHILD SA");
    charon.rekey_child("net").expect("swanctl --rekey --child");
    wait_for("strongSwan's CHILD SA rekey through C2A", WAIT, || {
        client_sa(&charon)
            .and_then(|sa| sa.child("net").map(|c| c.spi_in))
            .filter(|spi| *spi != child0)
            .map(|_| ())
            .ok_or_else(|| members[2].logs())
    });
    assert!(
        ping_burst(&client, 3) >= 2,
        "no traffic through C2A after the rekeys\n{}",
        members[2].logs()
    );
    let sa = client_sa(&charon).expect("client IKE SA");
    assert_eq!(sa.spis(), spis, "IKE SA renegotiated");
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());
    for m in &mut members {
        m.kill_all();
    }
}

/// As above, but C1A, still carrying the tunnel after the cut, rekeys its CHILD SA before
/// anything moves. C2A's RFC 6311 sync, answered to C1A, moved strongSwan's message IDs:
/// C1A continues at C2A's (its later copy), so the rekey is answered. The new SA needs a
/// sequence lease, and the FGSP table gave the tunnel to C2A: cluster 1 claims it back as
/// carrier, C2A drops its takeover, and the traffic goes on through C1A's new SA. Then the
/// router moves lb1: C2A takes the tunnel over on its traffic and C1A drops it. No
/// renegotiation, no replay failure.
#[test]
fn after_a_cut_the_carrier_rekeys_and_claims_its_tunnel_back() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child: _,
    } = seed001("ha-fgsp-seed001-cut-rekey", "fgsp4");
    cut_until_c2a_takes_over(&router, &client, &members, spis);
    rekey_child_by(&charon, &members[0]);
    wait_dropped("C2A drops its takeover", &members[2], &members[0]);
    assert!(
        ping_burst(&client, 5) >= 4,
        "no traffic through C1A after its rekey\n{}",
        members[0].logs()
    );
    assert!(
        members[0]
            .log("hasyncd")
            .contains("as successor only (generation"),
        "{}",
        members[0].logs()
    );
    let child = client_sa(&charon)
        .and_then(|sa| sa.child("net").map(|c| (c.spi_in, c.spi_out)))
        .expect("client CHILD SA");
    check_client(&charon, spis, child, "after C1A's rekey");

    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    let moved = Instant::now();
    move_lb1_to_cluster2(&router, &server, 2);
    wait_carries(&members[2], spis);
    wait_dropped("C1A drops the tunnel", &members[0], &members[2]);
    let dropped = moved.elapsed();
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    eprintln!(
        "after the carrier's rekey: C1A dropped the tunnel {} ms after the move; {} of 200 answered; longest gap {gap} pings",
        dropped.as_millis(),
        seqs.len()
    );
    assert_resumed(&seqs, 150, &out, &members[2]);
    check_client(&charon, spis, child, "after the router moved the tunnel");
    for m in &mut members {
        m.kill_all();
    }
}

/// As the cut-link scenarios above, with DPD on (on-idle, 2 s x 3). The successor C2A gets
/// no traffic, and strongSwan answers its probes to lb1, so to C1A: C2A's DPD declares
/// the peer dead and flushes its takeover (without a word to the peer). That flush must
/// not take the tunnel from C1A, which carries it: C1A keeps the IKE SA, the traffic goes
/// on, and a CHILD SA rekey from C1A is answered (it continues after the message IDs C2A's
/// sync and probes used). No renegotiation, no replay failure.
#[test]
fn a_successors_dpd_flush_leaves_the_carrier_its_tunnel() {
    let Seed001 {
        _scratch,
        router,
        client,
        // Kept: the server's namespace goes with it.
        server: _server,
        mut members,
        charon,
        spis,
        child: _,
    } = seed001_with(
        "ha-fgsp-seed001-cut-dpd",
        "fgsp5",
        &Knobs {
            dpd: DPD_ON_IDLE,
            ..Knobs::DEFAULT
        },
    );
    cut_until_c2a_takes_over(&router, &client, &members, spis);
    wait_dropped("C2A's DPD flushes its takeover", &members[2], &members[0]);
    assert!(
        members[2].log("dpdmon").contains("peer is dead after"),
        "{}",
        members[2].logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(members[0].ike_sa(), Some(spis), "{}", members[0].logs());
    assert!(
        ping_burst(&client, 5) >= 4,
        "no traffic through C1A after C2A's flush\n{}",
        members[0].logs()
    );
    rekey_child_by(&charon, &members[0]);
    assert!(
        ping_burst(&client, 5) >= 4,
        "no traffic through C1A after its rekey\n{}",
        members[0].logs()
    );
    let child = client_sa(&charon)
        .and_then(|sa| sa.child("net").map(|c| (c.spi_in, c.spi_out)))
        .expect("client CHILD SA");
    check_client(
        &charon,
        spis,
        child,
        "after C2A's DPD flush and C1A's rekey",
    );
    for m in &mut members {
        m.kill_all();
    }
}

/// C1A reboots and C1B takes over as cluster 1's primary and FGSP speaker, but nothing C1B
/// sends on the FGSP link reaches C2A (dropped on its way out). C1B has not heard C2A
/// yet when it takes over; C1A's heartbeats announced C2A, so C1B's first sequence leases,
/// and the mark that reserves its RFC 6311 sync, wait for C2A's acknowledgement: C1B sends
/// neither ESP nor a sync that C2A has not recorded. C2A loses cluster 1 meanwhile and
/// takes the tunnel as successor. Then C1B goes too and the router moves lb1: the tunnel
/// goes on through C2A, with no renegotiation and no replay at strongSwan. (Before, C1B
/// granted both at once, having heard no FGSP peer: it synced the message IDs, C2A synced
/// them again, and strongSwan destroyed the AEAD IKE SA.)
#[test]
fn a_new_cluster_primary_sends_nothing_its_fgsp_peer_has_not_recorded() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001("ha-fgsp-seed001-first-lease", "fgsp6");
    members[1]
        .ns
        .nft("table inet fgspcut { chain out { type filter hook output priority 0; udp dport 708 drop; }; }")
        .unwrap();
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 120, "0.05", "1");
    std::thread::sleep(Duration::from_secs(1));
    members[0].kill_all();
    server
        .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(1)])
        .unwrap();
    {
        let m = &members[1];
        wait_primary(m);
        wait_carries(m, spis);
    }
    // The server's answers reach C1B for a while (C2A loses cluster 1 meanwhile).
    std::thread::sleep(Duration::from_millis(1_500));
    let seq_b = members[1].esp_seqs();
    members[1].kill_all();
    move_lb1_to_cluster2(&router, &server, 2);
    wait_carries(&members[2], spis);
    let (seqs, _, out) = member::finish_ping(&mut ping);
    assert_resumed(&seqs, 100, &out, &members[2]);
    assert!(
        ping_burst(&client, 5) >= 4,
        "no traffic through C2A\n{}",
        members[2].logs()
    );
    eprintln!(
        "first lease: C1B's outbound SAs {seq_b:?}, C2A's {:?}; {} of 120 answered",
        members[2].esp_seqs(),
        seqs.len()
    );
    check_client(
        &charon,
        spis,
        child,
        "after C1B, cut from C2A, and then cluster 1 went",
    );
    for m in &mut members {
        m.kill_all();
    }
}

/// C2A, cluster 2's primary, reboots while cluster 1 carries the tunnel: C2B becomes cluster
/// 2's primary and speaks for it on the FGSP link under a new epoch. C1A sends C2B a
/// snapshot then (as to an FGSP peer that restarted), so C2B holds copies of the tunnel
/// within moments, not only once cluster 1 next changes something. Then the whole of
/// cluster 1 goes and the router moves lb1: C2B takes the tunnel over, with no
/// renegotiation and no replay at strongSwan. (Before, C2B held no copy: the tunnel was
/// lost.)
#[test]
fn a_clusters_new_primary_gets_the_copies_of_the_other_clusters_tunnels() {
    let Seed001 {
        _scratch,
        router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001("ha-fgsp-seed001-c2-failover", "fgsp7");
    members[2].kill_all();
    {
        let m = &members[3];
        wait_primary(m);
        wait_for("C2B holds copies of cluster 1's tunnel", WAIT, || {
            match m.copies() {
                Ok((1, c)) if c >= 1 => Ok(()),
                other => Err(format!("{other:?}\n{}\n{}", m.logs(), members[0].logs())),
            }
        });
    }
    assert!(
        members[0]
            .log("hasyncd")
            .contains("speaks under a new epoch"),
        "{}",
        members[0].logs()
    );
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    std::thread::sleep(Duration::from_secs(1));
    members[0].kill_all();
    members[1].kill_all();
    move_lb1_to_cluster2(&router, &server, 3);
    wait_carries(&members[3], spis);
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    eprintln!(
        "C2B carries the tunnel; {} of 200 answered; longest gap {gap} pings; seqs C2B {:?}",
        seqs.len(),
        members[3].esp_seqs()
    );
    assert_resumed(&seqs, 150, &out, &members[3]);
    check_client(&charon, spis, child, "after C2A and then cluster 1 went");
    for m in &mut members {
        m.kill_all();
    }
}

/// Cluster 1's FGCP failover (200 ms x 10 = 2 s) is slower than the FGSP loss time (1.2 s;
/// the configuration check warns about it). When C1A reboots, C2A declares cluster 1 lost
/// first and takes the tunnel as its successor. Then C1B becomes primary and takes the
/// tunnel over from its FGCP copy, and the traffic, still routed to cluster 1, reaches C1B.
/// C1B's first lease claims the tunnel back from C2A, which took it only as successor, and
/// C2A drops its takeover. C2A synced the AEAD IKE SA's message IDs (RFC 6311) when it took
/// it: C1B gets C2A's mark and gives up the sync it reserved (strongSwan deletes an AEAD IKE
/// SA asked twice, as it did before). The ping resumes through C1B, with no renegotiation
/// and no replay at strongSwan, and a CHILD SA rekey from C1B is answered at C2A's IDs.
#[test]
fn an_fgcp_failover_slower_than_the_fgsp_loss_time_keeps_the_tunnel_in_its_cluster() {
    let Seed001 {
        _scratch,
        router: _router,
        client,
        server,
        mut members,
        charon,
        spis,
        child,
    } = seed001_with(
        "ha-fgsp-seed001-slow-fgcp",
        "fgsp8",
        &Knobs {
            fgcp_lost_threshold: 10,
            ..Knobs::DEFAULT
        },
    );
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 200, "0.05", "1");
    std::thread::sleep(Duration::from_secs(1));
    members[0].kill_all();
    server
        .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(1)])
        .unwrap();
    // C2A loses cluster 1 first and takes the tunnel as its successor.
    wait_carries(&members[2], spis);
    {
        let m = &members[1];
        wait_primary(m);
        wait_carries(m, spis);
    }
    wait_dropped("C2A drops its takeover", &members[2], &members[1]);
    let (seqs, gap, out) = member::finish_ping(&mut ping);
    eprintln!(
        "slow FGCP failover: {} of 200 answered; longest gap {gap} pings; seqs C1B {:?}",
        seqs.len(),
        members[1].esp_seqs()
    );
    assert_resumed(&seqs, 150, &out, &members[1]);
    assert_eq!(members[1].ike_sa(), Some(spis), "{}", members[1].logs());
    check_client(&charon, spis, child, "after C1A's slow failover");
    rekey_child_by(&charon, &members[1]);
    assert!(
        ping_burst(&client, 5) >= 4,
        "no traffic through C1B after its rekey\n{}",
        members[1].logs()
    );
    let child = client_sa(&charon)
        .and_then(|sa| sa.child("net").map(|c| (c.spi_in, c.spi_out)))
        .expect("client CHILD SA");
    check_client(&charon, spis, child, "after C1B's CHILD SA rekey");
    for m in &mut members {
        m.kill_all();
    }
}

/// The router sends lb1 to cluster 2's LAN, and the server's route back to the client's
/// inside network follows member `i` of cluster 2 (its primary).
fn move_lb1_to_cluster2(router: &Netns, server: &Netns, i: usize) {
    router
        .ip(&["route", "replace", &format!("{LB1}/32"), "dev", "br1"])
        .unwrap();
    server
        .ip(&["route", "replace", "10.10.1.0/24", "via", &port3_addr(i)])
        .unwrap();
}

/// Asserts that the continuous ping was answered again from ping `from` on (through `m`,
/// whose logs go with a failure).
fn assert_resumed(seqs: &[u64], from: u64, out: &str, m: &Member) {
    assert!(
        seqs.iter().any(|s| *s >= from),
        "the ping did not resume through {}:\n{out}\n{}",
        m.name(),
        m.logs()
    );
}

/// Waits until `m` is its FGCP cluster's primary.
fn wait_primary(m: &Member) {
    wait_for(&format!("{} primary", m.name()), WAIT, || match m.role() {
        Some(r) if r == "primary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m.logs())),
    });
}

/// Waits until `m`'s ikemgr holds the tunnel's IKE SA with SPIs `spis`.
fn wait_carries(m: &Member, spis: (u64, u64)) {
    wait_for(&format!("{} carries the IKE SA", m.name()), WAIT, || {
        m.ike_sa()
            .filter(|s| *s == spis)
            .map(|_| ())
            .ok_or_else(|| m.logs())
    });
}

/// Waits until `m` holds neither the tunnel's IKE SA nor an outbound SA of it (`other`'s
/// logs go with a failure too).
fn wait_dropped(what: &str, m: &Member, other: &Member) {
    wait_for(what, WAIT, || {
        (m.ike_sa().is_none() && m.esp_seqs().is_empty())
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "IKE SA {:?}, ESP {:?}\n{}\n{}",
                    m.ike_sa(),
                    m.esp_seqs(),
                    m.logs(),
                    other.logs()
                )
            })
    });
}

/// `member` rekeys the tunnel's CHILD SA (`ike-rekey <tunnel> child`); waits until
/// strongSwan has the new one.
fn rekey_child_by(charon: &Charon, member: &Member) {
    let child0 = client_sa(charon)
        .and_then(|sa| sa.child("net").map(|c| c.spi_in))
        .expect("client CHILD SA");
    member
        .ikemgr_command(&[TUNNEL, "child"])
        .unwrap_or_else(|e| panic!("{}: ike-rekey: {e}", member.name()));
    wait_for(
        &format!("{}'s CHILD SA rekey at strongSwan", member.name()),
        WAIT,
        || {
            client_sa(charon)
                .and_then(|sa| sa.child("net").map(|c| c.spi_in))
                .filter(|spi| *spi != child0)
                .map(|_| ())
                .ok_or_else(|| format!("{}\n{}", member.logs(), charon.log()))
        },
    );
}
