//! FGSP per-tunnel failover in seed 000's topology (issue 6; DESIGN.md §6), with the
//! members' DPD flushing the tunnel once the client is gone.
//!
//! Four Haven members (ikemgr, dpdmon, hasyncd, espd each, their own run-dir and bus) are
//! FGSP peers (UDP 708, `psksecret`) sharing the `local-gw` loopback 192.168.202.31 behind an
//! ECMP router; DC1_VM4 has `fgsp-sync disable`. A strongSwan client dials in; the router
//! sends it to one of DC1_VM1..3, which carries the tunnel (`sync-primary`); the other
//! synced members hold standby copies (IKE SA, CHILD SA, sequence leases), DC1_VM4 none.
//! See `fgsp_common` for the lab.
//!
//! Asserted, in order:
//! 1. The owner carries the tunnel; the other synced members have it `standby` with IKE and
//!    CHILD SA copies (`role=` in `vpnctl diagnose vpn tunnel list`: `sync-primary` on the
//!    owner, `standby` elsewhere); DC1_VM4 has neither copies nor a role for it.
//! 2. Continuous ping; the owner's daemons are killed and its route withdrawn at the router:
//!    the member the router now picks promotes the tunnel (ESP for a standby SPI arrived),
//!    carries strongSwan's IKE SA with the same SPIs, sends beyond the old owner's sequence
//!    numbers, the ping resumes, strongSwan renegotiated nothing and logged no replay
//!    failure, and the third synced member is `standby` under the new owner.
//! 3. The router moves the tunnel to the third synced member while no ESP flows, and
//!    strongSwan rekeys its CHILD SA: that IKE request for a standby IKE SA promotes the
//!    tunnel there, the previous owner (alive) drops it, the rekey completes in place, ping
//!    works, the IKE SA keeps its SPIs and no replay failure is logged.
//! 4. The client disappears (charon killed): the new owner's DPD declares it dead and
//!    flushes the tunnel, and every member's copy goes (roles and copies gone everywhere).
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod fgsp_common;

use std::time::{Duration, Instant};

use fgsp_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::member;

