//! An FGCP pair driven only through the public API, the way hasyncd will: heartbeats and
//! sync messages sealed on the HA link, the election deciding the primary, the tunnel table
//! (FGCP mode) moving the tunnel and its sequence leases, a simulated clock, and a model of
//! the remote peer's ESP anti-replay window. The primary is killed, restarts (new epoch,
//! snapshot) and takes the tunnel back from the live secondary, then is killed again: the
//! peer never sees a sequence number twice or out of order.

use std::collections::{BTreeMap, VecDeque};

use ha_core::election::DEFAULT_HB_INTERVAL_MS;
use ha_core::fgsp::DEFAULT_UNSYNCED_JUMP;
use ha_core::link::{next_epoch, ClusterKind, HaLink, LinkKey};
use ha_core::msg::{snapshot_chunks, HaRole, SnapshotAssembler, SnapshotRequest};
use ha_core::wire::MAX_BODY_LEN;
use ha_core::{
    ElectionEvent, Fgcp, FgcpConfig, MemberId, Message, TableMode, TunnelEvent, TunnelRole,
    TunnelTable,
};

const T: &str = "vpn1_1";
const SPI: u32 = 0x10aa4d3a;
const BLOCK: u64 = 2048;
const TICK: u64 = 10;
const PKTS_PER_TICK: u64 = 40;

struct Node {
    id: MemberId,
    link: HaLink,
    fgcp: Fgcp,
    table: TunnelTable,
    /// Outbound datapath: active, next seq, granted (confirmed lease), lease asked.
    active: bool,
    next: u64,
    granted: u64,
    asked: bool,
    snapshot: Option<SnapshotAssembler>,
    /// Each peer's role as its last heartbeat announced it.
    peer_roles: BTreeMap<MemberId, HaRole>,
}

fn key() -> LinkKey {
    LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"cluster password"), 1000).unwrap()
}

fn node(id: u32, prio: u8, epoch: u64, now: u64) -> Node {
    let id = MemberId(id);
    Node {
        id,
        link: HaLink::new(key(), id, epoch).unwrap(),
        fgcp: Fgcp::new(
            FgcpConfig::new(id, format!("FGVM02TM2200000{}", id.0), prio),
            now,
        )
        .unwrap(),
        table: TunnelTable::with_mode(id, TableMode::Fgcp),
        active: false,
        next: 1,
        granted: 1,
        asked: false,
        snapshot: None,
        peer_roles: BTreeMap::new(),
    }
}

struct World {
    now: u64,
    nodes: Vec<Option<Node>>,
    wire: VecDeque<(usize, Vec<u8>)>,
    /// The remote peer: every ESP sequence number received, in order, with the sender.
    esp: Vec<(MemberId, u64)>,
    log: Vec<String>,
    /// Heartbeats of this node are lost on the wire (a loaded machine: the other member
    /// misses them, everything else arrives).
    drop_hb_from: Option<usize>,
    /// Model hasyncd's FGCP mode exactly: tunnel roles follow the member's FGCP role (a
    /// demotion by the table does not stop a member that still thinks it is primary; its
    /// ikemgr and espd keep the tunnel), and a primary whose lease is refused because the
    /// table gives the tunnel to another member claims it back (`propose_leases`).
    daemon_roles: bool,
}

impl World {
    fn send(&mut self, i: usize, msg: &Message) {
        let n = self.nodes[i].as_mut().unwrap();
        let d = n.link.seal(msg).unwrap();
        self.wire.push_back((i, d));
    }

