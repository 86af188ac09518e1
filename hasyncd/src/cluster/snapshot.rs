//! Snapshots to members that join or restart (Clone pattern over the HA links, issue 6
//! point 3): ha-core's windowed transfer ([`ha_core::snapshot`]) driven from the daemon
//! tick. The carrier sends everything it holds (IKE SAs, CHILD SAs, the tunnel table's
//! claims and leases) to the member that joined, unicast, at most [`DAEMON_WINDOW`] chunks
//! unacknowledged; the joiner holds the carrier's stream messages while the transfer runs
//! and applies them after the snapshot, in link-counter order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use bus_schema::schema::is_ike_mid_mark;
use ha_core::msg::{HaRole, SeqLease, SnapshotItem, SnapshotRequest};
use ha_core::snapshot::{Completed, SnapshotJoin, SnapshotSender};
use ha_core::{MemberId, Message, TunnelRole};

use super::{count_sent, ike_sync, sa_key, Cluster, Replica, HEARTBEAT_CHECK_EVERY};

/// Chunk body size. Much larger than one MTU: the chunks are IP-fragmented on the link,
/// and a lost fragment costs its chunk (sent again by go-back-N); with large chunks the
/// datagram count, which limits a tick-driven transfer, stays low (`ha_link_bench` shape 5:
/// 32 KB x 16 beat 1.4, 16 and 60 KB chunks on a loaded machine).
pub const DAEMON_CHUNK_BODY: usize = 32_000;
/// Chunks in flight per transfer. Acknowledgements are read once per 20 ms tick, so the
/// window is about what one tick may send: 16 x 32 KB.
pub const DAEMON_WINDOW: u32 = 16;
/// Go-back time: a round trip is two ticks or more on a loaded machine.
pub const DAEMON_RTO_MS: u64 = 300;

/// Transfers in both directions.
#[derive(Default)]
pub struct Snapshots {
    /// Outgoing transfers, by link.
    out: Vec<(&'static str, SnapshotSender)>,
    /// Incoming side per link and sending member.
    joins: BTreeMap<(&'static str, MemberId), SnapshotJoin>,
    /// Next transfer id (seeded from the clock at start, so ids do not repeat across
    /// restarts).
    next_id: u64,
    /// When the last chunk arrived (ms), for [`Snapshots::busy`].
    last_chunk_ms: Option<u64>,
}

/// While a transfer runs, the daemon is ticked this often instead of every 20 ms
/// ([`Snapshots::busy`], the daemon's `poll_timeout`): acknowledgements and chunks are
/// read and answered on a tick, so the tick period is most of a transfer's round trip.
pub const TRANSFER_TICK_MS: u64 = 4;
/// An incoming transfer counts as running while its chunks arrive at least this often.
const INCOMING_IDLE_MS: u64 = 500;

impl Snapshots {
    pub fn new(seed: u64) -> Self {
        Snapshots {
            next_id: seed,
            ..Default::default()
        }
    }

    /// Drops the outgoing transfers of `link` (its link was restarted).
    pub fn forget_link(&mut self, link: &'static str) {
        self.out.retain(|(l, _)| *l != link);
    }

    /// Whether a transfer runs in either direction: an outgoing one not yet acknowledged or
    /// abandoned, or chunks that arrived within [`INCOMING_IDLE_MS`].
    pub fn busy(&self, now_ms: u64) -> bool {
        !self.out.is_empty()
            || self
                .last_chunk_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < INCOMING_IDLE_MS)
    }

    /// Whether a transfer to `to` over `link` is under way (not yet fully acknowledged).
    pub fn sending_to(&self, link: &'static str, to: MemberId) -> bool {
        self.out
            .iter()
            .any(|(l, s)| *l == link && s.to() == to && !s.is_done())
    }
}

/// Whether a tunnel-table message addressed to one member only restates what a snapshot
/// carries (the claims and marks `TunnelTable::peer_joined` / `resync_peer` send to a
/// member that joined): redundant while a snapshot to that member is under way, whose
/// items were taken from the same table, with every later change following on the stream.
/// Sent anyway, they were one datagram each, two per tunnel: 200 000 datagrams in one
/// tick for 100 000 tunnels, held by the joiner (which abandoned the snapshot when it held
/// too many) and crowding out the heartbeats. Lease acknowledgements are never dropped.
pub fn restates_snapshot(msg: &Message) -> bool {
    matches!(msg, Message::Ownership(_) | Message::SeqLease(_))
}

/// Whether a sync message is part of the state a snapshot carries (held during a transfer).
pub fn gated(msg: &Message) -> bool {
    matches!(
        msg,
        Message::IkeSa(_)
            | Message::IkeMsgId(_)
            | Message::ChildSa(_)
            | Message::Delete(_)
            | Message::SeqLease(_)
            | Message::Ownership(_)
    )
}

/// The marks of `held` that `named` (a snapshot's) lacks or has lower, as leases to send.
fn marks_missing_from<'a>(
    held: impl Iterator<Item = (&'a str, u32, u64)>,
    named: &BTreeMap<(String, u32), u64>,
) -> Vec<SeqLease> {
    held.filter(|(tunnel, spi, hw)| {
        *hw > 0
            && named
                .get(&((*tunnel).to_string(), *spi))
                .is_none_or(|n| n < hw)
    })
    .map(|(tunnel, spi_out, seq_hw)| SeqLease {
        tunnel: tunnel.to_string(),
        spi_out,
        seq_hw,
    })
    .collect()
}

impl Cluster {
    /// Everything this member would send to a member joining over `link`, filtered as the
    /// stream is (`send_sync`).
    fn snapshot_items(&self, link: &'static str) -> Vec<SnapshotItem> {
        let fgsp_mode = self.fgsp_mode();
        let keep = |tunnel: &str, phase1: &str| -> bool {
            if self.fgsp_role(tunnel) == Some(TunnelRole::Standby) {
                return false;
            }
            if link != "fgsp" {
                return true;
            }
            if fgsp_mode {
                self.syncs(tunnel)
            } else {
                self.fgsp_sync.contains(phase1)
            }
        };
        let mut items: Vec<SnapshotItem> = self
            .ike_local
            .values()
            .filter(|r| keep(&r.tunnel, &r.phase1))
            .map(|r| SnapshotItem::IkeSa(ike_sync(r)))
            .collect();
        items.extend(
            self.local
                .values()
                .filter(|sa| keep(&sa.tunnel, &sa.phase1))
                .cloned()
                .map(SnapshotItem::ChildSa),
        );
        // The claims and leases of the table that runs on `link` (an FGCP cluster's primary
        // keeps a separate one for the FGSP link).
        let table = if link == "fgsp" && self.fgsp_table.is_some() {
            self.fgsp_table.as_ref()
        } else if link == "fgcp" || fgsp_mode {
            self.table.as_ref()
        } else {
            None
        };
        if let Some(t) = table {
            items.extend(t.snapshot_items());
        }
        items
    }

