//! Dead peer detection in an FGCP pair (issue 5, points 5 and 6; seed 000's flush with
//! `HA send IKE SA del`).
//!
//! The lab of `ha_failover.rs` (two Haven members sharing `local-gw`, a strongSwan dial-up
//! client behind a router), with DPD `on-idle`, 2 s, 3 probes. Asserted, in order:
//! 1. Only the member that carries the tunnel probes it: gw1 (primary) sends probes that
//!    strongSwan answers; gw2, holding the standby copy, sends none.
//! 2. After gw1 dies and gw2 takes the tunnel over, gw2 starts probing, and strongSwan
//!    answers the new owner's probes (its message IDs continue where gw1 left them).
//! 3. gw1 comes back as secondary and receives the IKE SA copy; it never probes.
//! 4. strongSwan's charon is killed: gw2 declares the peer dead, flushes the tunnel (its
//!    log tells `HA send IKE SA del`), and gw1's standby copy is deleted too.
//! 5. Neither member holds any standby IKE or CHILD SA copy afterwards (gw2 carried the
//!    tunnel itself and must not keep gw1's old copies of it).
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use serde_json::Value;

const DPD: &str = "        set dpd on-idle
        set dpd-retryinterval 2
        set dpd-retrycount 3
";

/// dpdmon's counters on `m`: (probes sent, replies, dead peers).
fn dpd_stats(m: &Member) -> Result<(u64, u64, u64), String> {
    let v = m.view(DaemonKind::Dpdmon, "stats")?;
    let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k} in {v}"));
    Ok((n("probes_sent")?, n("probe_replies")?, n("dead_peers")?))
}

/// The standby copies `m`'s hasyncd holds: (IKE SAs, CHILD SAs), as `tunnel spis` text.
fn copies(m: &Member) -> Result<(Vec<String>, Vec<String>), String> {
    let v: Value = m.view(DaemonKind::Hasyncd, "replicas")?;
    let list = |k: &str, a: &str, b: &str| -> Vec<String> {
        v[k].as_array()
            .map(|l| {
                l.iter()
                    .map(|s| format!("{} {}/{}", s["tunnel"], s[a], s[b]))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((
        list("ike_standby", "spi_i", "spi_r"),
        list("standby", "spi_in", "spi_out"),
    ))
}

/// Whether `m`'s hasyncd holds a standby copy of the IKE SA with `spis`.
fn has_ike_copy(m: &Member, spis: (u64, u64)) -> Result<bool, String> {
    let v: Value = m.view(DaemonKind::Hasyncd, "replicas")?;
    Ok(v["ike_standby"].as_array().is_some_and(|a| {
        a.iter()
            .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == spis)
    }))
}

#[test]
fn only_the_owner_probes_and_a_dpd_flush_deletes_the_standby_copies() {
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
    } = Lab::with_dpd("ha-dpd", "hadp", DPD);
    let spis = before.spis();

    // 1. gw2 holds the copy; the idle tunnel is probed by gw1 only.
    wait_for("gw2's standby IKE SA", WAIT, || {
        has_ike_copy(&m2, spis)?
            .then_some(())
            .ok_or_else(|| "no copy yet".to_string())
    });
    wait_for("gw1 probes and strongSwan answers", WAIT, || {
        let (sent, replies, dead) = dpd_stats(&m1)?;
        assert_eq!(dead, 0, "gw1 declared a live peer dead\n{}", m1.logs());
        (sent >= 2 && replies >= 2)
            .then_some(())
            .ok_or_else(|| format!("gw1 sent {sent}, replies {replies}"))
    });
    assert_eq!(
        dpd_stats(&m2).expect("gw2 stats").0,
        0,
        "a standby member must never probe"
    );

    // 2. gw1 dies; gw2 carries the tunnel and probes it, and strongSwan answers.
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 carries the IKE SA with the same SPIs", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == spis)
            .map(|_| ())
            .ok_or_else(|| m2.logs())
    });
    wait_for("gw2 probes and strongSwan answers", WAIT, || {
        let (sent, replies, dead) = dpd_stats(&m2)?;
        assert_eq!(dead, 0, "gw2 declared a live peer dead\n{}", m2.logs());
        (sent >= 2 && replies >= 2)
            .then_some(())
            .ok_or_else(|| format!("gw2 sent {sent}, replies {replies}"))
    });
    let after = client_sa(&charon).expect("client IKE SA after the takeover");
    assert_eq!(after.spis(), spis, "the takeover must not renegotiate");

    // 3. gw1 returns as secondary (lower priority) and gets the copy back; it never probes.
    let _ = gw1.ip(&["addr", "del", &format!("{SHARED}/32"), "dev", "port2"]);
    gw1.ip(&["link", "set", "port2", "up"]).unwrap();
    lan_routes(&gw1);
    m1.spawn(50);
    wait_for("gw1 back as secondary", WAIT, || match m1.role() {
        Some(r) if r == "secondary" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    wait_for("gw1's standby IKE SA", WAIT, || {
        has_ike_copy(&m1, spis)?
            .then_some(())
            .ok_or_else(|| "no copy yet".to_string())
    });

    // 4. The client vanishes: gw2 flushes, and gw1's copy goes with it.
    let dead_before = dpd_stats(&m2).expect("gw2 stats").2;
    charon.kill().expect("kill charon");
    wait_for("gw2's dead verdict and flush", WAIT, || {
        let (_, _, dead) = dpd_stats(&m2)?;
        (dead > dead_before && m2.ike_sa().is_none())
            .then_some(())
            .ok_or_else(|| format!("dead peers {dead}\n{}", m2.logs()))
    });
    assert!(
        m2.log("ikemgr").contains(&format!(
            "HA send IKE SA del {:016x}/{:016x}",
            spis.0, spis.1
        )),
        "gw2's flush must tell the other members\n{}",
        m2.logs()
    );
    wait_for("gw1's standby copy deleted", WAIT, || {
        (!has_ike_copy(&m1, spis)?)
            .then_some(())
            .ok_or_else(|| m1.logs())
    });
    assert_eq!(
        dpd_stats(&m1).expect("gw1 stats").0,
        0,
        "gw1, back as a standby member, must never probe"
    );
    // 5. No copy of the flushed tunnel is left anywhere: not on gw1 (the deletes reached
    //    it), and not on gw2, which carried the tunnel since the takeover and must not keep
    //    gw1's old copies of it (the soak's leak: standby CHILD SA copies that outlived
    //    their tunnel's DPD death).
    for (name, m) in [("gw1", &m1), ("gw2", &m2)] {
        wait_for(&format!("no standby copies left on {name}"), WAIT, || {
            let (ike, child) = copies(m)?;
            (ike.is_empty() && child.is_empty())
                .then_some(())
                .ok_or_else(|| format!("{name} still holds IKE {ike:?} CHILD {child:?}"))
        });
    }
}
