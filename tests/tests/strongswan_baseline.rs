//! Proves the test harness: namespaces with guaranteed cleanup, and strongSwan-to-strongSwan
//! tunnels through kernel-libipsec between two namespaces.
//!
//! Needs root, iproute2 and the strongSwan packages; on a machine without them every test FAILS
//! with a message naming what is missing (they are never skipped).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use haven_tests::netns::{self, Netns, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, IkeSa, SwanctlConf};

const PSK: &[u8] = b"haven-harness-test-psk-0123456789";
const WAIT: Duration = Duration::from_secs(20);

fn require_netns() {
    if let Err(e) = netns::preflight() {
        panic!("cannot run namespace tests on this machine: {e}");
    }
}

fn require_strongswan() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
}

fn listed(name: &str) -> bool {
    netns::list_namespaces()
        .expect("ip netns list")
        .iter()
        .any(|n| n == name)
}

/// Fails (rather than hangs) unless `child` was killed by SIGKILL within a few seconds.
fn assert_killed(child: &mut std::process::Child, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} was not killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(9), "{what}: {status:?}");
}

fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// One side of the gateway pair: connection `gw`, child `net`.
fn gateway_conf(
    local: &str,
    remote: &str,
    id_l: &str,
    id_r: &str,
    ts_l: &str,
    ts_r: &str,
) -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk("gw", local, remote, PSK)
            .ids(id_l, id_r)
            .proposals(&["aes128gcm16-prfsha256-x25519"])
            .dpd_delay(Duration::from_secs(30))
            .child(ChildCfg::new("net", ts_l, ts_r).esp_proposals(&["aes128gcm16"])),
    )
}

fn start_pair(line: &SiteToSite) -> (Charon, Charon) {
    let mut a = Charon::start(&line.gwa).expect("start charon in gwa");
    let mut b = Charon::start(&line.gwb).expect("start charon in gwb");
    a.load(&gateway_conf(
        SiteToSite::GWA_OUTER,
        SiteToSite::GWB_OUTER,
        "gwa@haven.test",
        "gwb@haven.test",
        SiteToSite::LAN_A,
        SiteToSite::LAN_B,
    ))
    .expect("load gwa");
    b.load(&gateway_conf(
        SiteToSite::GWB_OUTER,
        SiteToSite::GWA_OUTER,
        "gwb@haven.test",
        "gwa@haven.test",
        SiteToSite::LAN_B,
        SiteToSite::LAN_A,
    ))
    .expect("load gwb");
    (a, b)
}

/// Both ends see one IKE SA with the same SPIs and one CHILD SA whose SPIs are crossed.
fn assert_sas_agree(a: &IkeSa, b: &IkeSa) {
    assert_eq!(a.spis(), b.spis(), "IKE SPIs differ:\n{a:#?}\n{b:#?}");
    assert_ne!(a.responder_spi, 0);
    assert!(a.initiator && !b.initiator, "gwa initiated, gwb responded");
    for ike in [a, b] {
        assert_eq!(ike.state, "ESTABLISHED");
        assert_eq!(ike.encr_alg.as_deref(), Some("AES_GCM_16"));
        assert_eq!(ike.encr_keysize, Some(128));
        assert_eq!(ike.prf_alg.as_deref(), Some("PRF_HMAC_SHA2_256"));
        assert_eq!(ike.dh_group.as_deref(), Some("CURVE_25519"));
        assert_eq!(
            ike.get("local-port"),
            Some("4500"),
            "encap = yes floats IKE to 4500"
        );
    }
    assert_eq!(
        (a.local_id.as_str(), b.local_id.as_str()),
        ("gwa@haven.test", "gwb@haven.test")
    );
    let ca = a.child("net").expect("CHILD on gwa");
    let cb = b.child("net").expect("CHILD on gwb");
    assert_eq!(ca.spi_in, cb.spi_out, "gwa inbound = gwb outbound");
    assert_eq!(ca.spi_out, cb.spi_in, "gwa outbound = gwb inbound");
    for c in [ca, cb] {
        assert_eq!(c.state, "INSTALLED");
        assert_eq!(c.encr_alg.as_deref(), Some("AES_GCM_16"));
        assert_eq!(c.encr_keysize, Some(128));
        assert_eq!(c.get("encap"), Some("yes"));
        assert_eq!(c.get("mode"), Some("TUNNEL"));
    }
    assert_eq!(ca.local_ts, [SiteToSite::LAN_A]);
    assert_eq!(ca.remote_ts, [SiteToSite::LAN_B]);
    assert_eq!(cb.local_ts, [SiteToSite::LAN_B]);
}

