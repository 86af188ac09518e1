//! Sync datagrams lost on the FGSP link of a cluster with more than two peers (issue 6
//! point 3; seed 000's four members).
//!
//! Every member seals the datagrams it sends to all peers with the next position of its
//! stream, and those for one peer (snapshot chunks, their acknowledgements) off it, so a
//! member tells a lost record from a datagram that was never meant for it, however many
//! peers talk on the link. Seed 000's lab (`fgsp_common`), with `hb-lost-threshold 60`
//! (12 s: a few seconds of silence are not a peer loss, so no rejoin repairs anything
//! behind the test's back). Asserted, in order:
//! 1. Both other synced members hold the IKE and CHILD SA copies of the owner's tunnel.
//! 2. One of them (the victim) stops receiving the owner's FGSP datagrams (nftables), while
//!    it still hears the two other peers; the client deletes its IKE SA: the owner removes
//!    the tunnel and sends the deletions. The third synced member drops its copies and its
//!    role for the tunnel; the victim, which lost the deletions, still holds both.
//! 3. The cut is removed: the victim sees the gap in the owner's stream, asks the owner for
//!    a snapshot (its log says so), and holds neither a copy nor a role for the tunnel
//!    afterwards (the snapshot no longer names it); it declared no peer lost.
//!    Before the stream positions, a member hearing more than one peer never asked (the
//!    peers' snapshot traffic to each other left gaps in the link counters that were no
//!    loss), and the copies stayed for ever.
//!
//! Needs root, iproute2, nftables and the strongSwan packages (INTEROP.md).

mod fgsp_common;

use fgsp_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::netns::Netns;

/// Removes the nftables cut when dropped (also when the test fails).
struct NftCut<'a>(&'a Netns);

impl Drop for NftCut<'_> {
    fn drop(&mut self) {
        let _ = self.0.nft("delete table inet fgsplost");
    }
}

#[test]
fn deletions_lost_from_one_of_three_peers_are_repaired_by_a_snapshot() {
    let lab = Lab::with_peer_set(
        "ha-fgsp-lost-sync",
        "fgspl",
        "            set hb-lost-threshold 60\n",
    );
    let owner = lab.owner;
    let others: Vec<usize> = (0..MEMBERS - 1).filter(|i| *i != owner).collect();
    let (victim, witness) = (&lab.members[others[0]], &lab.members[others[1]]);

    // 1. The copies are on both other synced members.
    for m in [victim, witness] {
        wait_for(
            &format!("{}'s standby copies", m.name()),
            WAIT,
            || match m.copies()? {
                (1, c) if c >= 1 => Ok(()),
                other => Err(format!("{other:?}\n{}", m.logs())),
            },
        );
    }

    // 2. The victim hears nothing from the owner (and still hears the two other peers).
    victim
        .ns
        .nft(&format!(
            "table inet fgsplost {{ chain input {{ type filter hook input priority 0; \
             iifname \"port4\" ip saddr {} udp dport 708 drop; }}; }}",
            port4_addr(owner)
        ))
        .expect("nft cut");
    let cut = NftCut(&victim.ns);
    lab.charon
        .terminate_ike("dial", WAIT)
        .expect("strongSwan deletes its IKE SA");
    wait_for("the owner deleted the tunnel", WAIT, || {
        match lab.members[owner].ike_sa() {
            None => Ok(()),
            Some(sa) => Err(format!("the owner still has {sa:?}")),
        }
    });
    wait_for(
        &format!(
            "{} drops its copies (the deletions were sent)",
            witness.name()
        ),
        WAIT,
        || match (witness.copies()?, witness.role()) {
            ((0, 0), None) => Ok(()),
            other => Err(format!("{other:?}\n{}", witness.logs())),
        },
    );
    let (ike, child) = victim.copies().expect("victim view");
    assert!(
        ike == 1 && child >= 1 && victim.role().as_deref() == Some("standby"),
        "{} must still hold its copies and role while it hears nothing from the owner: {:?}",
        victim.name(),
        (ike, child, victim.role())
    );
    assert_eq!(
        victim.detected().expect("victim peers"),
        3,
        "{} hears the other peers",
        victim.name()
    );

    // 3. The owner's datagrams arrive again: the gap is seen and repaired.
    drop(cut);
    wait_for(
        &format!("no copies left on {}", victim.name()),
        WAIT,
        || match (victim.copies()?, victim.role()) {
            ((0, 0), None) => Ok(()),
            other => Err(format!("{other:?}\n{}", victim.log("hasyncd"))),
        },
    );
    let log = victim.log("hasyncd");
    let asked = format!("from peer {} lost; asking it for a snapshot", owner + 1);
    assert!(
        log.contains(&asked),
        "{} must have asked the owner for the snapshot itself ({asked})\n{log}",
        victim.name()
    );
    assert!(
        !log.contains(&format!("FGSP peer {} lost", owner + 1)),
        "the cut must not have been a peer loss (its rejoin would hide the bug)\n{log}"
    );
}