    /// Outputs of node i: heartbeats, table messages, events.
    fn pump(&mut self, i: usize) {
        loop {
            let now = self.now;
            let Some(n) = self.nodes[i].as_mut() else {
                return;
            };
            let mut out = Vec::new();
            while let Some(hb) = n.fgcp.poll_transmit(now) {
                out.push(Message::Heartbeat(hb));
            }
            while let Some(o) = n.table.poll_transmit() {
                out.push(o.message);
            }
            let mut evs = Vec::new();
            while let Some(e) = n.fgcp.poll_event() {
                evs.push(e);
            }
            let mut tevs = Vec::new();
            while let Some(e) = n.table.poll_event() {
                tevs.push(e);
            }
            if out.is_empty() && evs.is_empty() && tevs.is_empty() {
                return;
            }
            for m in &out {
                self.send(i, m);
            }
            let n = self.nodes[i].as_mut().unwrap();
            for e in evs {
                self.log.push(format!("{now} {}: {e:?}", n.id));
                match e {
                    ElectionEvent::PeerJoined(p) => n.table.peer_joined(p),
                    ElectionEvent::PeerLost(p) => n.table.peer_lost(p),
                    ElectionEvent::BecamePrimary => n.table.promote_all(),
                    // hasyncd marks every tunnel standby: ikemgr and espd drop them.
                    ElectionEvent::BecameSecondary { .. } => n.active = false,
                }
            }
            // hasyncd after every drive: the primary claims back what a member that is no
            // longer primary claimed during a split brain.
            if n.fgcp.role() == HaRole::Primary {
                let roles = n.peer_roles.clone();
                let active = n.active;
                n.table
                    .reclaim_stale(|m| roles.get(&m) == Some(&HaRole::Primary), |_| active);
            }
            for e in tevs {
                self.log.push(format!("{now} {}: {e:?}", n.id));
                match e {
                    TunnelEvent::Promoted { start_seqs, .. } => {
                        n.active = true;
                        n.next = start_seqs[0].first_seq;
                        n.granted = n.next;
                        n.asked = false;
                    }
                    TunnelEvent::Demoted { .. } => {
                        if !self.daemon_roles {
                            n.active = false;
                        }
                    }
                    TunnelEvent::LeaseConfirmed { seq_hw, .. } => {
                        n.granted = n.granted.max(seq_hw);
                        n.asked = false;
                    }
                    // espd's counter continues beyond the other member's leases (the
                    // daemon's `SeqSkip`); never backwards.
                    TunnelEvent::Reclaimed { start_seqs, .. } => {
                        n.next = n.next.max(start_seqs[0].first_seq);
                    }
                }
            }
        }
    }

    fn deliver_all(&mut self) {
        while let Some((from, d)) = self.wire.pop_front() {
            for j in 0..self.nodes.len() {
                if j == from {
                    continue;
                }
                let now = self.now;
                let Some(n) = self.nodes[j].as_mut() else {
                    continue;
                };
                let r = n.link.open(&d).expect("no drops on a clean link");
                if self.drop_hb_from == Some(from) && matches!(r.message, Message::Heartbeat(_)) {
                    continue;
                }
                let mut reply = None;
                match &r.message {
                    Message::Heartbeat(hb) => {
                        n.peer_roles.insert(r.sender, hb.role);
                        n.fgcp.handle_heartbeat(r.sender, hb, now)
                    }
                    Message::SnapshotRequest(req) => {
                        let items = n.table.snapshot_items();
                        let chunks = snapshot_chunks(
                            req.request_id,
                            n.link.next_counter(),
                            items,
                            MAX_BODY_LEN,
                        )
                        .unwrap();
                        reply = Some(chunks);
                    }
                    Message::SnapshotChunk(c) => {
                        if let Some(asm) = n.snapshot.as_mut() {
                            if let Some(snap) = asm.push(r.sender, c.clone()) {
                                for item in &snap.items {
                                    n.table.apply_snapshot_item(snap.from, item);
                                }
                                n.snapshot = None;
                                self.log.push(format!("{now} {}: snapshot applied", n.id));
                            }
                        }
                    }
                    m => n.table.handle_message(r.sender, m),
                }
                if let Some(chunks) = reply {
                    for c in chunks {
                        self.send(j, &Message::SnapshotChunk(c));
                    }
                }
                self.pump(j);
            }
        }
    }