    /// Starts a transfer of everything this member carries to `to` over `link` (replacing
    /// one under way to it), with the receiver's id if it asked, else a new one.
    pub(super) fn start_snapshot(
        &mut self,
        link: &'static str,
        to: MemberId,
        request_id: Option<u64>,
        now_ms: u64,
    ) {
        let as_of = match link {
            "fgcp" => self.fgcp.as_ref().map(|s| s.link.next_counter()),
            _ => self
                .fgsp
                .as_ref()
                .filter(|s| s.active)
                .map(|s| s.link.next_counter()),
        };
        let Some(as_of) = as_of else { return };
        let items = self.snapshot_items(link);
        // Taking 100 000 records holds the tick for a few hundred ms.
        self.keep_heartbeats();
        let n = items.len();
        let id = request_id.unwrap_or_else(|| {
            self.snap.next_id = self.snap.next_id.wrapping_add(1);
            self.snap.next_id
        });
        match SnapshotSender::new(to, id, as_of, items, DAEMON_CHUNK_BODY, now_ms) {
            Ok(s) => {
                tracing::info!("{link}: snapshot to member {} ({n} records)", to.0);
                self.snap.out.retain(|(l, o)| !(*l == link && o.to() == to));
                self.snap.out.push((
                    link,
                    s.with_window(DAEMON_WINDOW)
                        .with_retransmit_ms(DAEMON_RTO_MS),
                ));
                metrics::counter!("hasyncd_snapshots_sent_total", "link" => link).increment(1);
            }
            Err(e) => tracing::error!("{link}: snapshot to member {}: {e}", to.0),
        }
    }

