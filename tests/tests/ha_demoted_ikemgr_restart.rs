//! `kill -9 ikemgr` on a demoted FGCP member (issue 6 points 2 and 8): after a takeover the
//! old primary is a live secondary whose copies of the tunnel's SAs are standby, held by
//! its hasyncd. Its restarted ikemgr must get none of them back (hasyncd's `ike-restore`
//! hands over only what the member carries), so it never continues the IKE SA, never sends
//! anything to the peer (a second RFC 6311 sync or ESP from a stale outbound counter would
//! break the new carrier's tunnel), while the new primary's tunnel keeps working and rekeys.
//!
//! The FGCP pair of `ha_failover` (see `ha_common`): gw1 (priority 200) primary carries a
//! strongSwan dial-up tunnel. gw1's ikemgr is SIGKILLed and left down, so its hasyncd still
//! holds the IKE SA as gw1's own (nothing deleted it). gw2 is given priority 250 (a
//! per-member key, kept by the configuration sync) and reloaded: the HA ages are within the
//! uptime margin, so priority decides and gw2 takes the tunnel over while gw1 keeps running
//! as secondary. Then gw1's ikemgr is started again, with a capture on gw1's port2.
//! Asserted: gw1's hasyncd handed 0 IKE SAs back (and held some back) and still holds the
//! standby copy; gw1's ikemgr carries no vpn1_1 and started no RFC 6311 sync; the capture
//! holds no IKE or ESP packet from gw1 to the client; pings through gw2 are answered;
//! strongSwan kept its SPIs and saw no replay failure and no new IKE_SA_INIT; then CHILD and
//! IKE SA rekeys from each side complete on gw2.
//!
//! The reload that raised gw2's priority also showed that an election run by a reload
//! applied in place did not bring the shared addresses up on the new primary (hasyncd
//! `Cluster::drive` compared the role with itself); fixed with this test.
//!
//! Needs root, iproute2, tcpdump and the strongSwan packages (INTEROP.md).

mod ha_common;

use std::path::Path;
use std::time::Duration;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::{vpnctl, wait_for};
use haven_tests::member;
use haven_tests::netns::{Netns, Proc};

/// The client's outer address (ha_common's topology).
const CLIENT_OUTER: &str = "192.168.7.2";

/// tcpdump on `ns`'s port2 writing `pcap`, once its file header is written.
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
                "port2",
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

/// The captured packets to the client that are IKE (UDP 500/4500) or ESP, as tcpdump
/// prints them.
fn sent_to_client(ns: &Netns, pcap: &Path) -> Vec<String> {
    let filter = format!("dst host {CLIENT_OUTER} and (udp port 500 or udp port 4500 or esp)");
    ns.run(
        "tcpdump",
        &["-n", "-r", pcap.to_str().expect("utf-8 path"), &filter],
    )
    .unwrap_or_default()
    .lines()
    .map(str::to_string)
    .collect()
}

