//! Lost sync datagrams on the HA links, and the repair (issue 6 point 3, issue 8 point 4).
//!
//! The sync stream (IKE and CHILD SA records, deletions, leases) is sent once over UDP: a
//! lost record leaves the secondary without a copy it needs for a takeover, and a lost
//! deletion leaves a copy behind for ever (the soak's "standby CHILD SA copies not
//! removed"). Every datagram a member seals for every member of the link (heartbeats
//! included) carries the next stream position of that member (ha-core's wire header), so
//! the receiver sees a loss as a position it never received. Datagrams for one member
//! only (snapshot chunks and their acknowledgements, claims and leases to a peer that
//! joined) carry no position of their own, so they leave no gap at the others; they carry
//! the position of the sender's last datagram to all, so their receiver knows how far the
//! stream went even before it heard any of it ([`LossWatch::seen_up_to`]). [`LossWatch`] notes the
//! positions each sender used; a position still missing [`REORDER_MS`] after a later one
//! arrived is lost (the link may reorder, not that much). The member then asks the sender
//! for a snapshot (the Clone pattern's repair: the snapshot replaces every copy from that
//! member, and the stream continues after it), at most once per [`RESYNC_EVERY_MS`] per
//! sender.
//!
//! FGCP: a secondary asks its primary (the others' streams carry nothing it keeps). FGSP:
//! a member asks every live peer whose positions show a gap ([`fgsp_resync`]), however
//! many peers the cluster has (seed 000's four members), and an FGCP cluster's primary
//! does the same for the clusters it hears (seed 001).

use std::collections::BTreeMap;

use ha_core::MemberId;

/// How long a missing counter may be overtaken before it counts as lost (the link
/// reorders by a few tens of milliseconds at most; `ops/ha-link-chaos` holds up to 40 ms).
pub const REORDER_MS: u64 = 500;
/// Shortest time between two snapshot requests to one sender.
pub const RESYNC_EVERY_MS: u64 = 3_000;
/// Missing counters remembered per sender; beyond that the oldest is taken as lost.
const MAX_MISSING: usize = 4096;

#[derive(Debug, Default)]
struct Sender {
    epoch: u64,
    /// The counter after the highest received.
    next: u64,
    /// Counters not received yet below `next`, with when a later one arrived.
    missing: BTreeMap<u64, u64>,
    /// Counters taken as lost since the last [`LossWatch::take_lost`].
    lost: u64,
    last_request_ms: Option<u64>,
}

/// Counters heard per sender on one link.
#[derive(Debug, Default)]
pub struct LossWatch {
    senders: BTreeMap<MemberId, Sender>,
}

impl LossWatch {
    /// `from`'s state in `epoch`, or None after starting it afresh with `next` as the
    /// next position: its first datagram, or the first of a new start, where nothing
    /// before counts (a member that joins gets a snapshot anyway).
    fn known(&mut self, from: MemberId, epoch: u64, next: u64) -> Option<&mut Sender> {
        let s = self.senders.entry(from).or_default();
        if epoch != s.epoch || s.next == 0 {
            *s = Sender {
                epoch,
                next,
                last_request_ms: s.last_request_ms,
                ..Default::default()
            };
            return None;
        }
        Some(s)
    }

    /// An authenticated datagram from `from` addressed to one member (this one) arrived at
    /// `now_ms`, saying that the sender's last datagram to every member had position
    /// `last` in `epoch`: every position up to it that has not arrived is missing. The
    /// first datagram of a sender (often a snapshot chunk, when the member joined after the
    /// sender's first heartbeats) sets where counting starts.
    pub fn seen_up_to(&mut self, from: MemberId, epoch: u64, last: u64, now_ms: u64) {
        let Some(s) = self.known(from, epoch, last.saturating_add(1)) else {
            return;
        };
        if last >= s.next {
            // Positions s.next..=last are missing: as if `last + 1` had arrived.
            self.heard(from, epoch, last.saturating_add(1), now_ms);
            if let Some(s) = self.senders.get_mut(&from) {
                // `last + 1` itself has not arrived yet.
                s.next = last.saturating_add(1);
            }
        }
    }

