//! FGCP takeover of a strongSwan dial-up tunnel without renegotiation and without replay
//! drops (issue 6, DESIGN.md §6; seed 001's FGCP pair, seed 002's rekey bug).
//!
//! Two Haven members (ikemgr, dpdmon, hasyncd and espd each, their own run-dir and bus)
//! form an FGCP pair over a heartbeat link and share the phase1's `local-gw`
//! 192.168.129.254, which the primary holds on `port2` and announces with gratuitous ARP.
//! A strongSwan client behind a router dials in; a server on the members' LAN answers a
//! continuous ping through the tunnel.
//!
//! ```text
//! client 192.168.7.2 (charon, 10.10.1.2 inside) - 192.168.7.1 router 192.168.129.1 [br0]
//!     br0: gw1 port2 / gw2 port2 (shared 192.168.129.254), server 192.168.129.50
//!     gw1 port4 169.254.0.1 ---- 169.254.0.2 gw2 port4 (FGCP heartbeats and sync)
//! ```
//!
//! The primary's daemons are all killed (`kill -9`) and its LAN port goes down (the box is
//! gone). The secondary becomes primary, takes the address, restores the synced IKE SA
//! (same SPIs, keys, message IDs) and installs the CHILD SA beyond the synced sequence
//! lease. Asserted: strongSwan's IKE and CHILD SA keep their SPIs (no renegotiation), the
//! ping resumes, strongSwan logs no ESP sequence-number (replay) failure, and a CHILD SA
//! rekey and an IKE SA rekey started by each side complete on the taken-over tunnel. The
//! outage is printed, not asserted.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use std::time::{Duration, Instant};

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::member;

