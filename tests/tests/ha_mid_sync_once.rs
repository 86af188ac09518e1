//! At most one RFC 6311 `IKEV2_MESSAGE_ID_SYNC` per AEAD IKE SA, even when a member
//! takes the SA over from a copy made before the first sync (issue 6 point 6; the
//! `ops/fault-run --ha-link` failure), with strongSwan as the peer.
//!
//! strongSwan derives its AES-GCM IVs from message IDs and cannot encrypt a second
//! response with message ID 0 on one IKE SA ("encrypting encrypted payload failed, no
//! IV"): it destroys the SA, and the tunnel is renegotiated. ike-proto's `mid_sync` module
//! states the rule and ikemgr's `ike::ha` how the cluster keeps it: the sync's mark is
//! leased through hasyncd (acknowledged by every live member) before the sync goes out.
//!
//! The FGCP pair of `ha_failover` (see `ha_common`), no DPD of ours (the gateway sends no
//! request, so a sync is allowed on the AES-GCM SA). gw1's outgoing HA datagrams larger
//! than a heartbeat or a lease (its IKE SA records, snapshots) are dropped by a firewall
//! rule; then gw1's ikemgr is SIGKILLed and restarted: it continues the SA from gw1's local
//! replica and syncs the message IDs with strongSwan (the first sync). gw2's copy of the
//! record stays as it was before that sync. gw1 then dies (all daemons, LAN port down) and
//! gw2 takes over from its stale copy. Asserted: gw2 sends no second sync (its hasyncd
//! holds the sync's mark), strongSwan keeps its IKE and CHILD SAs (same SPIs, no "no IV",
//! no new IKE_SA_INIT), traffic flows through gw2, and a CHILD SA rekey and an IKE SA
//! rekey started by each side complete in place (gw2 continues at the synced IDs).
//!
//! Needs root, iproute2, iptables and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use serde_json::Value;

/// Largest HA datagram let through from gw1 while the copy is being made stale: above a
/// heartbeat and a lease message, below an IKE SA record (keys, identities, CHILD SAs).
const HA_PASS_MAX: u32 = 300;

/// A member's ikemgr message IDs of vpn1_1: (next request, next expected).
fn msg_ids(m: &Member) -> Option<(u64, u64)> {
    let v = m.view(DaemonKind::Ikemgr, "ike-gateways").ok()?;
    let sa = v.as_array()?.iter().find(|s| s["name"] == "vpn1_1")?;
    Some((sa["msg_id_tx"].as_u64()?, sa["msg_id_rx"].as_u64()?))
}

/// gw2's standby copy of the IKE SA with `spis`: (next request, next expected).
fn copy_ids(m: &Member, spis: (u64, u64)) -> Option<(u64, u64)> {
    let v: Value = m.view(DaemonKind::Hasyncd, "replicas").ok()?;
    let s = v["ike_standby"]
        .as_array()?
        .iter()
        .find(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == spis)?
        .clone();
    Some((s["msg_id_send"].as_u64()?, s["msg_id_recv"].as_u64()?))
}