    /// Sends a message to one member over `link` (FGCP: to the address it was heard from),
    /// sealed off the stream: the other members never see it and must find no gap.
    pub(super) fn send_to_member(&mut self, link: &'static str, to: MemberId, msg: &Message) {
        if link == "fgcp" {
            let Some(side) = self.fgcp.as_mut() else {
                return;
            };
            let Some(addr) = side.addrs.get(&to).copied() else {
                return;
            };
            match side.link.seal_for_one(msg) {
                Ok(d) => match side.sock.send_to(&d, addr) {
                    Ok(()) => count_sent("fgcp", d.len()),
                    Err(e) => tracing::debug!("snapshot send to {addr}: {e}"),
                },
                Err(e) => tracing::error!("snapshot seal: {e}"),
            }
        } else {
            let Some(side) = self.fgsp.as_mut().filter(|s| s.active) else {
                return;
            };
            let addrs: Vec<SocketAddr> = side
                .peers
                .iter()
                .filter(|p| p.id == Some(to))
                .map(|p| SocketAddr::V4(p.addr))
                .collect();
            if addrs.is_empty() {
                return;
            }
            match side.link.seal_for_one(msg) {
                Ok(d) => {
                    for a in addrs {
                        match side.sock.send_to(&d, a) {
                            Ok(()) => count_sent("fgsp", d.len()),
                            Err(e) => tracing::debug!("snapshot send to {a}: {e}"),
                        }
                    }
                }
                Err(e) => tracing::error!("snapshot seal: {e}"),
            }
        }
    }

    /// A received sync message: snapshot chunks and acknowledgements go to the transfers,
    /// state updates through the joiner's gate, the rest straight to `process`.
    pub(super) fn receive(
        &mut self,
        from: MemberId,
        link: &'static str,
        epoch: u64,
        counter: u64,
        msg: Message,
        now_ms: u64,
    ) {
        match msg {
            Message::SnapshotChunk(c) => {
                self.snap.last_chunk_ms = Some(now_ms);
                let join = self.snap.joins.entry((link, from)).or_default();
                let (ack, done) = join.chunk(from, epoch, c);
                self.send_to_member(link, from, &Message::SnapshotRequest(ack));
                if let Some(done) = done {
                    self.apply_snapshot(link, done);
                }
            }
            Message::SnapshotRequest(r) => {
                let mut ours = false;
                for (l, s) in self.snap.out.iter_mut() {
                    if *l == link && s.handle_ack(from, &r, now_ms) {
                        ours = true;
                    }
                }
                if !ours && r.next == 0 {
                    // The member asks for a (new) snapshot.
                    self.start_snapshot(link, from, Some(r.request_id), now_ms);
                }
            }
            msg if gated(&msg) => {
                let join = self.snap.joins.entry((link, from)).or_default();
                let (apply, again) = join.stream(epoch, counter, msg);
                if let Some(again) = again {
                    tracing::warn!("{link}: snapshot from member {} abandoned (too many updates held); asking again", from.0);
                    self.send_to_member(link, from, &Message::SnapshotRequest(again));
                }
                for m in apply {
                    self.process(from, link, m);
                }
            }
            msg => self.process(from, link, msg),
        }
    }

