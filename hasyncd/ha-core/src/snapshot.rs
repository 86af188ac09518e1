//! Windowed snapshot transfer to a member that joins or restarts (Clone pattern, DESIGN.md
//! §3.3, issue 6 point 3).
//!
//! The sender ([`SnapshotSender`]) cuts everything it holds into [`SnapshotChunk`]s of at
//! most [`CHUNK_BODY`] bytes, taken at its link counter `as_of`, and keeps at most
//! [`WINDOW`] chunks unacknowledged. The receiver acknowledges with a [`SnapshotRequest`]
//! whose `next` is the first chunk it does not have (it keeps chunks in order only); after
//! [`RETRANSMIT_MS`] without progress the sender goes back to the first unacknowledged chunk
//! (go-back-N), and gives up after [`GIVE_UP_MS`] without an acknowledgement (the member is
//! gone; it gets a new snapshot when it is heard again).
//!
//! Ordering ([`SnapshotJoin`], one per sending member): stream messages (sync updates sent
//! outside the snapshot) carry the link counter of their datagram. While a transfer is under
//! way they are held; when the last chunk arrives the receiver applies the snapshot and then
//! every held or recently applied stream message whose counter is at or above `as_of`, in
//! counter order. A change made on the sender during the transfer is therefore neither lost
//! nor overwritten by the older snapshot. Re-applying a recent update is harmless: every
//! update is a whole record, a deletion or a mark merged by maximum.
//!
//! Chunks are sealed when sent, each (re)transmission with a fresh link counter, so a
//! retransmission is never taken for a replay.

use std::collections::VecDeque;

use crate::error::{HaError, Result};
use crate::msg::{
    chunk_budget, encoded_len, Message, Snapshot, SnapshotChunk, SnapshotItem, SnapshotRequest,
};
use crate::wire::MemberId;

/// Chunks in flight without acknowledgement (64 x 1 400 bytes stays well inside a default
/// Linux UDP receive buffer).
pub const WINDOW: u32 = 64;
/// Largest chunk body: with the link's 40 bytes of header and tag and the UDP/IP headers a
/// datagram fits a 1 500-byte MTU without fragmentation.
pub const CHUNK_BODY: usize = 1_400;
/// Silence after which the sender goes back to the first unacknowledged chunk.
pub const RETRANSMIT_MS: u64 = 100;
/// Silence after which the sender abandons the transfer.
pub const GIVE_UP_MS: u64 = 10_000;
/// Stream messages held per sender during a transfer before it is abandoned (and a new one
/// requested): bounds the receiver's memory.
pub const MAX_HELD: usize = 65_536;
/// Stream messages remembered per sender after they were applied, to re-apply those newer
/// than a snapshot that arrives later (the link's replay window: older ones are dropped).
pub const RECENT: usize = crate::replay::WINDOW as usize;

/// One outgoing transfer. Chunks are cut from the items as the window reaches them (not
/// all up front): sizing and cutting 300 000 records at once held a daemon tick for about
/// half a second, during which no heartbeat was sent or read.
#[derive(Debug)]
pub struct SnapshotSender {
    to: MemberId,
    request_id: u64,
    as_of: u64,
    budget: usize,
    /// Items not cut into a chunk yet, and the one that did not fit the last chunk (with
    /// its encoded length).
    rest: std::vec::IntoIter<SnapshotItem>,
    carry: Option<(SnapshotItem, usize)>,
    /// Chunks cut so far (kept for go-back-N).
    chunks: Vec<SnapshotChunk>,
    /// The last chunk is cut.
    cut_all: bool,
    /// An item could not be encoded or does not fit a chunk: the transfer cannot finish.
    failed: Option<String>,
    scratch: Vec<u8>,
    window: u32,
    rto_ms: u64,
    acked: u32,
    next: u32,
    retransmit_at_ms: u64,
    last_ack_ms: u64,
    retransmissions: u64,
}

impl SnapshotSender {
    /// A transfer of `items` to `to`, taken at the sender's link counter `as_of` (its
    /// `next_counter()` now, before any chunk is sealed), in chunks of at most `max_body`
    /// bytes ([`CHUNK_BODY`] to avoid IP fragmentation). An item that cannot be sent (too
    /// large for a chunk) shows when the window reaches it: [`SnapshotSender::failed`].
    pub fn new(
        to: MemberId,
        request_id: u64,
        as_of: u64,
        items: impl IntoIterator<Item = SnapshotItem>,
        max_body: usize,
        now_ms: u64,
    ) -> Result<Self> {
        Ok(SnapshotSender {
            to,
            request_id,
            as_of,
            budget: chunk_budget(max_body),
            rest: items.into_iter().collect::<Vec<_>>().into_iter(),
            carry: None,
            chunks: Vec::new(),
            cut_all: false,
            failed: None,
            scratch: Vec::new(),
            window: WINDOW,
            rto_ms: RETRANSMIT_MS,
            acked: 0,
            next: 0,
            retransmit_at_ms: now_ms.saturating_add(RETRANSMIT_MS),
            last_ack_ms: now_ms,
            retransmissions: 0,
        })
    }