    fn tick(&mut self) {
        for i in 0..self.nodes.len() {
            let now = self.now;
            let Some(n) = self.nodes[i].as_mut() else {
                continue;
            };
            n.fgcp.handle_timeout(now);
            n.table.handle_timeout(now);
            // Datapath: lease ahead, then send what is granted.
            if n.active {
                if !n.asked && n.granted.saturating_sub(n.next) <= BLOCK / 2 {
                    let hw = n.granted.max(n.next) + BLOCK;
                    if n.table.propose_lease(T, SPI, hw, now) {
                        n.asked = true;
                    } else {
                        assert!(self.daemon_roles, "lease refused");
                        if n.fgcp.role() == HaRole::Primary {
                            // hasyncd's `propose_leases`: the primary claims it back.
                            n.table.local_established(T);
                            let hw = n.granted.max(n.next) + BLOCK;
                            n.asked = n.table.propose_lease(T, SPI, hw, now);
                        }
                    }
                }
                for _ in 0..PKTS_PER_TICK {
                    if n.next >= n.granted {
                        break;
                    }
                    self.esp.push((n.id, n.next));
                    n.next += 1;
                }
            }
            self.pump(i);
        }
        self.deliver_all();
        self.now += TICK;
    }

    fn run(&mut self, ms: u64) {
        let until = self.now + ms;
        while self.now < until {
            self.tick();
        }
    }

    fn role(&self, i: usize) -> Option<HaRole> {
        self.nodes[i].as_ref().map(|n| n.fgcp.role())
    }

    /// Members 1 (priority 200) and 2 (priority 100) after their first election: member 1
    /// is primary.
    fn elected_pair(daemon_roles: bool) -> World {
        let mut w = World {
            now: 0,
            nodes: vec![Some(node(1, 200, 1, 0)), Some(node(2, 100, 1, 0))],
            wire: VecDeque::new(),
            esp: Vec::new(),
            log: Vec::new(),
            drop_hb_from: None,
            daemon_roles,
        };
        w.run(2_000);
        assert_eq!(w.role(0), Some(HaRole::Primary));
        w
    }

    /// The tunnel comes up on member 1 (its ikemgr) and its CHILD SA is synced to member 2.
    fn tunnel_up_on_member_1(&mut self) {
        {
            let n = self.nodes[0].as_mut().unwrap();
            n.table.local_established(T);
            n.table.sa_added(n.id, T, SPI);
            n.active = true;
        }
        self.pump(0);
        self.nodes[1]
            .as_mut()
            .unwrap()
            .table
            .sa_added(MemberId(1), T, SPI);
    }

    fn sent_by(&self, id: u32) -> usize {
        self.esp.iter().filter(|(m, _)| m.0 == id).count()
    }
}

