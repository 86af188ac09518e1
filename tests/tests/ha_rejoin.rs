//! A secondary that restarts gets the primary's whole state again, then takes over (issue
//! 6 point 3: a member that joins or restarts gets a snapshot of everything, then the
//! stream).
//!
//! The FGCP pair of `ha_failover` (see `ha_common`). gw2 (secondary) is killed (all four
//! daemons, `kill -9`) and started again with an empty memory: when it rejoins, gw1 sends
//! it every IKE and CHILD SA it carries and the tunnel table's claims and leases, and later
//! changes follow as they happen (strongSwan rekeys the CHILD SA while gw2 is back). Then
//! gw1 dies: gw2 takes the tunnel over from what it received after its restart. Asserted:
//! gw2's copies carry the current SPIs (the rekeyed CHILD SA, not the one before the
//! restart), the takeover keeps strongSwan's IKE and CHILD SAs (no renegotiation), the
//! ping resumes, gw2 sends above gw1's sequence numbers and strongSwan logs no replay
//! failure.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use serde_json::Value;

/// `hb-interval` 200 ms, `hb-lost-threshold` 10: the takeover here is about state, not
/// speed, and a loaded machine must not fail the pair over while gw2 rejoins.
const STEADY_HEARTBEAT: (u32, u32) = (2, 10);

/// IKE SA SPIs, CHILD SA inbound SPIs (hex), tunnel-table rows.
type Copies = (Vec<(u64, u64)>, Vec<String>, usize);

/// gw2's standby copies.
fn copies(m: &Member) -> Result<Copies, String> {
    let v: Value = m.view(DaemonKind::Hasyncd, "replicas")?;
    let ike = v["ike_standby"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])))
        .collect();
    let child = v["standby"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["spi_in"].as_str().map(str::to_string))
        .collect();
    let tunnels = v["tunnels"].as_array().map_or(0, Vec::len);
    Ok((ike, child, tunnels))
}

#[test]
fn a_restarted_secondary_gets_everything_again_and_takes_over() {
    let Lab {
        scratch: _scratch,
        router: _router,
        client,
        server: _server,
        gw1,
        gw2: _gw2,
        mut m1,
        mut m2,
        mut charon,
        before,
        child_before,
    } = Lab::with_heartbeat("ha-rejoin", "harj", NO_DPD, STEADY_HEARTBEAT);
    let spis = before.spis();
    wait_for("gw2's first copies", WAIT, || {
        let (ike, child, _) = copies(&m2)?;
        (ike.contains(&spis) && !child.is_empty())
            .then_some(())
            .ok_or_else(|| format!("{ike:?} {child:?}"))
    });

    // gw2 restarts from nothing.
    m2.kill_all();
    assert!(m2.role().is_none(), "gw2 is down");
    // While gw2 is away strongSwan rekeys the CHILD SA: gw2 can only learn the new one
    // from gw1 after it is back.
    charon.rekey_child("net").expect("swanctl --rekey --child");
    let child_now = wait_for("client CHILD SA rekeyed", WAIT, || {
        let sa = client_sa(&charon).ok_or("no IKE SA")?;
        let c = sa.child("net").ok_or("no CHILD SA")?.clone();
        if c.spi_in != child_before.spi_in && c.state == "INSTALLED" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    });
    m2.spawn(100);
    wait_for("gw2 secondary again", WAIT, || match m2.role() {
        Some(r) if r == "secondary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m2.logs())),
    });
    // gw1's view of the CHILD SA inbound SPI on the gateway side is strongSwan's outbound.
    let gw_spi_in = format!("{:08x}", child_now.spi_out);
    wait_for("gw2 holds the current state again", WAIT, || {
        let (ike, child, tunnels) = copies(&m2)?;
        (ike.contains(&spis) && child.contains(&gw_spi_in) && tunnels > 0)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "ike {ike:?} child {child:?} (want {gw_spi_in}) tunnels {tunnels}\n{}",
                    m2.logs()
                )
            })
    });
    // It came as one windowed, acknowledged snapshot (not one datagram per SA).
    wait_for("gw2 applied gw1's snapshot", WAIT, || {
        let l = m2.log("hasyncd");
        l.contains("fgcp: snapshot from member")
            .then_some(())
            .ok_or_else(|| m2.logs())
    });
    assert!(
        m2.ike_sa().is_none(),
        "the secondary's ikemgr carries nothing"
    );

    // gw1 dies with traffic running; gw2 takes over from what it got after its restart.
    wait_for("ping through gw1", WAIT, || {
        let (sent, got) = ping_burst(&client, 2);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}", m1.logs()))
    });
    let seq_old = m1.esp_seqs();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 primary", WAIT, || match m2.role() {
        Some(r) if r == "primary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m2.logs())),
    });
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == spis)
            .ok_or_else(|| m2.logs())
    });
    let seq_new = wait_for("gw2's espd carries the CHILD SA", WAIT, || {
        let s = m2.esp_seqs();
        (!s.is_empty()).then_some(s).ok_or_else(|| m2.logs())
    });
    wait_for("ping through gw2", WAIT, || {
        let (sent, got) = ping_burst(&client, 3);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}\n{}", m2.logs(), charon.log()))
    });
    eprintln!("outbound sequence numbers: gw1 {seq_old:?}, gw2 after the takeover {seq_new:?}");
    for (spi, next_old) in &seq_old {
        let next_new = seq_new
            .iter()
            .find(|(s, _)| s == spi)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("gw2 does not carry {spi:08x}: {seq_new:?}"));
        assert!(
            next_new > *next_old,
            "gw2 must send beyond gw1 ({spi:08x}: {next_new} <= {next_old})"
        );
    }
    let after = client_sa(&charon).expect("client IKE SA after the takeover");
    assert_eq!(after.spis(), spis, "IKE SA renegotiated");
    let c = after.child("net").expect("client CHILD SA");
    assert_eq!(
        (c.spi_in, c.spi_out),
        (child_now.spi_in, child_now.spi_out),
        "CHILD SA renegotiated"
    );
    assert_eq!(replay_failures(&charon), 0, "{}", charon.log());
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}