#[test]
fn a_demoted_members_restarted_ikemgr_takes_nothing_back_and_stays_silent() {
    // Slow heartbeat: the takeover here is the election's, not a loss.
    let Lab {
        scratch,
        router: _router,
        client,
        server: _server,
        gw1,
        gw2: _gw2,
        mut m1,
        m2,
        mut charon,
        before,
        child_before,
    } = Lab::with_heartbeat("ha-demoted-ikemgr", "hadi", NO_DPD, QUIET_HEARTBEAT);

    // gw1's ikemgr dies (SIGKILL, not restarted yet) while it carries the tunnel: its
    // hasyncd still holds the IKE SA as gw1's own. Then gw2 wins the election by priority
    // (a per-member key: the sync keeps it) and takes the tunnel over while gw1 is alive.
    let (ikemgr_i, ikemgr_port) = member::daemon_index("ikemgr").expect("ikemgr");
    let _ = m1.procs[ikemgr_i].kill_now();
    let conf2 = m2.dir.join("haven.conf");
    std::fs::write(&conf2, config_hb(250, NO_DPD, QUIET_HEARTBEAT)).unwrap();
    let out = vpnctl(&m2.run, &["config", "reload"]);
    assert!(out.status.success(), "gw2 reload: {out:?}");
    wait_for("gw2 primary, gw1 secondary", WAIT, || {
        match (m1.role(), m2.role()) {
            (Some(a), Some(b)) if a == "secondary" && b == "primary" => Ok(()),
            other => Err(format!("{other:?}\n{}\n{}", m1.logs(), m2.logs())),
        }
    });
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.spis())
            .ok_or_else(|| m2.logs())
    });
    wait_for("ping through gw2", WAIT, || {
        let (sent, got) = ping_burst(&client, 3);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}", m2.logs()))
    });
    wait_for("gw1 holds the standby copy", WAIT, || {
        let v = m1.view(DaemonKind::Hasyncd, "replicas")?;
        v["ike_standby"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
            })
            .then_some(())
            .ok_or_else(|| format!("{v}\n{}", m1.logs()))
    });
    assert_eq!(m1.role().as_deref(), Some("secondary"), "gw1 is alive");

    // gw1's ikemgr comes back (as supervisord or systemd would start it), captured on
    // gw1's LAN port.
    let pcap = scratch.path().join("gw1-port2.pcap");
    let mut cap = capture(&gw1, &pcap);
    let hasyncd_at = m1.log("hasyncd").len();
    let ikemgr_at = m1.log("ikemgr").len();
    let charon_at = charon.log().len();
    let conf1 = m1.dir.join("haven.conf");
    m1.procs[ikemgr_i] =
        member::spawn_daemon(&m1.ns, "ikemgr", ikemgr_port, &conf1, &m1.run, &m1.dir);
    let restored = wait_for("gw1's hasyncd answered the restarted ikemgr", WAIT, || {
        m1.log_since("hasyncd", hasyncd_at)
            .lines()
            .find(|l| l.contains("local replica to the restarted ikemgr"))
            .map(str::to_string)
            .ok_or_else(|| m1.logs())
    });
    eprintln!("gw1 hasyncd: {restored}");
    assert!(
        restored.contains(": 0 IKE SAs, 0 CHILD SAs"),
        "the demoted member handed SAs back: {restored}"
    );
    // The killed ikemgr never dropped its SAs: hasyncd held them back.
    assert!(
        !restored.contains("(0 and 0 held back"),
        "nothing was held back, so nothing was tested: {restored}"
    );
    wait_for("gw1's restarted ikemgr runs", WAIT, || {
        m1.log_since("ikemgr", ikemgr_at)
            .contains("started pid=")
            .then_some(())
            .ok_or_else(|| m1.logs())
    });
    // The new carrier keeps the tunnel while gw1's ikemgr settles (a continued SA would
    // have sent its RFC 6311 sync by now).
    for _ in 0..3 {
        let (sent, got) = ping_burst(&client, 5);
        assert!(got >= 3, "ping through gw2: {got}/{sent}\n{}", m2.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = cap.stop(Duration::from_secs(5));
    let sent = sent_to_client(&gw1, &pcap);
    assert!(
        sent.is_empty(),
        "the demoted gw1 sent to the client after its ikemgr restart:\n{}\n{}",
        sent.join("\n"),
        m1.logs()
    );
    assert!(
        m1.ike_sa().is_none(),
        "gw1's restarted ikemgr carries vpn1_1: {:?}\n{}",
        m1.ike_sa(),
        m1.logs()
    );
    let ikemgr_after = m1.log("ikemgr")[ikemgr_at..].to_string();
    assert!(
        !ikemgr_after.contains("RFC 6311"),
        "the demoted member's ikemgr started an RFC 6311 sync:\n{ikemgr_after}"
    );
    assert_eq!(m1.role().as_deref(), Some("secondary"));
    assert_eq!(m2.role().as_deref(), Some("primary"));
    // Still the standby copy on gw1 (hasyncd kept it).
    let v = m1.view(DaemonKind::Hasyncd, "replicas").unwrap();
    assert!(
        v["ike_standby"].as_array().is_some_and(|a| a
            .iter()
            .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())),
        "{v}"
    );

    // strongSwan noticed nothing of gw1's restart.
    let after = client_sa(&charon).expect("client IKE SA");
    assert_eq!(after.spis(), before.spis(), "IKE SA renegotiated");
    let charon_after = charon.log()[charon_at..].to_string();
    assert!(
        !charon_after.contains("IKE_SA_INIT"),
        "strongSwan started a new IKE SA:\n{charon_after}"
    );
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());

    // The new primary's tunnel rekeys in place, from each side.
    rekey_from_both_sides(&charon, &client, &m2, "gw2", &before, &child_before);
    drop(m1);
    drop(m2);
    let _ = charon.kill();
}
