//! RFC 6311 message ID synchronisation after a takeover from a stale copy (issue 6 point
//! 6), with strongSwan as the peer.
//!
//! The FGCP pair of `ha_failover` (see `ha_common`) with DPD `on-idle` every second, so the
//! primary gw1 sends liveness checks while the tunnel is idle, and an AES-CBC IKE suite
//! (see [`PHASE1`]). The copy on gw2 is made
//! stale on purpose: gw1's outgoing HA datagrams larger than a heartbeat (its IKE SA
//! records) are dropped by a firewall rule while heartbeats and lease messages pass, then
//! gw1 runs liveness checks that strongSwan answers: gw2's copy of our next message ID is
//! behind what strongSwan has already seen. gw1 dies (all daemons, LAN port down) and gw2
//! takes over. Without RFC 6311 gw2's next request would reuse an ID strongSwan answered
//! already and the SA would stall; asserted: both sides announced support, gw2 sends
//! `IKEV2_MESSAGE_ID_SYNC`, strongSwan adopts it (its log: `responder requested MID
//! sync`), the IKE and CHILD SAs keep their SPIs, traffic flows, and a CHILD SA rekey and an
//! IKE SA rekey started by each side complete in place.
//!
//! Needs root, iproute2, iptables and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use serde_json::Value;

/// Phase1 lines: DPD on idle, and a CBC suite. With an AEAD suite Haven does not ask for
/// a sync once it has sent a request on the SA (strongSwan builds AEAD IVs from message
/// IDs and would have to reuse one for a second response with ID 0; ike-proto's
/// `MidSyncStart::AeadIvReuse`).
const PHASE1: &str = "        set dpd on-idle
        set dpd-retryinterval 1
        set dpd-retrycount 5
        set proposal aes256-sha256
";

/// `hb-interval` 200 ms, `hb-lost-threshold` 10: the pair must not fail over by accident
/// (a loaded machine) while the copy is being made stale.
const STEADY_HEARTBEAT: (u32, u32) = (2, 10);

/// Largest HA datagram let through from gw1 while the copy is being made stale: above a
/// heartbeat and a lease message, below an IKE SA record (keys, identities, CHILD SAs).
const HA_PASS_MAX: u32 = 300;

/// gw1's ikemgr message IDs of vpn1_1: (next request, next expected).
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