    /// An authenticated datagram from `from` with `epoch` and `counter` arrived at `now_ms`.
    pub fn heard(&mut self, from: MemberId, epoch: u64, counter: u64, now_ms: u64) {
        let Some(s) = self.known(from, epoch, counter.saturating_add(1)) else {
            return;
        };
        if counter >= s.next {
            // Bounded: a jump larger than MAX_MISSING is a loss at once.
            let gap = counter - s.next;
            if gap as usize > MAX_MISSING {
                s.lost = s.lost.saturating_add(gap);
                s.missing.clear();
            } else {
                for c in s.next..counter {
                    s.missing.insert(c, now_ms);
                }
            }
            s.next = counter.saturating_add(1);
            while s.missing.len() > MAX_MISSING {
                s.missing.pop_first();
                s.lost = s.lost.saturating_add(1);
            }
        } else {
            // Late (reordered) arrival of a counter taken as missing.
            s.missing.remove(&counter);
        }
    }

    /// Senders with datagrams lost by `now_ms` (missing for [`REORDER_MS`]), with how many,
    /// that may be asked for a snapshot now (at most once per [`RESYNC_EVERY_MS`]); asking
    /// is recorded. Losses of a sender that may not be asked yet stay pending.
    pub fn take_lost(&mut self, now_ms: u64) -> Vec<(MemberId, u64)> {
        let mut out = Vec::new();
        for (m, s) in self.senders.iter_mut() {
            let due: Vec<u64> = s
                .missing
                .iter()
                .filter(|(_, t)| now_ms.saturating_sub(**t) >= REORDER_MS)
                .map(|(c, _)| *c)
                .collect();
            for c in &due {
                s.missing.remove(c);
            }
            s.lost = s.lost.saturating_add(due.len() as u64);
            if s.lost == 0 {
                continue;
            }
            if s.last_request_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < RESYNC_EVERY_MS)
            {
                continue;
            }
            out.push((*m, s.lost));
            s.lost = 0;
            s.last_request_ms = Some(now_ms);
        }
        out
    }

    /// Forgets a sender's pending losses (a snapshot from it is under way or was just
    /// applied: it covers them).
    pub fn covered(&mut self, from: MemberId) {
        if let Some(s) = self.senders.get_mut(&from) {
            s.lost = 0;
            s.missing.clear();
        }
    }
}