    /// A complete snapshot from `done.snapshot.from`: its records replace what this member
    /// held from it, then the newer stream messages follow.
    fn apply_snapshot(&mut self, link: &'static str, done: Completed) {
        let from = done.snapshot.from;
        // Whatever was lost before it is replaced by it.
        if link == "fgcp" {
            if let Some(side) = self.fgcp.as_mut() {
                side.loss.covered(from);
            }
            self.reclaim_due = true;
        } else if let Some(side) = self.fgsp.as_mut() {
            side.loss.covered(from);
        }
        let fgsp_mode = self.fgsp_mode();
        self.replicas
            .retain(|_, r| !(r.from == from && r.link == link));
        self.ike_replicas.retain(|_, (f, _)| *f != from);
        let (mut ike, mut child) = (0usize, 0usize);
        let mut ike_tunnels: Vec<String> = Vec::new();
        // The table the snapshot goes to (the FGSP table of an FGCP cluster over FGSP, or
        // the member's own), and the tunnels it names.
        let over = link == "fgsp" && self.fgsp_table.is_some();
        let to_table = over || link == "fgcp" || fgsp_mode;
        let mut listed: BTreeSet<String> = BTreeSet::new();
        // The RFC 6311 sync marks the snapshot names (see below).
        let mut named_marks: BTreeMap<(String, u32), u64> = BTreeMap::new();
        // By value: the records move into the copies (100 000 of them: no second copy).
        for (i, item) in done.snapshot.items.into_iter().enumerate() {
            if i % HEARTBEAT_CHECK_EVERY == HEARTBEAT_CHECK_EVERY - 1 {
                self.keep_heartbeats();
            }
            let tunnel = match &item {
                SnapshotItem::IkeSa(s) => &s.tunnel,
                SnapshotItem::ChildSa(sa) => &sa.tunnel,
                SnapshotItem::Lease(l) => &l.tunnel,
                SnapshotItem::Ownership(c) => &c.tunnel,
            };
            if link == "fgsp" && (fgsp_mode || over) && !self.syncs(tunnel) {
                continue;
            }
            if let SnapshotItem::Lease(l) = &item {
                if is_ike_mid_mark(l.spi_out) {
                    named_marks.insert((l.tunnel.clone(), l.spi_out), l.seq_hw);
                }
            }
            let table = if over {
                self.fgsp_table.as_mut()
            } else {
                self.table.as_mut().filter(|_| to_table)
            };
            if let Some(t) = table {
                t.apply_snapshot_item(from, &item);
                if !listed.contains(tunnel) {
                    listed.insert(tunnel.clone());
                }
            }
            match item {
                SnapshotItem::IkeSa(s) => {
                    ike += 1;
                    ike_tunnels.push(s.tunnel.clone());
                    self.ike_replicas.insert(s.tunnel.clone(), (from, s));
                }
                SnapshotItem::ChildSa(sa) => {
                    child += 1;
                    self.replicas.insert(
                        sa_key(&sa.tunnel, sa.spi_in),
                        Replica {
                            from,
                            link,
                            sa,
                            received_ms: self.now_ms,
                        },
                    );
                }
                SnapshotItem::Lease(_) | SnapshotItem::Ownership(_) => {}
            }
        }
        // Tunnels of the sender it no longer names were deleted there and their deletions
        // lost (the resync after a loss): they go, as their copies went above.
        let table = if over {
            self.fgsp_table.as_mut()
        } else {
            self.table.as_mut().filter(|_| to_table)
        };
        // RFC 6311 sync marks recorded here that the sender lacks: a member that synced an
        // AEAD IKE SA while it missed the sender's heartbeats (a split brain) had nobody but
        // itself to record the mark, and a sender without it would let its ikemgr sync the
        // SA a second time, which the peer answers by deleting it (the thirteenth session's
        // `--ha-link` fault run: strongSwan dropped all four tunnels). They go back to the
        // sender as leases, which every member records whoever owns the tunnel; a lost one
        // goes again after the sender's next snapshot.
        let restate = marks_missing_from(
            table
                .iter()
                .flat_map(|t| t.marks())
                .filter(|(_, spi, _)| is_ike_mid_mark(*spi)),
            &named_marks,
        );
        let forgot = table.map_or(0, |t| t.forget_unlisted(from, &listed));
        tracing::info!(
            "{link}: snapshot from member {} applied: {ike} IKE SAs, {child} CHILD SAs, then {} newer updates{}",
            from.0,
            done.then.len(),
            if forgot > 0 {
                format!("; {forgot} tunnels it no longer has forgotten")
            } else {
                String::new()
            }
        );
        metrics::counter!("hasyncd_snapshots_received_total", "link" => link).increment(1);
        if !restate.is_empty() {
            tracing::info!(
                "{link}: the snapshot from member {} lacked {} RFC 6311 sync marks recorded here: sent back to it",
                from.0,
                restate.len()
            );
            for lease in restate {
                self.send_to_member(link, from, &Message::SeqLease(lease));
            }
        }
        self.roles_dirty = true;
        // Copies of IKE SAs this member carries itself, later than its own (the sender
        // carried them too for a while): ikemgr continues at their message IDs.
        for tunnel in ike_tunnels {
            self.take_later_copy(&tunnel);
        }
        for m in done.then {
            self.process(from, link, m);
        }
        metrics::gauge!("hasyncd_standby_child_sas").set(self.replicas.len() as f64);
    }

    /// FGCP secondary: sync datagrams from the primary were lost (a record or a deletion
    /// may be missing here): asks it for a snapshot, which replaces every copy it sent
    /// ([`super::resync`]). Losses from other members, or on a primary, are only counted
    /// down: their stream carries nothing this member keeps.
    pub(super) fn resync_lost(&mut self, now_ms: u64) {
        self.resync_lost_fgsp(now_ms);
        let secondary = self.fgcp_role() == Some(HaRole::Secondary);
        let Some(side) = self.fgcp.as_mut() else {
            return;
        };
        let lost = side.loss.take_lost(now_ms);
        if !secondary {
            return;
        }
        let from_primary: Vec<(MemberId, u64)> = lost
            .into_iter()
            .filter(|(from, _)| side.peer_roles.get(from) == Some(&HaRole::Primary))
            .collect();
        for (from, n) in from_primary {
            if self.ask_snapshot("fgcp", from, n) {
                return;
            }
        }
    }