fn up(a: &Charon, b: &Charon) -> (IkeSa, IkeSa) {
    a.initiate("net", WAIT).expect("initiate net from gwa");
    let ia = a.wait_child_installed("gw", "net", WAIT).expect("gwa SA");
    let ib = b.wait_child_installed("gw", "net", WAIT).expect("gwb SA");
    (ia, ib)
}

#[test]
fn tunnel_carries_ping_sas_agree_and_nothing_remains() {
    require_strongswan();
    let names: Vec<String>;
    let pids: Vec<u32>;
    let dirs: Vec<PathBuf>;
    {
        let line = SiteToSite::new("ssb").expect("topology");
        names = line.all().iter().map(|n| n.name().to_string()).collect();
        // No tunnel yet: the gateways know no route to the far LAN.
        assert!(
            line.client.ping(SiteToSite::SERVER, 1).is_err(),
            "client reached server without a tunnel: the test would prove nothing"
        );
        let (a, b) = start_pair(&line);
        pids = [a.pid(), b.pid()]
            .into_iter()
            .map(|p| p.expect("running"))
            .collect();
        dirs = vec![a.dir().to_path_buf(), b.dir().to_path_buf()];

        let (ia, ib) = up(&a, &b);
        assert_sas_agree(&ia, &ib);

        let before = line.gwa.link_counters("ipsec0").expect("ipsec0 on gwa");
        line.client
            .ping(SiteToSite::SERVER, 3)
            .expect("ping through the tunnel");
        let after = line.gwa.link_counters("ipsec0").expect("ipsec0 on gwa");
        assert!(
            after.tx_packets >= before.tx_packets + 3,
            "{before:?} -> {after:?}"
        );
        assert!(
            after.rx_packets >= before.rx_packets + 3,
            "{before:?} -> {after:?}"
        );
        let child = a.list_sas().expect("list")[0]
            .child("net")
            .cloned()
            .expect("child");
        assert!(child.get_u64("packets-out").unwrap_or(0) >= 3, "{child:?}");

        // Closing the tunnel cuts the path again.
        a.terminate_ike("gw", WAIT).expect("terminate");
        b.wait_sas(WAIT, |sas| sas.is_empty())
            .expect("gwb drops its SAs on DELETE");
        assert!(
            line.client.ping(SiteToSite::SERVER, 1).is_err(),
            "path must close with the SA"
        );
        assert!(
            a.log().contains("IKE_SA gw[1] established"),
            "the line-flushed log shows the exchange: {}",
            a.log()
        );
    }
    for n in &names {
        assert!(!listed(n), "namespace {n} survived the test");
    }
    for pid in pids {
        assert!(!pid_exists(pid), "charon {pid} survived the test");
    }
    for d in dirs {
        assert!(!d.exists(), "{} survived the test", d.display());
    }
}

#[test]
fn killed_initiator_restarts_and_rebuilds_the_tunnel() {
    require_strongswan();
    let line = SiteToSite::new("ssr").expect("topology");
    let (mut a, b) = start_pair(&line);
    let (old, _) = up(&a, &b);
    let old_pid = a.pid().expect("running");

    a.kill().expect("kill");
    assert!(!a.is_running());
    assert!(!pid_exists(old_pid), "SIGKILLed charon was reaped");
    assert!(
        line.gwa.link_counters("ipsec0").is_err(),
        "ipsec0 goes with the daemon"
    );

    a.restart().expect("restart");
    assert!(
        a.list_sas().expect("list").is_empty(),
        "a restarted charon has no SAs"
    );
    let (ia, ib) = up(&a, &b);
    assert_ne!(ia.initiator_spi, old.initiator_spi, "a fresh IKE SA");
    // INITIAL_CONTACT from the restarted side makes gwb drop the stale IKE SA.
    let on_b = b
        .wait_sas(WAIT, |sas| sas.len() == 1)
        .expect("gwb keeps only the new IKE SA");
    assert_eq!(on_b[0].spis(), ib.spis());
    assert_sas_agree(&ia, &ib);
    line.client
        .ping(SiteToSite::SERVER, 2)
        .expect("ping through the new tunnel");
}

