//! `kill -9 ikemgr` on the member that carries the tunnel (issue 6 point 8, DESIGN.md
//! §3.3): the restarted ikemgr continues its IKE SA from the local hasyncd replica, the
//! tunnel never goes down, and the next rekeys work.
//!
//! The FGCP pair of `ha_failover` (see `ha_common`): gw1 primary carries a strongSwan
//! dial-up tunnel with a continuous ping through it. Only gw1's ikemgr is killed with
//! SIGKILL and started again at once (as supervisord or systemd would). Asserted: the new
//! ikemgr carries the IKE SA with strongSwan's SPIs and the same CHILD SA and confirms the
//! message IDs with strongSwan (RFC 6311 MESSAGE_ID_SYNC); espd neither
//! removed nor installed an SA (it kept its SAs and outbound sequence numbers, which go on
//! rising); every ping was answered; strongSwan's IKE and CHILD SA kept their SPIs, it
//! logged no replay failure and no new IKE_SA_INIT; the secondary still holds the standby
//! copy; then a CHILD SA rekey and an IKE SA rekey started by strongSwan and by Haven
//! complete in place on the restored SA (message IDs continued where they were).
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use std::time::Duration;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::member;

/// Pings sent during the restart (one per 50 ms).
const PINGS: u64 = 120;

#[test]
fn kill_9_ikemgr_on_the_primary_keeps_the_tunnel_and_its_rekeys() {
    let Lab {
        scratch: _scratch,
        router: _router,
        client,
        server: _server,
        gw1: _gw1,
        gw2: _gw2,
        mut m1,
        m2,
        mut charon,
        before,
        child_before,
    } = Lab::with_heartbeat("ha-ikemgr-restart", "hair", NO_DPD, QUIET_HEARTBEAT);

    // The local replica is current, and the secondary holds its standby copy.
    let gw1_hasyncd_at = m1.log("hasyncd").len();
    let sa_before = m1.ike_sa().expect("gw1's IKE SA");
    wait_for("gw2's standby IKE SA", WAIT, || {
        let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
        let ok = v["ike_standby"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
        });
        ok.then_some(()).ok_or_else(|| v.to_string())
    });

    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), PINGS, "0.05", "2");
    std::thread::sleep(Duration::from_secs(1));
    let seq_old = m1.esp_seqs();
    let espd_log_at = m1.log("espd").len();
    let charon_log_at = charon.log().len();
    let ikemgr_log_at = m1.log("ikemgr").len();
    m1.kill9_and_restart("ikemgr");

    // The restarted ikemgr carries the same IKE SA and CHILD SA.
    wait_for("gw1's restarted ikemgr carries the IKE SA", WAIT, || {
        if !m1
            .log_since("ikemgr", ikemgr_log_at)
            .contains("started pid=")
        {
            return Err("not restarted yet".to_string());
        }
        m1.ike_sa()
            .filter(|sa| *sa == sa_before)
            .ok_or_else(|| format!("{:?} (before {sa_before:?})\n{}", m1.ike_sa(), m1.logs()))
    });

    // The restored SA asks strongSwan to confirm the message IDs (RFC 6311; this SA has
    // not sent a request yet, so its AES-GCM responses cannot reuse an IV).
    wait_for("RFC 6311 sync after the restart", WAIT, || {
        m1.log_since("ikemgr", ikemgr_log_at)
            .contains("RFC 6311 sync done")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", m1.logs(), charon.log()))
    });

    let (seqs, _, out) = member::finish_ping(&mut ping);
    let espd_after = m1.log("espd")[espd_log_at..].to_string();
    let ikemgr_after = m1.log("ikemgr")[ikemgr_log_at..].to_string();
    eprintln!(
        "ikemgr restart: {} of {PINGS} pings answered; restored: {}",
        seqs.len(),
        ikemgr_after
            .lines()
            .find(|l| l.contains("continued from the local hasyncd replica"))
            .unwrap_or("(no line)")
    );
    assert!(
        ikemgr_after.contains("restart: continued from the local hasyncd replica"),
        "{ikemgr_after}"
    );
    // espd kept its SAs as they were: nothing removed, nothing (re)installed.
    for word in ["removed", "installed", "replaced"] {
        assert!(
            !espd_after
                .lines()
                .any(|l| l.contains("SA ") && l.contains(word)),
            "espd {word} an SA during the ikemgr restart:\n{espd_after}"
        );
    }
    assert!(
        !m1.log("hasyncd")[gw1_hasyncd_at..].contains("lost (no heartbeat)"),
        "the members lost each other's heartbeats (machine overloaded?): not an ikemgr restart\n{}",
        m1.logs()
    );
    assert_eq!(
        seqs.len() as u64,
        PINGS,
        "pings lost while ikemgr restarted:\n{out}\n{}",
        m1.logs()
    );
    let seq_new = m1.esp_seqs();
    eprintln!("outbound sequence numbers: before the kill {seq_old:?}, after {seq_new:?}");
    assert!(!seq_old.is_empty());
    for (spi, next_old) in &seq_old {
        let next_new = seq_new
            .iter()
            .find(|(s, _)| s == spi)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("espd lost the outbound SA {spi:08x}: {seq_new:?}"));
        assert!(
            next_new > *next_old,
            "espd's outbound sequence of {spi:08x} went from {next_old} to {next_new}"
        );
    }

    // strongSwan noticed nothing.
    let after = client_sa(&charon).expect("client IKE SA after the restart");
    assert_eq!(after.spis(), before.spis(), "IKE SA renegotiated");
    let child_after = after.child("net").expect("client CHILD SA").clone();
    assert_eq!(
        (child_after.spi_in, child_after.spi_out),
        (child_before.spi_in, child_before.spi_out),
        "CHILD SA renegotiated"
    );
    let charon_after = charon.log()[charon_log_at..].to_string();
    assert!(
        !charon_after.contains("IKE_SA_INIT"),
        "strongSwan started a new IKE SA:\n{charon_after}"
    );
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());
    // The secondary still holds the copy (the restored SA was published again).
    wait_for("gw2's standby copy after the restart", WAIT, || {
        let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
        let ok = v["ike_standby"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
        });
        ok.then_some(()).ok_or_else(|| v.to_string())
    });

    // Rekeys on the restored SA, from each side.
    rekey_from_both_sides(&charon, &client, &m1, "gw1", &before, &child_before);
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