/// FGSP: the peers to ask for a snapshot, with how many of their datagrams were lost,
/// given the losses [`LossWatch::take_lost`] reported and the peers heard now (a peer no
/// longer heard is not asked: it gets the loss handling instead).
pub fn fgsp_resync(lost: &[(MemberId, u64)], live: &[MemberId]) -> Vec<(MemberId, u64)> {
    lost.iter()
        .filter(|(m, n)| *n > 0 && live.contains(m))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MemberId = MemberId(7);

    #[test]
    fn a_missing_counter_is_a_loss_only_after_the_reorder_time() {
        let mut w = LossWatch::default();
        w.heard(A, 1, 10, 0);
        w.heard(A, 1, 11, 0);
        w.heard(A, 1, 13, 100); // 12 missing
        assert!(w.take_lost(100 + REORDER_MS - 1).is_empty());
        assert_eq!(w.take_lost(100 + REORDER_MS), vec![(A, 1)]);
        // Asked once; the next loss waits for the rate limit, then is reported.
        let t = 100 + REORDER_MS;
        w.heard(A, 1, 15, t); // 14 missing
        assert!(w.take_lost(t + REORDER_MS).is_empty());
        assert_eq!(w.take_lost(t + RESYNC_EVERY_MS), vec![(A, 1)]);
    }

    #[test]
    fn reordering_within_the_reorder_time_is_no_loss() {
        let mut w = LossWatch::default();
        w.heard(A, 1, 0, 0);
        w.heard(A, 1, 3, 10);
        w.heard(A, 1, 1, 30);
        w.heard(A, 1, 2, 40);
        w.heard(A, 1, 2, 45); // a duplicate changes nothing
        assert!(w.take_lost(10_000).is_empty());
    }

    #[test]
    fn an_fgsp_member_asks_each_peer_whose_stream_has_a_gap() {
        const B: MemberId = MemberId(8);
        const C: MemberId = MemberId(9);
        let mut w = LossWatch::default();
        w.heard(A, 1, 1, 0);
        w.heard(A, 1, 2, 10);
        w.heard(A, 1, 5, 20); // 3 and 4 lost (a deletion sent while the link dropped)
        w.heard(B, 1, 1, 0);
        w.heard(B, 1, 2, 20); // B's chunks to C were off the stream: no gap
        let lost = w.take_lost(20 + REORDER_MS);
        assert_eq!(lost, vec![(A, 2)]);
        // However many peers are heard, the one with the gap is asked.
        assert_eq!(fgsp_resync(&lost, &[A]), vec![(A, 2)]);
        assert_eq!(fgsp_resync(&lost, &[A, B, C]), vec![(A, 2)]);
        // Nothing lost, or lost from a peer no longer heard: no request.
        assert!(fgsp_resync(&[], &[A]).is_empty());
        assert!(fgsp_resync(&lost, &[B, C]).is_empty());
        assert!(fgsp_resync(&lost, &[]).is_empty());
        // Two peers with gaps: both asked.
        w.heard(B, 1, 4, 30);
        w.heard(C, 1, 1, 30);
        w.heard(C, 1, 3, 30);
        let t = 30 + RESYNC_EVERY_MS;
        assert_eq!(
            fgsp_resync(&w.take_lost(t), &[A, B, C]),
            vec![(B, 1), (C, 1)]
        );
    }

    #[test]
    fn a_datagram_for_one_member_tells_how_far_the_stream_went() {
        let mut w = LossWatch::default();
        // A joiner's first datagram from A is a snapshot chunk: A had sent up to 10.
        w.seen_up_to(A, 1, 10, 0);
        // 11 and 12 go while the link drops; 13 arrives.
        w.heard(A, 1, 13, 100);
        assert_eq!(w.take_lost(100 + REORDER_MS), vec![(A, 2)]);
        // A chunk saying the stream reached 15 while 14 and 15 never came: both missing.
        w.seen_up_to(A, 1, 15, 200);
        w.heard(A, 1, 15, 210); // 15 comes late: only 14 is lost
        w.heard(A, 1, 16, 220);
        let t = 100 + REORDER_MS + RESYNC_EVERY_MS;
        assert_eq!(w.take_lost(t), vec![(A, 1)]);
        // Saying nothing new changes nothing.
        w.seen_up_to(A, 1, 16, t);
        w.seen_up_to(A, 1, 3, t);
        assert!(w.take_lost(t + 2 * RESYNC_EVERY_MS).is_empty());
    }

    #[test]
    fn a_new_epoch_starts_afresh_and_a_snapshot_covers_pending_losses() {
        let mut w = LossWatch::default();
        w.heard(A, 1, 5, 0);
        w.heard(A, 1, 9, 0); // 6..8 missing
        w.heard(A, 2, 100, 10); // the sender restarted: its old gaps are moot
        assert!(w.take_lost(10_000).is_empty());
        w.heard(A, 2, 103, 20);
        w.covered(A);
        assert!(w.take_lost(10_000).is_empty());
        // A huge jump is a loss at once, without remembering every counter.
        w.heard(A, 2, 1_000_000, 30);
        assert_eq!(w.take_lost(31), vec![(A, 1_000_000 - 104)]);
    }
}