#[test]
fn nft_rules_cut_and_restore_the_tunnel() {
    require_strongswan();
    let line = SiteToSite::new("ssn").expect("topology");
    let (a, b) = start_pair(&line);
    up(&a, &b);
    line.client
        .ping(SiteToSite::SERVER, 1)
        .expect("ping through the tunnel");
    // ESP in UDP and IKE share port 4500 after the float: dropping it cuts the tunnel.
    line.gwb
        .nft("table inet cut { chain input { type filter hook input priority 0; udp dport 4500 drop; }; }")
        .expect("nft");
    assert!(
        line.client.ping(SiteToSite::SERVER, 2).is_err(),
        "ESP passed a drop rule"
    );
    line.gwb.nft("flush ruleset").expect("nft flush");
    line.client
        .ping(SiteToSite::SERVER, 1)
        .expect("ping once the rule is gone");
}

#[test]
fn mismatched_psk_is_reported_as_a_failure() {
    require_strongswan();
    let line = SiteToSite::new("ssp").expect("topology");
    let (a, mut b) = start_pair(&line);
    let wrong = SwanctlConf::new().conn(
        Conn::psk(
            "gw",
            SiteToSite::GWB_OUTER,
            SiteToSite::GWA_OUTER,
            b"another-psk-entirely",
        )
        .ids("gwb@haven.test", "gwa@haven.test")
        .child(ChildCfg::new("net", SiteToSite::LAN_B, SiteToSite::LAN_A)),
    );
    b.load(&wrong).expect("load wrong PSK");
    let err = a
        .initiate("net", WAIT)
        .expect_err("initiate must fail with a wrong PSK");
    assert!(err.to_string().contains("initiate failed"), "{err}");
    assert!(b
        .list_sas()
        .expect("list")
        .iter()
        .all(|ike| ike.state != "ESTABLISHED"));
}

#[test]
fn namespace_and_its_processes_are_gone_after_a_panic() {
    require_netns();
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Netns::new("panicky").expect("netns");
        let inner = ns.clone();
        // Not under a guard: only the namespace's own cleanup can kill this one.
        let mut cmd = inner.command("sleep");
        cmd.arg("1000");
        let child = cmd.spawn().expect("spawn sleep");
        let guarded = ns.spawn("sleep", &["1001"]).expect("spawn guarded sleep");
        seen = Some((ns.name().to_string(), child, guarded.id()));
        assert_eq!(ns.pids().expect("pids").len(), 2);
        panic!("deliberate failure inside a test");
    }));
    assert!(result.is_err());
    let (name, mut child, guarded) = seen.expect("ran");
    assert_killed(&mut child, "sleep left in the namespace");
    assert!(!pid_exists(guarded));
    assert!(!listed(&name), "{name} survived the panic");
}

#[test]
fn sweep_removes_namespaces_of_dead_runs() {
    require_netns();
    // A pid that surely belongs to no live process: a child we started and reaped.
    let mut t = Command::new("true").spawn().expect("true");
    let dead = t.id();
    t.wait().expect("reap");
    let name = format!("hv-{dead}-0-stale");
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip");
    assert!(ok.success());
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "1000"])
        .spawn()
        .expect("spawn in stale namespace");
    let dir = PathBuf::from(format!("/tmp/hv-{dead}-0-stale-dir"));
    std::fs::create_dir_all(dir.join("sub")).expect("stale dir");

    // Another test's first Netns::new may sweep it first; either way it must be gone.
    netns::sweep_stale().expect("sweep");
    assert!(!listed(&name), "stale {name} left");
    assert!(!dir.exists(), "stale {} left", dir.display());
    assert_killed(&mut orphan, "process in the stale namespace");
}

#[test]
fn bridges_join_several_hosts() {
    require_netns();
    let sw = Netns::new("switch").expect("netns");
    sw.add_bridge("br0").expect("bridge");
    let hosts: Vec<Netns> = (1..=3)
        .map(|i| Netns::new(&format!("h{i}")).expect("netns"))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let port = format!("p{i}");
        netns::veth(h, "eth0", &sw, &port).expect("veth");
        sw.enslave(&port, "br0").expect("enslave");
        h.add_addr("eth0", &format!("10.99.9.{}/24", i + 1))
            .expect("addr");
    }
    hosts[0]
        .ping("10.99.9.3", 1)
        .expect("h1 -> h3 across the bridge");
    hosts[2]
        .ping("10.99.9.2", 1)
        .expect("h3 -> h2 across the bridge");
}