    /// Another window than [`WINDOW`] (at least 1): a sender that sees acknowledgements only
    /// once per daemon tick needs a larger one for the same rate.
    pub fn with_window(mut self, window: u32) -> Self {
        self.window = window.max(1);
        self
    }

    /// Another go-back time than [`RETRANSMIT_MS`] (a sender reading acknowledgements once
    /// per tick on a loaded machine sees round trips of several ticks).
    pub fn with_retransmit_ms(mut self, ms: u64) -> Self {
        self.rto_ms = ms.max(1);
        self
    }

    /// The receiving member.
    pub fn to(&self) -> MemberId {
        self.to
    }

    /// The transfer's id (echoed in the acknowledgements).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Number of chunks cut so far (all of them once the last one was sent).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Records not yet cut into a chunk.
    pub fn items_left(&self) -> usize {
        self.rest.len() + usize::from(self.carry.is_some())
    }

    /// Go-back-N restarts so far.
    pub fn retransmissions(&self) -> u64 {
        self.retransmissions
    }

    /// Why the transfer cannot finish (an item too large for a chunk, or not encodable).
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// An acknowledgement from `from`. Returns whether it belonged to this transfer.
    pub fn handle_ack(&mut self, from: MemberId, ack: &SnapshotRequest, now_ms: u64) -> bool {
        if from != self.to || ack.request_id != self.request_id {
            return false;
        }
        // Only chunks that exist can be acknowledged.
        if ack.next > self.acked && ack.next <= self.cut() {
            self.acked = ack.next;
            self.next = self.next.max(self.acked);
            self.last_ack_ms = now_ms;
            self.retransmit_at_ms = now_ms.saturating_add(self.rto_ms);
        }
        true
    }

    /// The next chunk to seal and send now, if the window allows one.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<SnapshotChunk> {
        if self.next > self.acked && now_ms >= self.retransmit_at_ms {
            self.next = self.acked;
            self.retransmit_at_ms = now_ms.saturating_add(self.rto_ms);
            self.retransmissions += 1;
        }
        if self.next >= self.acked.saturating_add(self.window) {
            return None;
        }
        if self.next >= self.cut() && !self.cut_next() {
            return None;
        }
        let chunk = self.chunks.get(self.next as usize)?.clone();
        self.next += 1;
        Some(chunk)
    }

    /// Every chunk acknowledged.
    pub fn is_done(&self) -> bool {
        self.cut_all && self.acked >= self.cut()
    }

    /// No acknowledgement for [`GIVE_UP_MS`].
    pub fn is_stalled(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_ack_ms) >= GIVE_UP_MS
    }

    fn cut(&self) -> u32 {
        // At most MAX_SNAPSHOT_CHUNKS-ish in practice; saturate rather than wrap.
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// Cuts the next chunk (as `snapshot_chunks` would). Returns false when every chunk is
    /// cut already or an item cannot be sent.
    fn cut_next(&mut self) -> bool {
        if self.cut_all || self.failed.is_some() {
            return false;
        }
        let mut items = Vec::new();
        let mut len = 0usize;
        loop {
            let (item, n) = match self.carry.take() {
                Some(c) => c,
                None => match self.rest.next() {
                    None => break,
                    Some(item) => match encoded_len(&mut self.scratch, &item) {
                        Ok(n) => (item, n),
                        Err(e) => {
                            self.failed = Some(e.to_string());
                            return false;
                        }
                    },
                },
            };
            if n > self.budget {
                self.failed = Some(HaError::TooLarge(n).to_string());
                return false;
            }
            if len + n > self.budget {
                self.carry = Some((item, n));
                break;
            }
            len += n;
            items.push(item);
        }
        let last = self.carry.is_none() && self.rest.len() == 0;
        self.chunks.push(SnapshotChunk {
            request_id: self.request_id,
            index: self.cut(),
            last,
            as_of: self.as_of,
            items,
        });
        self.cut_all = last;
        true
    }
}