#[test]
fn fgcp_pair_fails_over_twice_without_replay() {
    let mut w = World::elected_pair(false);
    assert_eq!(w.role(1), Some(HaRole::Secondary));

    // The tunnel comes up on the primary (ikemgr), its CHILD SA is synced.
    w.tunnel_up_on_member_1();
    w.run(3_000);
    let before = w.sent_by(1);
    assert!(before > 10_000, "member 1 carried traffic: {before}");

    // Kill member 1. Member 2 takes over after the lost threshold and continues.
    let killed_at = w.now;
    w.nodes[0] = None;
    w.run(3_000);
    assert_eq!(w.role(1), Some(HaRole::Primary));
    assert!(w.sent_by(2) > 0);
    let first_b = w.esp.iter().position(|(m, _)| m.0 == 2).unwrap();
    // Simulated time from the kill to member 2's first packet: the lost threshold plus a
    // tick or two (hb-interval 200 ms x hb-lost-threshold 6 = 1.2 s).
    let takeover_ms = w.log.iter().find_map(|l| {
        l.strip_suffix("BecamePrimary")
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .filter(|&t| t > killed_at)
    });
    assert!(takeover_ms.is_some_and(|t| t - killed_at <= 1_200 + 2 * TICK + DEFAULT_HB_INTERVAL_MS));
    let last_a = w.esp[first_b - 1].1;
    let first_b_seq = w.esp[first_b].1;
    assert!(first_b_seq > last_a);
    assert!(
        first_b_seq - last_a - 1 <= BLOCK + BLOCK / 2,
        "skip within the stated bound"
    );

    // Member 1 restarts: new epoch, hello, asks member 2 for a snapshot. Both ages are
    // within the 300 s margin, so priority decides (FortiOS): member 1 (200) becomes primary
    // again and takes the tunnel over from a live member 2.
    let epoch = next_epoch(Some(1), w.now).unwrap();
    let mut n1 = node(1, 200, epoch, w.now);
    n1.snapshot = Some(SnapshotAssembler::new(7, MemberId(2)));
    w.nodes[0] = Some(n1);
    w.send(
        0,
        &Message::SnapshotRequest(SnapshotRequest {
            request_id: 7,
            next: 0,
        }),
    );
    let b_before = w.sent_by(2);
    w.run(3_000);
    assert!(
        w.log.iter().any(|l| l.contains("snapshot applied")),
        "{:#?}",
        w.log
    );
    assert_eq!(w.role(0), Some(HaRole::Primary));
    assert_eq!(w.role(1), Some(HaRole::Secondary));
    assert!(
        w.sent_by(2) > b_before,
        "member 2 carried traffic meanwhile"
    );
    assert!(
        !w.nodes[1].as_ref().unwrap().active,
        "member 2 stopped sending"
    );
    let a_now = w.sent_by(1);
    assert!(a_now > before, "member 1 carries the tunnel again");

    // Kill member 1 again: member 2 carries the tunnel, above everything member 1 sent.
    w.nodes[0] = None;
    let esp_before = w.esp.len();
    w.run(3_000);
    assert_eq!(w.role(1), Some(HaRole::Primary));
    assert!(w.esp.len() > esp_before);

    // The remote peer's view: strictly increasing sequence numbers, hence no replay drop
    // whatever its window size.
    for pair in w.esp.windows(2) {
        assert!(pair[0].1 < pair[1].1, "{:?} then {:?}", pair[0], pair[1]);
    }
}

/// Split brain on a loaded machine: the secondary misses the primary's heartbeats for a
/// moment (everything else arrives), makes itself primary and takes the tunnel over; the
/// primary, demoted by that claim, drops it. When the heartbeats arrive again the election
/// keeps the first member primary (higher priority): it must own and carry the tunnel
/// again, and the peer must never see a sequence number twice or out of order.
#[test]
fn primary_reclaims_the_tunnel_after_a_split_brain() {
    let mut w = World::elected_pair(false);
    w.tunnel_up_on_member_1();
    w.run(2_000);
    assert!(w.sent_by(1) > 5_000);

    // Member 2 misses member 1's heartbeats beyond the lost threshold (1.2 s).
    w.drop_hb_from = Some(0);
    w.run(1_600);
    assert_eq!(w.role(1), Some(HaRole::Primary), "{:#?}", w.log);
    assert_eq!(
        w.role(0),
        Some(HaRole::Primary),
        "member 1 still hears member 2"
    );
    assert!(w.sent_by(2) > 0, "member 2 took the tunnel over");
    assert!(!w.nodes[0].as_ref().unwrap().active, "member 1 dropped it");

    // The heartbeats arrive again: member 1 stays primary, member 2 steps down.
    w.drop_hb_from = None;
    w.run(2_000);
    assert_eq!(w.role(0), Some(HaRole::Primary));
    assert_eq!(w.role(1), Some(HaRole::Secondary));
    let a = w.nodes[0].as_ref().unwrap();
    assert_eq!(
        a.table.role(T),
        Some(TunnelRole::SyncPrimary),
        "{:#?}",
        w.log
    );
    assert!(a.active, "member 1 carries the tunnel again: {:#?}", w.log);
    assert!(!w.nodes[1].as_ref().unwrap().active, "member 2 stopped");
    let b = w.nodes[1].as_ref().unwrap();
    assert_eq!(b.table.role(T), Some(TunnelRole::Standby));
    // Member 1 restarted above everything member 2 sent, by at most the unsynced jump
    // plus the 1.5 blocks member 2 had leased and not used.
    let last_b = w.esp.iter().rposition(|(m, _)| m.0 == 2).unwrap();
    let (who, first_a) = w.esp[last_b + 1];
    assert_eq!(who, MemberId(1));
    let skipped = first_a - w.esp[last_b].1 - 1;
    assert!(
        skipped <= DEFAULT_UNSYNCED_JUMP + BLOCK + BLOCK / 2,
        "skipped {skipped}"
    );
    let esp_before = w.esp.len();
    w.run(1_000);
    assert!(
        w.esp[esp_before..].iter().any(|(m, _)| m.0 == 1),
        "traffic flows from member 1"
    );
    assert!(w.esp[esp_before..].iter().all(|(m, _)| m.0 == 1));

    for pair in w.esp.windows(2) {
        assert!(pair[0].1 < pair[1].1, "{:?} then {:?}", pair[0], pair[1]);
    }
}