    /// Asks `from` over `link` for a snapshot after `n` of its datagrams were lost, unless
    /// one from it is under way (it covers them); returns whether it asked.
    fn ask_snapshot(&mut self, link: &'static str, from: MemberId, n: u64) -> bool {
        if self
            .snap
            .joins
            .get(&(link, from))
            .is_some_and(|j| j.in_progress())
        {
            return false;
        }
        self.snap.next_id = self.snap.next_id.wrapping_add(1);
        let req = SnapshotRequest {
            request_id: self.snap.next_id,
            next: 0,
        };
        let who = if link == "fgcp" { "primary" } else { "peer" };
        tracing::info!(
            "{link}: {n} datagrams from {who} {} lost; asking it for a snapshot",
            from.0
        );
        metrics::counter!("hasyncd_resyncs_total", "link" => link).increment(1);
        self.send_to_member(link, from, &Message::SnapshotRequest(req));
        true
    }

    /// FGSP: sync datagrams from peers were lost (a record or a deletion of a tunnel one
    /// owns may be missing here): asks each for a snapshot, which replaces every copy it
    /// sent ([`super::resync::fgsp_resync`]).
    fn resync_lost_fgsp(&mut self, now_ms: u64) {
        let Some(side) = self.fgsp.as_mut().filter(|s| s.active) else {
            return;
        };
        let lost = side.loss.take_lost(now_ms);
        let live: Vec<MemberId> = side.live.peers().collect();
        for (from, n) in super::resync::fgsp_resync(&lost, &live) {
            self.ask_snapshot("fgsp", from, n);
        }
    }

    /// Sends what the transfers may send now; drops finished and abandoned ones.
    pub(super) fn run_snapshots(&mut self, now_ms: u64) {
        let mut sends: Vec<(&'static str, MemberId, Message)> = Vec::new();
        self.snap.out.retain_mut(|(link, s)| {
            if s.is_done() {
                tracing::info!(
                    "{link}: snapshot to member {} acknowledged ({} chunks, {} go-back-N restarts)",
                    s.to().0,
                    s.chunk_count(),
                    s.retransmissions()
                );
                return false;
            }
            if let Some(e) = s.failed() {
                tracing::error!("{link}: snapshot to member {} abandoned: {e}", s.to().0);
                return false;
            }
            if s.is_stalled(now_ms) {
                tracing::warn!(
                    "{link}: snapshot to member {} abandoned (no acknowledgement)",
                    s.to().0
                );
                return false;
            }
            while let Some(c) = s.poll_transmit(now_ms) {
                sends.push((link, s.to(), Message::SnapshotChunk(c)));
            }
            true
        });
        for (link, to, msg) in sends {
            self.send_to_member(link, to, &msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::schema::ike_mid_mark_spi;

    /// A member that synced an AEAD IKE SA during a split brain holds its mark alone; the
    /// primary's next snapshot lacks it, and the mark goes back to the primary (a mark
    /// the snapshot names as high, and sequence marks, do not).
    #[test]
    fn marks_a_snapshot_lacks_are_sent_back() {
        let mark = ike_mid_mark_spi(0x1bb5_b152_0d66_9bf7, 0x4297_0f53_cd64_e445);
        let other = ike_mid_mark_spi(7, 8);
        let held = [
            ("vpn1_18", mark, 4),
            ("vpn1_2", other, 4),
            ("vpn1_34", other, 6),
            ("vpn1_50", other, 0),
        ];
        let mut named = BTreeMap::new();
        named.insert(("vpn1_2".to_string(), other), 4);
        named.insert(("vpn1_34".to_string(), other), 5);
        let back = marks_missing_from(held.iter().copied(), &named);
        assert_eq!(
            back,
            vec![
                SeqLease {
                    tunnel: "vpn1_18".into(),
                    spi_out: mark,
                    seq_hw: 4
                },
                SeqLease {
                    tunnel: "vpn1_34".into(),
                    spi_out: other,
                    seq_hw: 6
                },
            ]
        );
        assert!(is_ike_mid_mark(mark) && is_ike_mid_mark(other));
    }
}