fn probes_sent(m: &Member) -> u64 {
    m.view(DaemonKind::Dpdmon, "stats")
        .ok()
        .and_then(|v| v["probes_sent"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_takeover_from_a_stale_copy_resyncs_message_ids_with_strongswan() {
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
    } = Lab::with_heartbeat("ha-mid-sync", "hams", PHASE1, STEADY_HEARTBEAT);
    let spis = before.spis();

    // The copy is current first.
    wait_for("gw2's copy is current", WAIT, || {
        let (ours, copy) = (msg_ids(&m1), copy_ids(&m2, spis));
        (ours.is_some() && ours == copy)
            .then_some(())
            .ok_or_else(|| format!("gw1 {ours:?} copy {copy:?}"))
    });
    let (copy_send, _) = copy_ids(&m2, spis).unwrap();

    // From now on gw1's IKE SA records do not reach gw2; heartbeats still do.
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
    // gw1 probes the idle tunnel; strongSwan answers each check.
    let probes = probes_sent(&m1);
    wait_for("gw1 runs liveness checks the copy misses", WAIT, || {
        let ours = msg_ids(&m1).ok_or("no IKE SA on gw1")?;
        if ours.0 >= copy_send + 2 && probes_sent(&m1) >= probes + 2 {
            Ok(())
        } else {
            Err(format!("gw1 {ours:?}, copy {:?}", copy_ids(&m2, spis)))
        }
    });
    assert_eq!(m2.role().as_deref(), Some("secondary"), "heartbeats pass");
    let stale = copy_ids(&m2, spis).expect("copy");
    let real = msg_ids(&m1).expect("gw1's IDs");
    eprintln!("message IDs send/recv: gw1 {real:?}, gw2's copy {stale:?}");
    assert!(
        stale.0 < real.0,
        "the copy must be behind: {stale:?} vs {real:?}"
    );

    // gw1 dies; gw2 takes over from the stale copy.
    let charon_at = charon.log().len();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == spis)
            .ok_or_else(|| m2.logs())
    });
    wait_for("gw2 synced the message IDs with strongSwan", WAIT, || {
        let l = m2.log("ikemgr");
        if l.contains("RFC 6311 sync done") {
            Ok(())
        } else {
            Err(format!("{}\n{}", m2.logs(), charon.log()))
        }
    });
    let ikemgr2 = m2.log("ikemgr");
    eprintln!(
        "{}\n{}",
        ikemgr2
            .lines()
            .find(|l| l.contains("sending IKEV2_MESSAGE_ID_SYNC"))
            .unwrap_or("(no request line)"),
        ikemgr2
            .lines()
            .find(|l| l.contains("RFC 6311 sync done"))
            .unwrap_or("(no result line)")
    );
    let synced = msg_ids(&m2).expect("gw2's IDs");
    assert!(
        synced.0 > real.0 - 1,
        "gw2 must send above every ID strongSwan saw: {synced:?} vs gw1's {real:?}"
    );
    let charon_after = charon.log()[charon_at..].to_string();
    assert!(
        charon_after.contains("MID sync"),
        "strongSwan did not process the sync:\n{charon_after}"
    );

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
    assert!(
        !charon.log()[charon_at..].contains("IKE_SA_INIT"),
        "strongSwan started a new IKE SA:\n{}",
        charon.log()
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

/// Phase1 lines for [`the_peers_requests_the_copy_missed_are_caught_up_by_the_sync`]: no
/// DPD of ours (strongSwan runs the checks), a CBC suite.
const PHASE1_NO_DPD: &str = "        set dpd disable
        set proposal aes256-sha256
";

#[test]
fn the_peers_requests_the_copy_missed_are_caught_up_by_the_sync() {
    // The other direction: strongSwan runs liveness checks every second that gw1 answers
    // while its records do not reach gw2, so gw2's copy expects an older request ID than
    // strongSwan will send next. The sync's answer (strongSwan's P2) brings gw2 up to date:
    // strongSwan's next checks are answered by gw2 (without it they would be dropped as
    // out of window).
    let Lab {
        scratch: _scratch,
        router: _router,
        client: _client,
        server: _server,
        gw1,
        gw2: _gw2,
        mut m1,
        m2,
        mut charon,
        before,
        child_before: _,
    } = Lab::with_options(
        "ha-mid-sync-peer",
        "hamp",
        PHASE1_NO_DPD,
        STEADY_HEARTBEAT,
        Some(std::time::Duration::from_secs(1)),
    );
    let spis = before.spis();
    wait_for("gw2's copy is current", WAIT, || {
        let (ours, copy) = (msg_ids(&m1), copy_ids(&m2, spis));
        (ours.is_some() && ours == copy)
            .then_some(())
            .ok_or_else(|| format!("gw1 {ours:?} copy {copy:?}"))
    });
    let (_, copy_recv) = copy_ids(&m2, spis).unwrap();
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
    wait_for("strongSwan's checks the copy misses", WAIT, || {
        let ours = msg_ids(&m1).ok_or("no IKE SA on gw1")?;
        (ours.1 >= copy_recv + 2)
            .then_some(())
            .ok_or_else(|| format!("gw1 {ours:?}, copy {:?}", copy_ids(&m2, spis)))
    });
    let stale = copy_ids(&m2, spis).expect("copy");
    let real = msg_ids(&m1).expect("gw1's IDs");
    eprintln!("message IDs send/recv: gw1 {real:?}, gw2's copy {stale:?}");
    assert!(
        stale.1 < real.1,
        "the copy must be behind: {stale:?} vs {real:?}"
    );

    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 synced the message IDs with strongSwan", WAIT, || {
        m2.log("ikemgr")
            .contains("RFC 6311 sync done")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", m2.logs(), charon.log()))
    });
    let synced = msg_ids(&m2).expect("gw2's IDs");
    assert!(
        synced.1 >= real.1,
        "gw2 must expect strongSwan's next request: {synced:?} vs gw1's {real:?}"
    );
    // strongSwan's next liveness checks reach gw2 and are answered.
    wait_for("gw2 answers strongSwan's checks", WAIT, || {
        let now = msg_ids(&m2).ok_or("no IKE SA on gw2")?;
        (now.1 >= synced.1 + 2)
            .then_some(())
            .ok_or_else(|| format!("{now:?}\n{}\n{}", m2.logs(), charon.log()))
    });
    let after = client_sa(&charon).expect("client IKE SA");
    assert_eq!(after.spis(), spis, "IKE SA renegotiated");
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