/// The split brain of [`primary_reclaims_the_tunnel_after_a_split_brain`] as hasyncd's FGCP
/// mode lives it: member 1 never stops being primary in its own view, so its ikemgr and
/// espd keep the tunnel (its counter stays where it was) while member 2 sends from member
/// 1's last lease upwards; member 1 claims the tunnel back on its next lease request and
/// again when member 2 steps down. Each claim back of a carried tunnel makes its counter
/// continue beyond member 2's recorded leases plus the unsynced jump: after the split
/// brain the peer sees only increasing numbers above everything sent before. (Without
/// the jump member 1 resumes its own counter, below numbers member 2 already sent.)
#[test]
fn a_primary_that_kept_the_tunnel_continues_beyond_the_split_brain() {
    let mut w = World::elected_pair(true);
    w.tunnel_up_on_member_1();
    w.run(2_000);
    assert!(w.sent_by(1) > 5_000);

    w.drop_hb_from = Some(0);
    w.run(1_600);
    assert_eq!(w.role(1), Some(HaRole::Primary), "{:#?}", w.log);
    assert_eq!(w.role(0), Some(HaRole::Primary));
    assert!(w.sent_by(2) > 0, "member 2 took the tunnel over");
    assert!(
        w.nodes[0].as_ref().unwrap().active,
        "member 1 keeps the tunnel (roles follow its FGCP role)"
    );

    w.drop_hb_from = None;
    w.run(2_000);
    assert_eq!(w.role(0), Some(HaRole::Primary));
    assert_eq!(w.role(1), Some(HaRole::Secondary));
    assert_eq!(
        w.nodes[0].as_ref().unwrap().table.role(T),
        Some(TunnelRole::SyncPrimary),
        "{:#?}",
        w.log
    );
    assert!(
        w.log.iter().any(|l| l.contains("Reclaimed")),
        "member 1 claimed the carried tunnel back: {:#?}",
        w.log
    );
    let last_b = w.esp.iter().rposition(|(m, _)| m.0 == 2).unwrap();
    let before_max = w.esp[..=last_b].iter().map(|(_, s)| *s).max().unwrap();
    let tail = &w.esp[last_b + 1..];
    assert!(
        tail.len() > 1_000,
        "member 1 carries the traffic after the split brain"
    );
    assert!(tail.iter().all(|(m, _)| m.0 == 1));
    assert!(
        tail[0].1 > before_max,
        "member 1 resumed at {} at or below {before_max}, a number the peer may have seen",
        tail[0].1
    );
    assert!(
        tail[0].1 - before_max - 1 <= 3 * (DEFAULT_UNSYNCED_JUMP + BLOCK + BLOCK / 2),
        "skipped {}",
        tail[0].1 - before_max - 1
    );
    for pair in tail.windows(2) {
        assert!(pair[0].1 < pair[1].1, "{:?} then {:?}", pair[0], pair[1]);
    }
    if std::env::var("FF_LOG").is_ok() {
        for l in w.log.iter().filter(|l| !l.contains("LeaseConfirmed")) {
            println!("{l}");
        }
    }
    println!(
        "after the split brain: member 2 sent up to {before_max}, member 1 continued at {} ({} skipped)",
        tail[0].1,
        tail[0].1 - before_max - 1
    );
}
