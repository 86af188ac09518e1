//! Outbound sequence numbers: a counter that never cycles (RFC 4303 §3.3.3) and leases of
//! sequence-number blocks for crash safety and HA takeover.

use crate::error::{EspError, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Without ESN, ask for a rekey when this many numbers are left (2^20 packets ahead of the
/// 2^32 limit: minutes at 10 Gbit/s, enough for a CREATE_CHILD_SA exchange).
pub const SEQ_SOFT_MARGIN_32: u64 = 1 << 20;
/// With ESN, ask for a rekey when 2^32 numbers are left.
pub const SEQ_SOFT_MARGIN_64: u64 = 1 << 32;

/// Hands out blocks of sequence numbers whose high-water mark must be stored (in the
/// run-dir, or synced to the HA peers) before any number of the block is used.
///
/// The stored value `hw` means "numbers below `hw` may have been sent". After a crash or a
/// takeover the sender resumes at the stored `hw` (plus any jump the HA design adds), so no
/// number is ever sent twice even though the counter itself was lost.
///
/// Protocol: [`SeqLease::poll_persist`] returns the next mark to store once the unused part
/// of the current block falls to half a block; the caller stores it and confirms with
/// [`SeqLease::persisted`]. Until then numbers at or above the old mark are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLease {
    block: u64,
    /// Numbers below this have a persisted mark covering them.
    granted: u64,
    /// A mark handed out by poll_persist and not yet confirmed.
    pending: Option<u64>,
}

impl SeqLease {
    /// A lease of `block` numbers at a time; `persisted_hw` is the mark already stored
    /// (0 for a fresh SA: the first block must be persisted before the first packet).
    pub fn new(block: u64, persisted_hw: u64) -> Result<Self> {
        if block < 2 {
            return Err(EspError::Config("sequence lease block must be at least 2"));
        }
        Ok(SeqLease {
            block,
            granted: persisted_hw,
            pending: None,
        })
    }

    /// Block size.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Numbers below this may be used.
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// Whether `seq` may be sent now.
    #[inline]
    pub fn allows(&self, seq: u64) -> bool {
        seq < self.granted
    }

    /// The next high-water mark to persist, if one is due (given the next number to send).
    /// Returns the same pending mark again until it is confirmed.
    pub fn poll_persist(&mut self, next_seq: u64) -> Option<u64> {
        if let Some(p) = self.pending {
            return Some(p);
        }
        if self.granted.saturating_sub(next_seq) <= self.block / 2 {
            let base = self.granted.max(next_seq);
            let hw = base.saturating_add(self.block);
            self.pending = Some(hw);
            return Some(hw);
        }
        None
    }

    /// The caller stored `hw` durably (or the HA peers acknowledged it).
    pub fn persisted(&mut self, hw: u64) {
        if self.pending.is_some_and(|p| p <= hw) {
            self.pending = None;
        }
        self.granted = self.granted.max(hw);
    }
}

/// The outbound counter of one SA.
#[derive(Clone, Debug)]
pub(crate) struct OutboundSeq {
    next: u64,
    last: u64,
    soft_at: u64,
    exhausted: bool,
    lease: Option<SeqLease>,
}

impl OutboundSeq {
    /// `first` is the first number to send (1 for a new SA, RFC 4303 §3.3.3).
    pub(crate) fn new(first: u64, esn: bool, lease: Option<SeqLease>) -> Result<Self> {
        let last = if esn { u64::MAX } else { u64::from(u32::MAX) };
        let margin = if esn {
            SEQ_SOFT_MARGIN_64
        } else {
            SEQ_SOFT_MARGIN_32
        };
        if first == 0 {
            return Err(EspError::Config("sequence numbers start at 1"));
        }
        Ok(OutboundSeq {
            next: first,
            last,
            soft_at: last - margin + 1,
            exhausted: first > last,
            lease,
        })
    }

    /// Take the next number, or refuse.
    #[inline]
    pub(crate) fn take(&mut self) -> Result<u64> {
        if self.exhausted {
            return Err(EspError::SeqExhausted);
        }
        let seq = self.next;
        if let Some(l) = &self.lease {
            if !l.allows(seq) {
                return Err(EspError::LeaseExhausted);
            }
        }
        if seq >= self.last {
            self.exhausted = true;
        } else {
            self.next = seq + 1;
        }
        Ok(seq)
    }

    /// Next number that will be sent (the `seqno` of `diagnose`).
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// (soft reached, hard reached) for lifetime polling.
    pub(crate) fn state(&self) -> (bool, bool) {
        (self.next >= self.soft_at || self.exhausted, self.exhausted)
    }

    pub(crate) fn lease_mut(&mut self) -> Option<&mut SeqLease> {
        self.lease.as_mut()
    }

    pub(crate) fn lease(&self) -> Option<&SeqLease> {
        self.lease.as_ref()
    }
}

/// The outbound counter of one SA shared by several worker threads (each with its own
/// [`crate::EspCrypto`]). Lock-free: one compare-and-swap per packet. Numbers are unique and
/// never cycle; with a lease, numbers at or above the granted mark are refused until
/// [`AtomicSeq::grant`] raises it (the control thread owns the [`SeqLease`] bookkeeping and
/// calls `grant` after persisting).
#[derive(Debug)]
pub struct AtomicSeq {
    next: AtomicU64,
    last: u64,
    soft_at: u64,
    granted: AtomicU64,
    /// Held: nothing is handed out whatever the marks ([`AtomicSeq::hold`]).
    held: AtomicBool,
}

impl AtomicSeq {
    /// Start at `first` (>= 1). `granted`: the persisted lease mark, or `None` without a
    /// lease. With ESN the last usable number is 2^64 - 2 (one below the 64-bit limit, so
    /// the counter itself cannot overflow).
    pub fn new(first: u64, esn: bool, granted: Option<u64>) -> Result<Self> {
        if first == 0 {
            return Err(EspError::Config("sequence numbers start at 1"));
        }
        let (last, margin) = if esn {
            (u64::MAX - 1, SEQ_SOFT_MARGIN_64)
        } else {
            (u64::from(u32::MAX), SEQ_SOFT_MARGIN_32)
        };
        Ok(AtomicSeq {
            next: AtomicU64::new(first),
            last,
            soft_at: last - margin + 1,
            granted: AtomicU64::new(granted.unwrap_or(u64::MAX)),
            held: AtomicBool::new(false),
        })
    }

    /// Take the next number, or refuse ([`EspError::SeqExhausted`],
    /// [`EspError::LeaseExhausted`]).
    #[inline]
    pub fn take(&self) -> Result<u64> {
        if self.held.load(Ordering::Acquire) {
            return Err(EspError::LeaseExhausted);
        }
        let last = self.last;
        let granted = self.granted.load(Ordering::Acquire);
        match self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n <= last && n < granted).then(|| n + 1)
            }) {
            Ok(seq) => Ok(seq),
            Err(n) if n > last => Err(EspError::SeqExhausted),
            Err(_) => Err(EspError::LeaseExhausted),
        }
    }

    /// Next number to be handed out.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Continue at `first` or above: the counter moves forward to `first` if it is below,
    /// never backwards (an HA member that claimed a tunnel back after another member sent on
    /// it). Numbers at or above the granted mark still wait for a lease. Returns the next
    /// number after the call.
    pub fn skip_to(&self, first: u64) -> u64 {
        // One past `last` marks the counter exhausted, as `take` would leave it.
        let first = first.min(self.last.saturating_add(1));
        self.next.fetch_max(first, Ordering::Relaxed).max(first)
    }

    /// Holds the counter (`true`): nothing is handed out, as if the lease were used up,
    /// until it is released (`false`). The marks are kept: the grants only ever raise them,
    /// and a hold must not be undone by a late one (an HA cluster member whose hasyncd is
    /// gone stops sending before another member takes the SA over).
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Release);
    }

    /// Whether the counter is held.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// The mark below which numbers may be handed out (`u64::MAX`: no lease).
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// A lease mark has been persisted: numbers below `hw` may be used.
    pub fn grant(&self, hw: u64) {
        self.granted.fetch_max(hw, Ordering::Release);
    }

    /// (soft reached, hard reached), as for lifetime polling.
    pub fn state(&self) -> (bool, bool) {
        let n = self.next();
        (n >= self.soft_at, n > self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_to_moves_forward_only_and_respects_the_lease() {
        let s = AtomicSeq::new(5, false, Some(100)).unwrap();
        assert_eq!(s.skip_to(3), 5, "never backwards");
        assert_eq!(s.take(), Ok(5));
        assert_eq!(s.skip_to(1_000), 1_000);
        assert_eq!(
            s.take(),
            Err(EspError::LeaseExhausted),
            "above the granted mark"
        );
        assert_eq!(s.granted(), 100);
        s.grant(2_000);
        s.grant(1_500);
        assert_eq!(s.granted(), 2_000, "grants only raise the mark");
        assert_eq!(s.take(), Ok(1_000));
        assert_eq!(s.skip_to(u64::MAX), u64::from(u32::MAX) + 1);
        s.grant(u64::MAX);
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
    }

    #[test]
    fn a_held_counter_hands_out_nothing_until_released() {
        let s = AtomicSeq::new(7, false, Some(100)).unwrap();
        assert_eq!(s.take(), Ok(7));
        s.hold(true);
        assert!(s.held());
        s.grant(1_000);
        assert_eq!(
            s.take(),
            Err(EspError::LeaseExhausted),
            "a grant keeps the hold"
        );
        assert_eq!(s.next(), 8, "no number used while held");
        s.hold(false);
        assert_eq!(s.take(), Ok(8));
    }

    #[test]
    fn never_wraps_without_esn() {
        let mut s = OutboundSeq::new(u64::from(u32::MAX) - 1, false, None).unwrap();
        assert_eq!(s.state(), (true, false));
        assert_eq!(s.take(), Ok(u64::from(u32::MAX) - 1));
        assert_eq!(s.take(), Ok(u64::from(u32::MAX)));
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
        assert_eq!(s.state(), (true, true));
    }

    #[test]
    fn soft_margin() {
        let s = OutboundSeq::new((1 << 32) - (1 << 20) - 1, false, None).unwrap();
        assert_eq!(s.state(), (false, false));
        let s = OutboundSeq::new((1 << 32) - (1 << 20), false, None).unwrap();
        assert_eq!(s.state(), (true, false));
        // With ESN the same number is far from the end.
        let s = OutboundSeq::new((1 << 32) - (1 << 20), true, None).unwrap();
        assert_eq!(s.state(), (false, false));
    }

    #[test]
    fn esn_limit_is_u64_max() {
        let mut s = OutboundSeq::new(u64::MAX, true, None).unwrap();
        assert_eq!(s.take(), Ok(u64::MAX));
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
        assert!(OutboundSeq::new(0, true, None).is_err());
    }

    #[test]
    fn lease_blocks_until_persisted() {
        let lease = SeqLease::new(100, 0).unwrap();
        let mut s = OutboundSeq::new(1, false, Some(lease)).unwrap();
        assert_eq!(s.take(), Err(EspError::LeaseExhausted));
        let hw = s.lease_mut().unwrap().poll_persist(1).unwrap();
        assert_eq!(hw, 101);
        // Asking again before confirming returns the same mark.
        assert_eq!(s.lease_mut().unwrap().poll_persist(1), Some(101));
        s.lease_mut().unwrap().persisted(hw);
        for i in 1..=49u64 {
            assert_eq!(s.take(), Ok(i));
            let next = s.next();
            assert_eq!(s.lease_mut().unwrap().poll_persist(next), None, "{i}");
        }
        assert_eq!(s.take(), Ok(50));
        // 101 - 51 = 50 = block/2 left: the next mark is due while numbers remain.
        let next = s.next();
        let hw2 = s.lease_mut().unwrap().poll_persist(next).unwrap();
        assert_eq!(hw2, 201);
        for i in 51..=100u64 {
            assert_eq!(s.take(), Ok(i));
        }
        assert_eq!(s.take(), Err(EspError::LeaseExhausted));
        s.lease_mut().unwrap().persisted(hw2);
        assert_eq!(s.take(), Ok(101));
    }

    #[test]
    fn restart_resumes_at_mark() {
        // Crash after persisting 201 having sent up to, say, 150: resume at 201.
        let lease = SeqLease::new(100, 201).unwrap();
        let mut s = OutboundSeq::new(201, false, Some(lease)).unwrap();
        assert_eq!(s.take(), Err(EspError::LeaseExhausted));
        let next = s.next();
        let hw = s.lease_mut().unwrap().poll_persist(next).unwrap();
        assert_eq!(hw, 301);
        s.lease_mut().unwrap().persisted(hw);
        assert_eq!(s.take(), Ok(201));
        assert!(SeqLease::new(1, 0).is_err());
    }
}

#[cfg(test)]
mod atomic_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn unique_across_threads() {
        let seq = Arc::new(AtomicSeq::new(1, false, None).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&seq);
                std::thread::spawn(move || (0..5000).map(|_| s.take().unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=20_000).collect::<Vec<_>>());
    }

    #[test]
    fn limits_and_lease() {
        let s = AtomicSeq::new(u64::from(u32::MAX), false, None).unwrap();
        assert_eq!(s.state(), (true, false));
        assert_eq!(s.take(), Ok(u64::from(u32::MAX)));
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
        assert_eq!(s.state(), (true, true));

        let s = AtomicSeq::new(10, false, Some(12)).unwrap();
        assert_eq!(s.take(), Ok(10));
        assert_eq!(s.take(), Ok(11));
        assert_eq!(s.take(), Err(EspError::LeaseExhausted));
        s.grant(11); // lower marks never shrink the grant
        assert_eq!(s.take(), Err(EspError::LeaseExhausted));
        s.grant(20);
        assert_eq!(s.take(), Ok(12));

        let s = AtomicSeq::new(u64::MAX - 1, true, None).unwrap();
        assert_eq!(s.take(), Ok(u64::MAX - 1));
        assert_eq!(s.take(), Err(EspError::SeqExhausted));
        assert!(AtomicSeq::new(0, true, None).is_err());
    }
}