/// A complete snapshot and the stream messages to apply after it, in order.
#[derive(Debug)]
pub struct Completed {
    /// The snapshot (apply it first, replacing what came from its sender).
    pub snapshot: Snapshot,
    /// Stream messages newer than the snapshot, in counter order.
    pub then: Vec<Message>,
}

#[derive(Debug)]
struct Incoming {
    epoch: u64,
    request_id: u64,
    next: u32,
    as_of: u64,
    items: Vec<SnapshotItem>,
}

/// The receiving side of one sending member: its transfer in progress and its stream.
#[derive(Debug, Default)]
pub struct SnapshotJoin {
    epoch: u64,
    recent: VecDeque<(u64, Message)>,
    held: Vec<(u64, Message)>,
    rx: Option<Incoming>,
}

impl SnapshotJoin {
    /// Whether a transfer from this sender is under way.
    pub fn in_progress(&self) -> bool {
        self.rx.is_some()
    }

    fn set_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch {
            // The sender restarted: its counters start again, nothing old compares.
            self.epoch = epoch;
            self.recent.clear();
            self.held.clear();
            self.rx = None;
        }
    }

    /// A stream message from this sender (epoch and counter of its datagram). Returns it if
    /// it is to be applied now; `None` if it is held until the transfer completes. If too
    /// many are held the transfer is abandoned: the held messages come back in order (apply
    /// them) with a request for a new snapshot to send.
    pub fn stream(
        &mut self,
        epoch: u64,
        counter: u64,
        msg: Message,
    ) -> (Vec<Message>, Option<SnapshotRequest>) {
        self.set_epoch(epoch);
        if let Some(rx) = &self.rx {
            if self.held.len() < MAX_HELD {
                self.held.push((counter, msg));
                return (Vec::new(), None);
            }
            let again = SnapshotRequest {
                request_id: rx.request_id.wrapping_add(1),
                next: 0,
            };
            self.rx = None;
            let mut held = std::mem::take(&mut self.held);
            held.push((counter, msg));
            held.sort_by_key(|(c, _)| *c);
            for (c, m) in &held {
                self.remember(*c, m.clone());
            }
            return (held.into_iter().map(|(_, m)| m).collect(), Some(again));
        }
        self.remember(counter, msg.clone());
        (vec![msg], None)
    }

    fn remember(&mut self, counter: u64, msg: Message) {
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((counter, msg));
    }

    /// A chunk from this sender. Returns the acknowledgement to send back (always, so the
    /// sender learns where the receiver is) and, with the last chunk, the snapshot.
    pub fn chunk(
        &mut self,
        from: MemberId,
        epoch: u64,
        chunk: SnapshotChunk,
    ) -> (SnapshotRequest, Option<Completed>) {
        self.set_epoch(epoch);
        let same = self
            .rx
            .as_ref()
            .is_some_and(|r| r.request_id == chunk.request_id && r.epoch == epoch);
        if !same {
            if chunk.index != 0 {
                let ack = SnapshotRequest {
                    request_id: chunk.request_id,
                    next: 0,
                };
                return (ack, None);
            }
            // A new transfer replaces an unfinished one; held messages stay held (those
            // older than its snapshot are dropped at completion).
            self.rx = Some(Incoming {
                epoch,
                request_id: chunk.request_id,
                next: 0,
                as_of: chunk.as_of,
                items: Vec::new(),
            });
        }
        let Some(rx) = self.rx.as_mut() else {
            // Set just above.
            return (SnapshotRequest::default(), None);
        };
        if chunk.index == rx.next && chunk.index < crate::msg::MAX_SNAPSHOT_CHUNKS {
            rx.next += 1;
            rx.as_of = rx.as_of.min(chunk.as_of);
            let last = chunk.last;
            rx.items.extend(chunk.items);
            if last {
                let ack = SnapshotRequest {
                    request_id: rx.request_id,
                    next: rx.next,
                };
                let as_of = rx.as_of;
                let items = std::mem::take(&mut rx.items);
                self.rx = None;
                let mut then: Vec<(u64, Message)> = self
                    .recent
                    .iter()
                    .filter(|(c, _)| *c >= as_of)
                    .cloned()
                    .collect();
                let held = std::mem::take(&mut self.held);
                for (c, m) in held {
                    if c >= as_of {
                        then.push((c, m.clone()));
                    }
                    self.remember(c, m);
                }
                then.sort_by_key(|(c, _)| *c);
                then.dedup_by_key(|(c, _)| *c);
                let done = Completed {
                    snapshot: Snapshot { from, as_of, items },
                    then: then.into_iter().map(|(_, m)| m).collect(),
                };
                return (ack, Some(done));
            }
        }
        let ack = SnapshotRequest {
            request_id: rx.request_id,
            next: rx.next,
        };
        (ack, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::tests::child_sa;
    use crate::msg::{ChildSaSync, DeleteSync};
    use std::collections::BTreeMap;

    /// A deterministic lossy, reordering-free datagram channel (xorshift PRNG).
    struct Lossy {
        state: u64,
        loss_percent: u64,
    }

    impl Lossy {
        fn pass(&mut self) -> bool {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % 100 >= self.loss_percent
        }
    }

    /// The replica state a receiver builds from one sender.
    #[derive(Default, PartialEq, Debug)]
    struct State(BTreeMap<(String, u32), ChildSaSync>);

    impl State {
        fn apply(&mut self, m: &Message) {
            match m {
                Message::ChildSa(sa) => {
                    self.0.insert((sa.tunnel.clone(), sa.spi_in), sa.clone());
                }
                Message::Delete(DeleteSync::ChildSa { tunnel, spi_in }) => {
                    self.0.remove(&(tunnel.clone(), *spi_in));
                }
                _ => {}
            }
        }
        fn apply_item(&mut self, i: &SnapshotItem) {
            if let SnapshotItem::ChildSa(sa) = i {
                self.apply(&Message::ChildSa(sa.clone()));
            }
        }
    }

    /// Runs a transfer of `n` CHILD SAs over a channel losing `loss` % of datagrams in both
    /// directions while the sender keeps changing records (updates and deletions sent as
    /// stream messages on the same lossy channel, so some are lost too and the receiver may
    /// legitimately miss those). Returns the sender's final records and the receiver's.
    fn run(n: u32, loss: u64) -> (State, State, u64) {
        let mut net = Lossy {
            state: 0x9e37_79b9_7f4a_7c15,
            loss_percent: loss,
        };
        let (a, b) = (MemberId(1), MemberId(2));
        let mut owner = State::default();
        for i in 0..n {
            owner.apply(&Message::ChildSa(child_sa(&format!("vpn1_{i}"), i)));
        }
        let mut counter = 100u64;
        let items: Vec<SnapshotItem> = owner
            .0
            .values()
            .cloned()
            .map(SnapshotItem::ChildSa)
            .collect();
        let mut tx = SnapshotSender::new(b, 7, counter, items, CHUNK_BODY, 0).unwrap();
        let mut join = SnapshotJoin::default();
        let mut replica = State::default();
        let mut now = 0u64;
        let mut done = false;
        let mut changes = 0u32;
        while !done {
            assert!(now < 600_000, "transfer did not finish");
            now += 10;
            // A change on the owner every tick, sent reliably as a stream message (the
            // stream's own loss is the link's business, not the snapshot's): it must end up
            // applied after the snapshot, never under it.
            let i = changes % n;
            changes += 1;
            let msg = if changes % 3 == 0 {
                Message::Delete(DeleteSync::ChildSa {
                    tunnel: format!("vpn1_{i}"),
                    spi_in: i,
                })
            } else {
                let mut sa = child_sa(&format!("vpn1_{i}"), i);
                sa.replay_window = changes;
                Message::ChildSa(sa)
            };
            owner.apply(&msg);
            let (apply, _) = join.stream(1, counter, msg);
            counter += 1;
            for m in &apply {
                replica.apply(m);
            }
            while let Some(c) = tx.poll_transmit(now) {
                counter += 1;
                if !net.pass() {
                    continue;
                }
                let (ack, complete) = join.chunk(a, 1, c);
                if let Some(done_) = complete {
                    replica.0.retain(|_, _| false);
                    for i in &done_.snapshot.items {
                        replica.apply_item(i);
                    }
                    for m in &done_.then {
                        replica.apply(m);
                    }
                    done = true;
                }
                if net.pass() {
                    tx.handle_ack(b, &ack, now);
                }
            }
        }
        (owner, replica, tx.retransmissions())
    }

    #[test]
    fn a_lossy_transfer_delivers_everything_with_changes_in_order() {
        let (owner, replica, retransmissions) = run(3_000, 20);
        assert!(retransmissions > 0, "the channel lost nothing");
        assert_eq!(owner.0.len(), replica.0.len());
        assert!(owner == replica, "replica differs from the owner");
    }

    #[test]
    fn without_loss_nothing_is_retransmitted() {
        let (owner, replica, retransmissions) = run(500, 0);
        assert_eq!(retransmissions, 0);
        assert!(owner == replica);
    }

    #[test]
    fn a_chunk_of_an_unknown_transfer_asks_for_its_start() {
        let mut join = SnapshotJoin::default();
        let c = SnapshotChunk {
            request_id: 4,
            index: 3,
            last: false,
            as_of: 0,
            items: vec![],
        };
        let (ack, done) = join.chunk(MemberId(1), 1, c);
        assert_eq!(ack.next, 0);
        assert!(done.is_none());
        assert!(!join.in_progress());
    }

    /// Every chunk of a transfer, acknowledging as they come (window `window`); checks that
    /// the window bounds what is cut, not only what is sent.
    fn drain(tx: &mut SnapshotSender, window: usize) -> Vec<SnapshotChunk> {
        let mut got = Vec::new();
        while !tx.is_done() {
            let before = got.len();
            while let Some(c) = tx.poll_transmit(1) {
                got.push(c);
            }
            assert!(got.len() - before <= window);
            assert_eq!(tx.chunk_count(), got.len());
            let ack = SnapshotRequest {
                request_id: 9,
                next: u32::try_from(got.len()).unwrap(),
            };
            assert!(tx.handle_ack(MemberId(2), &ack, 2));
        }
        got
    }

    /// Chunks cut as the window reaches them are those `snapshot_chunks` cuts at once
    /// (every count of items up to 40, so that the last item is sometimes the one that did
    /// not fit the previous chunk); an item too large for a chunk fails the transfer when
    /// it is reached.
    #[test]
    fn chunks_are_cut_lazily_as_snapshot_chunks_cuts_them() {
        let items: Vec<SnapshotItem> = (0..300u32)
            .map(|i| {
                let mut sa = child_sa(&format!("vpn1_{i}"), i);
                sa.phase2 = "p".repeat((i % 17) as usize * 20);
                SnapshotItem::ChildSa(sa)
            })
            .collect();
        for n in (0..=40).chain([300]) {
            let items: Vec<SnapshotItem> = items.iter().take(n).cloned().collect();
            let want = crate::msg::snapshot_chunks(9, 42, items.clone(), 2_000).unwrap();
            let mut tx = SnapshotSender::new(MemberId(2), 9, 42, items, 2_000, 0)
                .unwrap()
                .with_window(3);
            assert_eq!(drain(&mut tx, 3), want, "{n} items");
            assert_eq!(tx.items_left(), 0);
        }

        let mut big = child_sa("vpn1_big", 1);
        big.phase2 = "p".repeat(5_000);
        let items = vec![
            SnapshotItem::ChildSa(child_sa("vpn1_a", 2)),
            SnapshotItem::ChildSa(big),
        ];
        let mut tx = SnapshotSender::new(MemberId(2), 9, 42, items, 2_000, 0).unwrap();
        assert!(tx.poll_transmit(1).is_none());
        assert!(
            tx.failed().is_some_and(|e| e.contains("exceeds")),
            "{:?}",
            tx.failed()
        );
        assert!(!tx.is_done());
    }

    #[test]
    fn acknowledgements_of_others_are_ignored() {
        let mut tx = SnapshotSender::new(MemberId(2), 7, 0, vec![], CHUNK_BODY, 0).unwrap();
        let ack = SnapshotRequest {
            request_id: 7,
            next: 1,
        };
        assert!(!tx.handle_ack(MemberId(3), &ack, 1));
        assert!(!tx.is_done());
        assert!(tx.poll_transmit(1).is_some());
        assert!(tx.handle_ack(MemberId(2), &ack, 2));
        assert!(tx.is_done());
        assert!(tx.poll_transmit(500).is_none());
    }

    #[test]
    fn too_many_held_messages_abandon_the_transfer_and_ask_again() {
        let mut join = SnapshotJoin::default();
        let c = SnapshotChunk {
            request_id: 4,
            index: 0,
            last: false,
            as_of: 10,
            items: vec![],
        };
        join.chunk(MemberId(1), 1, c);
        for i in 0..MAX_HELD as u64 {
            let (apply, again) = join.stream(1, 20 + i, Message::ChildSa(child_sa("x", 1)));
            assert!(apply.is_empty() && again.is_none());
        }
        let (apply, again) = join.stream(1, 1_000_000, Message::ChildSa(child_sa("x", 1)));
        assert_eq!(apply.len(), MAX_HELD + 1);
        assert_eq!(again.map(|r| (r.request_id, r.next)), Some((5, 0)));
        assert!(!join.in_progress());
    }
}