#[test]
fn a_takeover_from_a_copy_older_than_the_sync_does_not_sync_an_aead_sa_again() {
    let Lab {
        scratch: _scratch,
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
    } = Lab::with_heartbeat("ha-mid-sync-once", "hamo", NO_DPD, QUIET_HEARTBEAT);
    let spis = before.spis();
    wait_for("gw2's copy is current", WAIT, || {
        let (ours, copy) = (msg_ids(&m1), copy_ids(&m2, spis));
        (ours.is_some() && ours == copy)
            .then_some(())
            .ok_or_else(|| format!("gw1 {ours:?} copy {copy:?}"))
    });
    let copy_before = copy_ids(&m2, spis).unwrap();
    assert_eq!(copy_before.0, 0, "the gateway sent no request yet");

    // From now on gw1's IKE SA records do not reach gw2; heartbeats and leases still do.
    gw1.run(
        "iptables",
        &[
            "-A",
            "OUTPUT",
            "-o",
            "port4",
            "-p",
            "udp",
            "-m",
            "length",
            "--length",
            &format!("{}:65535", HA_PASS_MAX + 1),
            "-j",
            "DROP",
        ],
    )
    .expect("iptables (is it installed?)");

    // The first sync: gw1's restarted ikemgr continues the SA and syncs with strongSwan.
    let charon_at = charon.log().len();
    let ikemgr1_at = m1.log("ikemgr").len();
    m1.kill9_and_restart("ikemgr");
    wait_for(
        "gw1's restarted ikemgr synced with strongSwan",
        WAIT,
        || {
            m1.log_since("ikemgr", ikemgr1_at)
                .contains("RFC 6311 sync done")
                .then_some(())
                .ok_or_else(|| format!("{}\n{}", m1.logs(), charon.log()))
        },
    );
    let synced = msg_ids(&m1).expect("gw1's IDs");
    assert!(
        charon.log()[charon_at..].contains("MID sync"),
        "strongSwan did not process the first sync:\n{}",
        charon.log()
    );
    assert_eq!(m2.role().as_deref(), Some("secondary"), "heartbeats pass");
    let stale = copy_ids(&m2, spis).expect("gw2's copy");
    eprintln!("message IDs send/recv: gw1 after the sync {synced:?}, gw2's copy {stale:?}");
    assert!(
        stale.0 < synced.0,
        "gw2's copy must predate the sync: {stale:?} vs {synced:?}"
    );

    // gw1 dies; gw2 takes over from the copy made before the sync.
    let charon_at = charon.log().len();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == spis)
            .ok_or_else(|| m2.logs())
    });
    // Traffic, then rekeys from both sides on the taken-over SA.
    let check_traffic = |what: &str| {
        let (sent, got) = ping_burst(&client, 5);
        assert!(
            got >= 3,
            "ping after {what}: {got}/{sent}\n{}\n{}",
            m2.logs(),
            charon.log()
        );
    };
    wait_for("ping through gw2", WAIT, || {
        let (sent, got) = ping_burst(&client, 2);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}", m2.logs()))
    });
    // No second sync reached strongSwan, and gw2 says why it sent none.
    let charon_now = charon.log()[charon_at..].to_string();
    assert!(
        !charon_now.contains("no IV") && !charon_now.contains("MID sync"),
        "strongSwan got a second sync:\n{charon_now}\n{}",
        m2.logs()
    );
    wait_for("gw2 found the cluster's sync mark", WAIT, || {
        m2.log("ikemgr")
            .contains("the cluster recorded an RFC 6311 sync")
            .then_some(())
            .ok_or_else(|| m2.logs())
    });
    let ikemgr2 = m2.log("ikemgr");
    eprintln!(
        "{}",
        ikemgr2
            .lines()
            .find(|l| l.contains("the cluster recorded an RFC 6311 sync"))
            .unwrap_or("(no line)")
    );
    assert!(
        !ikemgr2.contains("IKEV2_MESSAGE_ID_SYNC"),
        "gw2 sent a second sync:\n{ikemgr2}"
    );
    assert_eq!(
        msg_ids(&m2).map(|ids| ids.0),
        Some(synced.0),
        "gw2 continues at the synced request ID"
    );

    m2.command("ike-rekey", &["vpn1_1", "child"])
        .expect("ikemgr CHILD rekey");
    let c1 = wait_for("client sees Haven's CHILD SA rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        if c.spi_in != child_before.spi_in && c.state == "INSTALLED" {
            Ok(c)
        } else {
            Err(format!("{c:?}\n{}\n{}", m2.logs(), charon.log()))
        }
    });
    check_traffic("Haven's CHILD SA rekey");
    charon.rekey_child("net").expect("swanctl --rekey --child");
    wait_for("client CHILD SA rekeyed", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        (c.spi_in != c1.spi_in && c.state == "INSTALLED")
            .then_some(())
            .ok_or_else(|| format!("{c:?}\n{}", m2.logs()))
    });
    check_traffic("strongSwan's CHILD SA rekey");
    let after = client_sa(&charon).expect("client IKE SA");
    assert_eq!(after.spis(), spis, "IKE SA renegotiated");
    m2.command("ike-rekey", &["vpn1_1", "ike"])
        .expect("ikemgr IKE rekey");
    let ike1 = wait_for("client sees Haven's IKE SA rekey", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != spis)
            .then_some(sa.spis())
            .ok_or_else(|| format!("{:?}\n{}", sa.spis(), m2.logs()))
    });
    check_traffic("Haven's IKE SA rekey");
    charon.rekey_ike("dial").expect("swanctl --rekey --ike");
    wait_for("client IKE SA rekeyed again", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        (sa.spis() != ike1)
            .then_some(())
            .ok_or_else(|| format!("{:?}\n{}", sa.spis(), m2.logs()))
    });
    check_traffic("strongSwan's IKE SA rekey");
    let charon_after = charon.log()[charon_at..].to_string();
    assert!(
        !charon_after.contains("no IV"),
        "strongSwan could not encrypt a response:\n{charon_after}"
    );
    assert!(
        !charon_after.contains("IKE_SA_INIT"),
        "strongSwan started a new IKE SA:\n{charon_after}"
    );
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());
    let sas = charon.list_sas().unwrap();
    assert_eq!(
        sas.iter().filter(|s| s.name == "dial").count(),
        1,
        "{sas:#?}"
    );
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