#[test]
fn fgsp_member_takes_the_tunnel_the_router_moves_and_dpd_flushes_it_everywhere() {
    let mut lab = Lab::new("ha-fgsp-seed000", "fgsp0");
    let owner = lab.owner;
    let before = lab.before.clone();
    let child_before = lab.child_before.clone();
    let client = lab.client.clone();
    let vm4 = MEMBERS - 1;
    let spis = before.spis();
    let others: Vec<usize> = (0..MEMBERS - 1).filter(|i| *i != owner).collect();
    eprintln!(
        "the router sends the client to {}",
        lab.members[owner].name()
    );

    // 1. Roles and copies.
    wait_for("the owner's role", WAIT, || {
        match lab.members[owner].role().as_deref() {
            Some("sync-primary") => Ok(()),
            other => Err(format!("{other:?}\n{}", lab.members[owner].logs())),
        }
    });
    for &i in &others {
        let m = &lab.members[i];
        wait_for(&format!("{}'s standby copies", m.name()), WAIT, || {
            let (ike, child) = m.copies()?;
            let role = m.role();
            (ike == 1 && child >= 1 && role.as_deref() == Some("standby"))
                .then_some(())
                .ok_or_else(|| format!("ike {ike} child {child} role {role:?}\n{}", m.logs()))
        });
        assert!(
            m.ike_sa().is_none(),
            "{} must not carry the tunnel",
            m.name()
        );
        assert_eq!(
            m.listed_role().as_deref(),
            Some("standby"),
            "{}: vpnctl diagnose vpn tunnel list shows the standby copy",
            m.name()
        );
    }
    assert_eq!(
        lab.members[owner].listed_role().as_deref(),
        Some("sync-primary"),
        "vpnctl diagnose vpn tunnel list on the owner"
    );
    assert_eq!(
        lab.members[vm4].listed_role(),
        None,
        "DC1_VM4 lists no {}",
        lab.members[vm4].tunnel
    );
    assert_eq!(
        lab.members[vm4].copies().expect("DC1_VM4 replicas"),
        (0, 0),
        "DC1_VM4 (fgsp-sync disable) must get no copy"
    );
    assert_eq!(
        lab.members[vm4].role(),
        None,
        "DC1_VM4 has no role for the tunnel"
    );

    // 2. Continuous ping, 20 per second; the owner goes away about 2 s in.
    let mut ping = member::start_ping(&client, (CLIENT_INNER, SERVER), 400, "0.05", "1");
    std::thread::sleep(Duration::from_secs(2));
    let seq_old = lab.members[owner].esp_seqs();
    let removed = Instant::now();
    lab.members[owner].kill_all();
    let new_owner = lab.withdraw(owner);
    assert!(new_owner != owner && new_owner != vm4, "{new_owner}");
    // The inside route follows the tunnel (the owner advertises it in a data centre).
    lab.route_back_via(new_owner);
    let nm = &lab.members[new_owner];
    wait_for(
        &format!("{} promotes the tunnel", nm.name()),
        WAIT,
        || match nm.role().as_deref() {
            Some("sync-primary") => Ok(()),
            other => Err(format!("{other:?}\n{}", nm.logs())),
        },
    );
    let promoted = removed.elapsed();
    wait_for(&format!("{} carries the IKE SA", nm.name()), WAIT, || {
        nm.ike_sa().filter(|s| *s == spis).ok_or_else(|| nm.logs())
    });
    let seq_new = wait_for("the new owner's espd carries the CHILD SA", WAIT, || {
        let s = nm.esp_seqs();
        (!s.is_empty()).then_some(s).ok_or_else(|| nm.logs())
    });
    assert!(
        nm.log("hasyncd").contains("FGSP: ESP SPI"),
        "the promotion must come from the ESP that arrived:\n{}",
        nm.logs()
    );
    let (seqs, max_gap, out) = member::finish_ping(&mut ping);
    eprintln!(
        "FGSP: {} sync-primary {} ms after the owner was removed; {} of 400 pings answered; longest gap {} pings = ~{} ms",
        nm.name(),
        promoted.as_millis(),
        seqs.len(),
        max_gap,
        max_gap * 50
    );
    eprintln!("outbound sequence numbers: old owner {seq_old:?}, new owner {seq_new:?}");
    assert!(
        seqs.iter().any(|s| *s >= 350),
        "the ping did not resume through {}:\n{out}\n{}\n{}",
        nm.name(),
        nm.logs(),
        lab.charon.log()
    );
    for (spi, next_old) in &seq_old {
        if let Some((_, next_new)) = seq_new.iter().find(|(s, _)| s == spi) {
            assert!(
                next_new > next_old,
                "the new owner must send beyond the old one ({spi:08x}: {next_new} <= {next_old})"
            );
        }
    }
    let after = client_sa(&lab.charon).expect("client IKE SA after the move");
    assert_eq!(after.spis(), spis, "IKE SA renegotiated");
    let child_after = after.child("net").expect("client CHILD SA");
    assert_eq!(
        (child_after.spi_in, child_after.spi_out),
        (child_before.spi_in, child_before.spi_out),
        "CHILD SA renegotiated"
    );
    assert_eq!(
        replay_failures(&lab.charon),
        0,
        "strongSwan dropped ESP packets as replays:\n{}",
        lab.charon.log()
    );
    let third: Vec<usize> = others.iter().copied().filter(|i| *i != new_owner).collect();
    for &i in &third {
        let m = &lab.members[i];
        wait_for(
            &format!("{} standby under the new owner", m.name()),
            WAIT,
            || {
                let (ike, _) = m.copies()?;
                let role = m.role();
                (ike == 1 && role.as_deref() == Some("standby"))
                    .then_some(())
                    .ok_or_else(|| format!("ike {ike} role {role:?}\n{}", m.logs()))
            },
        );
    }
    assert_eq!(
        lab.members[vm4].copies().unwrap(),
        (0, 0),
        "DC1_VM4 got a copy"
    );

    // 3. The router moves the tunnel again, to the third synced member, while no ESP
    // flows: the first packet there is strongSwan's CREATE_CHILD_SA (a CHILD SA rekey), an
    // IKE request for a standby IKE SA. It promotes the tunnel, the previous owner (alive)
    // drops it, and the rekey completes in place on the strongSwan retransmission.
    let last = third[0];
    let moved = lab.withdraw(new_owner);
    assert_eq!(moved, last, "the router's only choice left");
    lab.route_back_via(last);
    let child1 = lab.charon_child_spis();
    lab.charon
        .rekey_child("net")
        .expect("swanctl --rekey --child");
    let nm = &lab.members[last];
    wait_for(
        "strongSwan's CHILD SA rekeyed through the third member",
        Duration::from_secs(60),
        || {
            let sa = client_sa(&lab.charon).ok_or("no IKE SA")?;
            let c = sa.child("net").ok_or("no CHILD SA")?;
            (c.spi_in != child1.0 && c.state == "INSTALLED")
                .then_some(())
                .ok_or_else(|| format!("{c:?}\n{}", nm.logs()))
        },
    );
    assert!(
        nm.log("hasyncd").contains("FGSP: IKE SA"),
        "the promotion must come from the IKE request that arrived:\n{}",
        nm.logs()
    );
    assert_eq!(nm.role().as_deref(), Some("sync-primary"));
    assert_eq!(nm.ike_sa(), Some(spis), "same IKE SA on the third member");
    let prev = &lab.members[new_owner];
    wait_for(&format!("{} standby again", prev.name()), WAIT, || {
        (prev.role().as_deref() == Some("standby") && prev.ike_sa().is_none())
            .then_some(())
            .ok_or_else(|| format!("{:?}\n{}", prev.role(), prev.logs()))
    });
    let (sent, got) = ping_burst(&lab.client, 5);
    assert!(
        got >= 3,
        "ping after the IKE-triggered move: {got}/{sent}\n{}",
        nm.logs()
    );
    assert_eq!(
        client_sa(&lab.charon).map(|s| s.spis()),
        Some(spis),
        "IKE SA renegotiated"
    );
    assert_eq!(replay_failures(&lab.charon), 0, "{}", lab.charon.log());

    // 4. The client vanishes: the new owner's DPD flushes the tunnel everywhere.
    let dead_before = nm.dpd_stats().expect("dpdmon stats").2;
    lab.charon.kill().expect("kill charon");
    wait_for(
        "the new owner's dead verdict and flush",
        Duration::from_secs(60),
        || {
            let (_, _, dead) = nm.dpd_stats()?;
            (dead > dead_before && nm.ike_sa().is_none())
                .then_some(())
                .ok_or_else(|| format!("dead peers {dead}\n{}", nm.logs()))
        },
    );
    for (i, m) in lab.members.iter().enumerate() {
        if i == owner {
            continue;
        }
        wait_for(
            &format!("{}'s copies and role gone", m.name()),
            WAIT,
            || {
                let c = m.copies()?;
                let role = m.role();
                (c == (0, 0) && role.is_none() && m.ike_sa().is_none())
                    .then_some(())
                    .ok_or_else(|| format!("copies {c:?} role {role:?}\n{}", m.logs()))
            },
        );
    }
    for m in &mut lab.members {
        m.kill_all();
    }
}