#[test]
fn fgcp_takeover_keeps_the_strongswan_tunnel_without_replay_and_rekeys_in_place() {
    let Lab {
        scratch: _scratch,
        router,
        client,
        server,
        gw1,
        gw2,
        mut m1,
        m2,
        mut charon,
        before,
        child_before,
    } = Lab::new("ha-failover", "hafo");

    // gw2 holds the standby copies: the IKE SA with its SPIs, and the lease.
    wait_for("gw2's standby IKE SA", WAIT, || {
        let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
        let ok = v["ike_standby"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
        }) && v["standby"].as_array().is_some_and(|a| !a.is_empty());
        ok.then_some(()).ok_or_else(|| v.to_string())
    });
    assert!(
        m2.ike_sa().is_none(),
        "the secondary's ikemgr must not carry the tunnel"
    );
    // `diagnose vpn tunnel list` shows the dial-up instance on both members, as the seeds
    // do: sync-primary where it is carried, standby on the secondary (from its copy).
    assert_eq!(m1.listed_role().as_deref(), Some("sync-primary"));
    assert_eq!(
        m2.listed_role().as_deref(),
        Some("standby"),
        "vpnctl diagnose vpn tunnel list on the secondary"
    );

    // Continuous ping, 20 per second; the primary dies about 2 s in.
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 500, "0.05", "1");
    std::thread::sleep(Duration::from_secs(2));
    let seq_old = m1.esp_seqs();
    let hard_old = hard_secs(&m1);
    let killed = Instant::now();
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();

    wait_for("gw2 primary", WAIT, || match m2.role() {
        Some(r) if r == "primary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m2.logs())),
    });
    let promoted = killed.elapsed();
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.spis())
            .ok_or_else(|| m2.logs())
    });
    assert!(m2.holds_shared(), "gw2 holds {SHARED}");
    let seq_new = wait_for("gw2's espd carries the CHILD SA", WAIT, || {
        let s = m2.esp_seqs();
        (!s.is_empty()).then_some(s).ok_or_else(|| m2.logs())
    });
    assert_eq!(m2.listed_role().as_deref(), Some("sync-primary"));

    let (seqs, max_gap, out) = member::finish_ping(&mut ping);
    eprintln!(
        "FGCP takeover: gw2 primary {} ms after the kill; {} of 500 pings answered; longest gap {} pings = ~{} ms (50 ms per ping)",
        promoted.as_millis(),
        seqs.len(),
        max_gap,
        max_gap * 50
    );
    eprintln!("outbound sequence numbers: gw1 before the kill {seq_old:?}, gw2 after the takeover {seq_new:?}");
    let diag = || {
        format!(
            "gw2 espd: {}\nrouter neigh: {}\nserver neigh: {}\ngw2 addr: {}\ngw2 routes: {}\nrouter fdb: {}",
            m2.view(DaemonKind::Espd, "tunnel-list")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            router.run("ip", &["neigh"]).unwrap_or_default(),
            server.run("ip", &["neigh"]).unwrap_or_default(),
            gw2.run("ip", &["-4", "addr"]).unwrap_or_default(),
            gw2.run("ip", &["route"]).unwrap_or_default(),
            router.run("bridge", &["fdb", "show", "br", "br0", "dynamic"]).unwrap_or_default(),
        ) + &format!(
            "\ngw2 links: {}\ngw1 links: {}\nserver route get: {}",
            gw2.run("ip", &["-s", "link"]).unwrap_or_default(),
            gw1.run("ip", &["link"]).unwrap_or_default(),
            server.run("ip", &["route", "get", CLIENT_INNER]).unwrap_or_default(),
        )
    };
    assert!(
        seqs.iter().any(|s| *s >= 450),
        "the ping did not resume through gw2:\n{out}\n{}\n{}\n{}",
        diag(),
        m2.logs(),
        charon.log()
    );
    for (spi, next_old) in &seq_old {
        if let Some((_, next_new)) = seq_new.iter().find(|(s, _)| s == spi) {
            assert!(
                next_new > next_old,
                "gw2 must send beyond gw1's sequence numbers ({spi:08x}: {next_new} <= {next_old})"
            );
        }
    }

    // Lifetimes go on: gw2 installed the CHILD SA with what gw1 left of its hard lifetime
    // (at least the 2 s of ping before the kill are gone), not counted again from zero.
    let hard_new = hard_secs(&m2);
    for (spi, old) in &hard_old {
        let new = hard_new.iter().find(|(s, _)| s == spi).map(|(_, h)| *h);
        assert!(
            new.is_some_and(|n| n > 0 && n < *old),
            "{spi:08x}: hard lifetime on gw2 {new:?} s, on gw1 before the kill {old} s\n{}",
            m2.logs()
        );
    }

    // No renegotiation: strongSwan's IKE and CHILD SAs kept their SPIs; no replay drops.
    let after = client_sa(&charon).expect("client IKE SA after the takeover");
    assert_eq!(after.spis(), before.spis(), "IKE SA renegotiated");
    let child_after = after.child("net").expect("client CHILD SA");
    assert_eq!(
        (child_after.spi_in, child_after.spi_out),
        (child_before.spi_in, child_before.spi_out),
        "CHILD SA renegotiated"
    );
    assert_eq!(
        replay_failures(&charon),
        0,
        "strongSwan dropped ESP packets as replays:\n{}",
        charon.log()
    );

    // Rekeys on the taken-over tunnel (seed 002: the vendor ignored CREATE_CHILD_SA here).
    rekey_from_both_sides(&charon, &client, &m2, "gw2", &before, &child_before);
    drop(m2);
    drop(m1);
    let _ = charon.kill();
}

/// espd's outbound SAs of vpn1_1 on `m`: (spi_out, hard lifetime in seconds).
fn hard_secs(m: &Member) -> Vec<(u32, u64)> {
    let Ok(v) = m.view(DaemonKind::Espd, "tunnel-list") else {
        return Vec::new();
    };
    v["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == "vpn1_1")
        .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            (
                hex_u32(&s["enc"]["spi"]),
                s["life"]["timeout_hard"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}
