//! Sync datagrams lost on the FGCP link (issue 6 point 3; issue 8 point 4's soak, where
//! standby CHILD SA copies outlived their tunnels).
//!
//! The lab of `ha_failover.rs` (two Haven members, a strongSwan dial-up client), with a
//! lenient heartbeat (100 ms x 60: a few seconds of silence are not a member loss, so no
//! rejoin snapshot repairs anything behind the test's back). Asserted, in order:
//! 1. gw2 (secondary) holds the IKE and CHILD SA copies of the tunnel gw1 carries.
//! 2. gw2 stops receiving on the FGCP link (nftables drop on port4), the client deletes its
//!    IKE SA: gw1 removes the tunnel and sends the deletions, which are lost.
//! 3. The link comes back: gw2 sees the gap in gw1's stream positions, asks gw1 for a
//!    snapshot (its log says so), and no copy of the deleted tunnel is left on gw2.
//!    Without the repair the copies stayed for ever.
//!
//! Needs root, iproute2, nftables and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::wait_for;
use serde_json::Value;

/// `m`'s hasyncd standby copies: (IKE SAs, CHILD SAs).
fn copies(m: &Member) -> Result<(usize, usize), String> {
    let v: Value = m.view(DaemonKind::Hasyncd, "replicas")?;
    let n = |k: &str| v[k].as_array().map_or(0, Vec::len);
    Ok((n("ike_standby"), n("standby")))
}

/// Drops everything gw2 receives on the FGCP link (UDP 703 on port4).
const CUT: &str = "table inet halost { chain input { type filter hook input priority 0; \
                   iifname \"port4\" udp dport 703 drop; }; }";

#[test]
fn deletions_lost_on_the_link_are_repaired_by_a_snapshot() {
    let Lab {
        scratch: _scratch,
        router: _router,
        client: _client,
        server: _server,
        gw1: _gw1,
        gw2,
        m1,
        m2,
        charon,
        before: _,
        child_before: _,
    } = Lab::with_heartbeat("ha-lost-sync", "hals", NO_DPD, (1, 60));

    // 1. The copies are on gw2.
    wait_for(
        "gw2's standby IKE and CHILD SA copies",
        WAIT,
        || match copies(&m2)? {
            (1, 1) => Ok(()),
            other => Err(format!("gw2 holds {other:?}")),
        },
    );

    // 2. gw2 hears nothing from gw1; the tunnel goes on gw1.
    gw2.nft(CUT).expect("nft cut");
    let cut = scopeguard_nft(&gw2);
    charon
        .terminate_ike("dial", WAIT)
        .expect("strongSwan deletes its IKE SA");
    wait_for("gw1 deleted the tunnel", WAIT, || match m1.ike_sa() {
        None => Ok(()),
        Some(sa) => Err(format!("gw1 still has {sa:?}")),
    });
    // One more heartbeat interval or two, so the deletions are surely sent (and lost).
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        copies(&m2).expect("gw2 view"),
        (1, 1),
        "gw2 must still hold the copies while it hears nothing"
    );

    // 3. The link is back: gw2 notices the loss and resyncs.
    drop(cut);
    wait_for("no copies left on gw2", WAIT, || match copies(&m2)? {
        (0, 0) => Ok(()),
        other => Err(format!("gw2 still holds {other:?}\n{}", m2.log("hasyncd"))),
    });
    let log = m2.log("hasyncd");
    assert!(
        log.contains("asking it for a snapshot"),
        "gw2 must have asked for the snapshot itself\n{log}"
    );
    assert!(
        !log.contains("lost (no heartbeat)"),
        "the cut must not have been a member loss (its rejoin snapshot would hide the bug)\n{log}"
    );
    assert_eq!(m2.role().as_deref(), Some("secondary"));
}

/// Removes the nftables cut when dropped (also when the test fails).
struct NftCut<'a>(&'a haven_tests::netns::Netns);

impl Drop for NftCut<'_> {
    fn drop(&mut self) {
        let _ = self.0.nft("delete table inet halost");
    }
}

fn scopeguard_nft(ns: &haven_tests::netns::Netns) -> NftCut<'_> {
    NftCut(ns)
}
