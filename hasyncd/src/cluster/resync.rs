//! Lost sync datagrams on the HA links, and the repair (issue 6 point 3, issue 8 point 4).
//!
//! The sync stream (IKE and CHILD SA records, deletions, leases) is sent once over UDP: a
//! lost record leaves the secondary without a copy it needs for a takeover, and a lost
//! deletion leaves a copy behind for ever (the soak's "standby CHILD SA copies not
//! removed"). Every datagram a member seals carries the next value of its link counter
//! (ha-core `HaLink`, heartbeats included), so the receiver sees a loss as a counter it
//! never received. [`LossWatch`] notes the counters each sender used; a counter still
//! missing [`REORDER_MS`] after a later one arrived is lost (the link may reorder, not
//! that much). The secondary then asks its primary for a snapshot (the Clone pattern's
//! repair: the snapshot replaces every copy from that member, and the stream continues
//! after it), at most once per [`RESYNC_EVERY_MS`] per sender.
//!
//! FGSP peers get the same repair from the peer whose counters show the gap
//! ([`fgsp_resync`]), but only while this member hears exactly one FGSP peer: with more,
//! the peers' snapshot chunks and acknowledgements to one another (unicast) leave gaps
//! here that are no loss, and asking for snapshots on them would make every join start
//! a round of snapshots between all peers. Two FGSP members, or two FGCP clusters whose
//! primaries speak for them (seed 001), are covered; three or more FGSP members are not
//! (their losses are only counted down).
//!
//! Limits: a member that seals a datagram for another member only (a snapshot chunk
//! unicast to a third member of a larger cluster) leaves a counter the others never see;
//! they take it for a loss and resync once (rate-limited). In a pair, every datagram goes
//! to the one peer.

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
    /// An authenticated datagram from `from` with `epoch` and `counter` arrived at `now_ms`.
    pub fn heard(&mut self, from: MemberId, epoch: u64, counter: u64, now_ms: u64) {
        let s = self.senders.entry(from).or_default();
        if epoch != s.epoch || s.next == 0 {
            // First datagram of this sender or of a new start: nothing before it counts
            // (a member that joins gets a snapshot anyway).
            *s = Sender {
                epoch,
                next: counter.saturating_add(1),
                last_request_ms: s.last_request_ms,
                ..Default::default()
            };
            return;
        }
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

/// FGSP: the peer to ask for a snapshot, and how many of its datagrams were lost, given
/// the losses [`LossWatch::take_lost`] reported and the peers heard now. Only when this
/// member hears one peer and that peer's datagrams were lost (see the module comment).
pub fn fgsp_resync(lost: &[(MemberId, u64)], live: &[MemberId]) -> Option<(MemberId, u64)> {
    let [only] = live else {
        return None;
    };
    lost.iter().find(|(m, n)| m == only && *n > 0).copied()
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
    fn an_fgsp_member_asks_its_only_peer_after_a_loss() {
        const B: MemberId = MemberId(8);
        let mut w = LossWatch::default();
        w.heard(A, 1, 0, 0);
        w.heard(A, 1, 1, 10);
        w.heard(A, 1, 4, 20); // 2 and 3 lost (a deletion sent while the link dropped)
        let lost = w.take_lost(20 + REORDER_MS);
        assert_eq!(lost, vec![(A, 2)]);
        assert_eq!(fgsp_resync(&lost, &[A]), Some((A, 2)));
        // With a second peer heard, gaps may be A's snapshot chunks to B: no request.
        assert_eq!(fgsp_resync(&lost, &[A, B]), None);
        // Nothing lost, or lost from a peer no longer heard: no request.
        assert_eq!(fgsp_resync(&[], &[A]), None);
        assert_eq!(fgsp_resync(&lost, &[B]), None);
        assert_eq!(fgsp_resync(&lost, &[]), None);
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
