//! An RFC 6311 sync mark the primary's hasyncd lost is given back by its partner, so the
//! AEAD IKE SA is not synced a second time (issue 8's `--ha-link` fault run, thirteenth
//! session: strongSwan dropped all four tunnels).
//!
//! strongSwan cannot answer a second `IKEV2_MESSAGE_ID_SYNC` on an AES-GCM IKE SA ("no
//! IV") and destroys the SA. The cluster keeps one sync per SA by recording its mark in the
//! tunnel table of every member before the sync goes out; a restarted ikemgr that finds the
//! mark does not sync again. In the fault run the mark was recorded by a member that synced
//! during a split brain, and the primary never got it; here the primary loses it the
//! simplest way: its hasyncd restarts (its new table has only what the partner sends, and
//! the partner restated only tunnels it owns).
//!
//! The FGCP pair of `ha_failover` (see `ha_common`), no DPD of ours, a slow heartbeat so
//! that nothing fails over. gw1's ikemgr is SIGKILLed and restarted: it continues the SA
//! and syncs (the first sync; the mark is recorded on both members). gw1's hasyncd is
//! SIGKILLed and restarted: it becomes primary again with a table that lacks the mark and
//! sends gw2 its snapshot; gw2 sends back the mark the snapshot lacks. gw1's ikemgr is
//! restarted again. Asserted: gw1's hasyncd hands the mark to its ikemgr, the restarted
//! ikemgr finds it (`the cluster recorded an RFC 6311 sync`) and sends no sync, strongSwan
//! keeps its IKE SA (same SPIs, no "no IV", no new IKE_SA_INIT) and traffic flows.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::schema::ike_mid_mark_spi;
use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::member;

#[test]
fn a_sync_mark_the_primary_lost_comes_back_and_the_sa_is_not_synced_again() {
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
        child_before: _,
    } = Lab::with_heartbeat("ha-mid-sync-mark", "hamk", NO_DPD, QUIET_HEARTBEAT);
    let spis = before.spis();

    // The first sync: gw1's restarted ikemgr continues the SA and syncs with strongSwan.
    let charon_at = charon.log().len();
    let ikemgr_at = m1.log("ikemgr").len();
    m1.kill9_and_restart("ikemgr");
    wait_for(
        "gw1's restarted ikemgr synced with strongSwan",
        WAIT,
        || {
            (m1.log_since("ikemgr", ikemgr_at)
                .contains("RFC 6311 sync done")
                && charon.log()[charon_at..].contains("MID sync"))
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", m1.logs(), charon.log()))
        },
    );

    // gw1's hasyncd restarts: primary again, its snapshot goes to gw2.
    let hasyncd_at = m1.log("hasyncd").len();
    m1.kill9_and_restart("hasyncd");
    wait_for(
        "gw1's new hasyncd primary, its snapshot taken by gw2",
        WAIT,
        || {
            let sent = m1
                .log_since("hasyncd", hasyncd_at)
                .lines()
                .any(|l| l.contains("fgcp: snapshot to member") && l.contains("acknowledged"));
            match (sent, m1.role(), m2.role()) {
                (true, Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
                other => Err(format!("{other:?}\n{}", m1.logs())),
            }
        },
    );

    // gw1's hasyncd holds the mark again, and hands it to a restarted ikemgr.
    let mark = ike_mid_mark_spi(spis.0, spis.1);
    wait_for("gw1's hasyncd holds the sync mark again", WAIT, || {
        let v = member::command(&m1.run, DaemonKind::Hasyncd, "ike-restore", &[])?;
        v["marks"]
            .as_array()
            .is_some_and(|a| {
                a.iter().any(|m| {
                    m["spi_out"].as_u64() == Some(u64::from(mark))
                        && m["seq_hw"].as_u64().is_some_and(|h| h > 0)
                })
            })
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "{v}\ngw1 replicas: {:?}\ngw1 ikemgr: {:?}",
                    m1.view(DaemonKind::Hasyncd, "replicas"),
                    m1.view(DaemonKind::Ikemgr, "ike-gateways")
                )
            })
    });
    let charon_at = charon.log().len();
    let ikemgr_at = m1.log("ikemgr").len();
    m1.kill9_and_restart("ikemgr");
    wait_for(
        "gw1's restarted ikemgr found the cluster's sync",
        WAIT,
        || {
            m1.log_since("ikemgr", ikemgr_at)
                .contains("the cluster recorded an RFC 6311 sync")
                .then_some(())
                .ok_or_else(|| format!("{}\n{}", m1.logs(), charon.log()))
        },
    );
    wait_for("ping through gw1", WAIT, || {
        let (sent, got) = ping_burst(&client, 3);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}\n{}", m1.logs(), charon.log()))
    });
    let ikemgr_after = m1.log("ikemgr")[ikemgr_at..].to_string();
    assert!(
        !ikemgr_after.contains("IKEV2_MESSAGE_ID_SYNC"),
        "gw1 sent a second sync:\n{ikemgr_after}"
    );
    let charon_after = charon.log()[charon_at..].to_string();
    assert!(
        !charon_after.contains("no IV") && !charon_after.contains("MID sync"),
        "strongSwan got a second sync:\n{charon_after}"
    );
    assert!(
        !charon_after.contains("IKE_SA_INIT"),
        "strongSwan started a new IKE SA:\n{charon_after}"
    );
    let after = client_sa(&charon).expect("client IKE SA");
    assert_eq!(after.spis(), spis, "IKE SA renegotiated");
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
