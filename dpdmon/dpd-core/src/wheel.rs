//! A hierarchical timer wheel with millisecond resolution.
//!
//! Four levels of 64 slots cover 64^4 ms (about 4 h 40 min) ahead of the
//! wheel's current time; a deadline further away waits in an overflow list
//! that is re-examined each time the wheel enters a new 64^4 ms block, so any
//! `u64` deadline is accepted.
//!
//! Entries live in a slab and each slot is an intrusive doubly linked list, so
//! [`TimerWheel::insert`] and [`TimerWheel::cancel`] are O(1). A
//! [`TimerHandle`] carries the slab index and a generation: once its entry has
//! fired or been cancelled the generation moves on, and a late cancel through
//! the old handle does nothing.
//!
//! Invariant (the one the tokio and Linux wheels use): an entry in level `l`
//! differs from the wheel's current time `elapsed` in bit group `l` (bits
//! `6l..6l+6`) and in no higher group, and its slot index is at or after the
//! slot `elapsed` points at in that level. [`TimerWheel::advance`] keeps it by
//! visiting occupied slots in time order, expiring level-0 slots and moving
//! ("cascading") the entries of higher slots down.
//!
//! Indexing note: every index stored in a list head, a link or a handle that
//! passed its generation check is below `entries.len()` (entries are never
//! removed from the slab, only recycled), so the `entries[..]` indexing in
//! this module cannot fail; `heads` has `OVERFLOW + 1` lists and list numbers
//! are computed below that bound.

/// Bits of time covered by one level.
const SLOT_BITS: u32 = 6;
/// Slots per level.
const SLOTS: usize = 1 << SLOT_BITS;
/// Number of levels.
const LEVELS: usize = 4;
/// Bits of time covered by the whole wheel (24: 16 777 216 ms).
const WHEEL_BITS: u32 = SLOT_BITS * LEVELS as u32;
/// List index of the overflow list (after the `LEVELS * SLOTS` slot lists).
const OVERFLOW: usize = LEVELS * SLOTS;
/// "No entry" in the intrusive links.
const NIL: u32 = u32::MAX;

/// A handle to a pending timer; stale handles are harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerHandle {
    idx: u32,
    gen: u32,
}

/// A timer that expired during [`TimerWheel::advance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired<T> {
    /// The deadline it was inserted with.
    pub deadline_ms: u64,
    /// The value it was inserted with.
    pub value: T,
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    gen: u32,
    prev: u32,
    next: u32,
    /// Which list holds it (`0..=OVERFLOW`), meaningful only while `value` is Some.
    list: u16,
    value: Option<T>,
}

/// The wheel. `T` is the payload returned on expiry (keep it small and `Copy`).
#[derive(Debug)]
pub struct TimerWheel<T> {
    elapsed: u64,
    entries: Vec<Entry<T>>,
    free_head: u32,
    heads: Vec<u32>,
    occupied: [u64; LEVELS],
    len: usize,
}

impl<T: Copy> TimerWheel<T> {
    /// An empty wheel whose current time is `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        TimerWheel {
            elapsed: now_ms,
            entries: Vec::new(),
            free_head: NIL,
            heads: vec![NIL; OVERFLOW + 1],
            occupied: [0; LEVELS],
            len: 0,
        }
    }

    /// The wheel's current time: the `now_ms` of the last [`advance`](Self::advance).
    pub fn now_ms(&self) -> u64 {
        self.elapsed
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `value` for `deadline_ms`. A deadline at or before the
    /// wheel's current time fires at the next [`advance`](Self::advance).
    pub fn insert(&mut self, deadline_ms: u64, value: T) -> TimerHandle {
        let idx = if self.free_head != NIL {
            let idx = self.free_head;
            // The free list only links indices below entries.len().
            let e = &mut self.entries[idx as usize];
            self.free_head = e.next;
            e.deadline = deadline_ms;
            e.value = Some(value);
            idx
        } else {
            let idx = self.entries.len() as u32;
            self.entries.push(Entry {
                deadline: deadline_ms,
                gen: 0,
                prev: NIL,
                next: NIL,
                list: 0,
                value: Some(value),
            });
            idx
        };
        self.len += 1;
        self.place(idx);
        let gen = self.entries[idx as usize].gen;
        TimerHandle { idx, gen }
    }

    /// Cancels a pending timer and returns its value; `None` when the handle
    /// is stale (the timer already fired or was cancelled).
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let e = self.entries.get(handle.idx as usize)?;
        if e.gen != handle.gen || e.value.is_none() {
            return None;
        }
        self.unlink(handle.idx);
        self.release(handle.idx).map(|r| r.value)
    }

    /// The deadline of a pending timer, `None` when the handle is stale.
    pub fn deadline(&self, handle: TimerHandle) -> Option<u64> {
        let e = self.entries.get(handle.idx as usize)?;
        (e.gen == handle.gen && e.value.is_some()).then_some(e.deadline)
    }

    /// A time at which [`advance`](Self::advance) next has work: never later
    /// than the earliest pending deadline, possibly earlier (when the earliest
    /// timer sits in a coarse slot, advancing to this time only moves it to a
    /// finer one). `None` when the wheel is empty. This is what a driver
    /// sleeps until.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_slot().map(|(_, _, at)| at)
    }

    /// Moves the wheel to `now_ms` and appends every timer whose deadline is
    /// at or before `now_ms` to `out`, in deadline order per slot visited
    /// (level-0 slots are visited in time order, so the output is sorted by
    /// deadline except for past-due inserts, which come first). A `now_ms`
    /// earlier than the wheel's time is treated as the wheel's time.
    pub fn advance_into(&mut self, now_ms: u64, out: &mut Vec<Expired<T>>) {
        while let Some((level, slot, at)) = self.next_slot() {
            if at > now_ms {
                break;
            }
            // `at` is never behind `elapsed` (see the invariant in the module doc).
            self.elapsed = self.elapsed.max(at);
            let head = self.take_list(if level == LEVELS {
                OVERFLOW
            } else {
                level * SLOTS + slot
            });
            let mut cur = head;
            while cur != NIL {
                let next = self.entries[cur as usize].next;
                if level == 0 {
                    if let Some(r) = self.release(cur) {
                        out.push(r);
                    }
                } else {
                    self.place(cur);
                }
                cur = next;
            }
        }
        self.elapsed = self.elapsed.max(now_ms);
    }

    /// [`advance_into`](Self::advance_into) returning a fresh vector.
    pub fn advance(&mut self, now_ms: u64) -> Vec<Expired<T>> {
        let mut out = Vec::new();
        self.advance_into(now_ms, &mut out);
        out
    }

    /// Earliest occupied list as (level, slot, start time); level `LEVELS`
    /// is the overflow list.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for (level, &occ) in self.occupied.iter().enumerate() {
            let shift = SLOT_BITS * level as u32;
            let pos = ((self.elapsed >> shift) & (SLOTS as u64 - 1)) as u32;
            let ahead = occ & (u64::MAX << pos);
            if ahead == 0 {
                continue;
            }
            let slot = ahead.trailing_zeros() as u64;
            let block_bits = shift + SLOT_BITS;
            let block = if block_bits >= 64 {
                0
            } else {
                self.elapsed & !((1u64 << block_bits) - 1)
            };
            let at = block.saturating_add(slot << shift);
            if best.is_none_or(|(_, _, b)| at < b) {
                best = Some((level, slot as usize, at));
            }
        }
        if self.heads[OVERFLOW] != NIL {
            let at =
                ((self.elapsed >> WHEEL_BITS).saturating_add(1)).saturating_mul(1 << WHEEL_BITS);
            // Entries far beyond u64 range cannot exist; a saturated boundary
            // at u64::MAX still makes progress because place() then puts them
            // in the wheel proper.
            if best.is_none_or(|(_, _, b)| at < b) {
                best = Some((LEVELS, 0, at));
            }
        }
        best
    }

    /// Puts a live, unlinked entry into the list its deadline belongs to.
    fn place(&mut self, idx: u32) {
        let deadline = self.entries[idx as usize].deadline;
        let list = if deadline <= self.elapsed {
            // Past due: the current level-0 slot, visited by the next advance.
            (self.elapsed & (SLOTS as u64 - 1)) as usize
        } else {
            let diff = (deadline ^ self.elapsed) | (SLOTS as u64 - 1);
            let level = ((63 - diff.leading_zeros()) / SLOT_BITS) as usize;
            if level >= LEVELS {
                OVERFLOW
            } else {
                let slot = ((deadline >> (SLOT_BITS * level as u32)) & (SLOTS as u64 - 1)) as usize;
                level * SLOTS + slot
            }
        };
        let old_head = self.heads[list];
        {
            let e = &mut self.entries[idx as usize];
            e.list = list as u16;
            e.prev = NIL;
            e.next = old_head;
        }
        if old_head != NIL {
            self.entries[old_head as usize].prev = idx;
        }
        self.heads[list] = idx;
        if list < OVERFLOW {
            self.occupied[list / SLOTS] |= 1u64 << (list % SLOTS);
        }
    }

    /// Removes a live entry from its list.
    fn unlink(&mut self, idx: u32) {
        let (prev, next, list) = {
            let e = &self.entries[idx as usize];
            (e.prev, e.next, e.list as usize)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.heads[list] = next;
            if next == NIL && list < OVERFLOW {
                self.occupied[list / SLOTS] &= !(1u64 << (list % SLOTS));
            }
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    /// Detaches a whole list and returns its head.
    fn take_list(&mut self, list: usize) -> u32 {
        let head = std::mem::replace(&mut self.heads[list], NIL);
        if list < OVERFLOW {
            self.occupied[list / SLOTS] &= !(1u64 << (list % SLOTS));
        }
        head
    }

    /// Frees a slot whose entry is already unlinked; bumps the generation so
    /// outstanding handles go stale. `None` (and nothing changes) if the slot
    /// was already free, which the callers rule out.
    fn release(&mut self, idx: u32) -> Option<Expired<T>> {
        let free_head = self.free_head;
        let e = &mut self.entries[idx as usize];
        let value = e.value.take()?;
        e.gen = e.gen.wrapping_add(1);
        e.next = free_head;
        e.prev = NIL;
        self.free_head = idx;
        self.len -= 1;
        Some(Expired {
            deadline_ms: e.deadline,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// xorshift64*: a seeded PRNG for the property test.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed.max(1))
        }
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn fire(w: &mut TimerWheel<u32>, now: u64) -> Vec<(u64, u32)> {
        w.advance(now)
            .into_iter()
            .map(|e| (e.deadline_ms, e.value))
            .collect()
    }

    #[test]
    fn fires_exactly_at_deadline() {
        let mut w = TimerWheel::new(1000);
        w.insert(1005, 1);
        w.insert(1070, 2);
        assert_eq!(w.next_deadline(), Some(1005));
        assert!(fire(&mut w, 1004).is_empty());
        assert_eq!(fire(&mut w, 1005), vec![(1005, 1)]);
        // 1070 sits in level 1 (different 64 ms block): next_deadline is a lower bound.
        let nd = w.next_deadline().unwrap();
        assert!(nd <= 1070 && nd > 1005, "{nd}");
        assert!(fire(&mut w, 1069).is_empty());
        assert_eq!(w.next_deadline(), Some(1070));
        assert_eq!(fire(&mut w, 1070), vec![(1070, 2)]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn past_due_fires_on_next_advance() {
        let mut w = TimerWheel::new(500);
        w.insert(10, 7);
        w.insert(500, 8);
        assert_eq!(w.next_deadline(), Some(500));
        let mut got = fire(&mut w, 500);
        got.sort();
        assert_eq!(got, vec![(10, 7), (500, 8)]);
    }

    #[test]
    fn cancel_and_stale_handles() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(100, 1);
        let b = w.insert(100, 2);
        let c = w.insert(100, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.cancel(b), None, "second cancel is harmless");
        assert_eq!(w.deadline(a), Some(100));
        let got = fire(&mut w, 100);
        assert_eq!(got.len(), 2);
        assert_eq!(w.cancel(a), None, "cancel after fire is harmless");
        // The slot of `a` is reused; the old handle must not cancel the new timer.
        let d = w.insert(200, 4);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.cancel(c), None);
        assert_eq!(w.deadline(d), Some(200));
        assert_eq!(fire(&mut w, 300), vec![(200, 4)]);
        assert_eq!(w.cancel(TimerHandle { idx: 999, gen: 0 }), None);
    }

    #[test]
    fn long_horizons() {
        let start = 1_700_000_000_000u64; // an epoch-milliseconds "now"
        let mut w = TimerWheel::new(start);
        let day = 86_400_000u64;
        let deadlines = [
            start + 63,
            start + 64,
            start + 4095,
            start + 4096,
            start + 262_143,
            start + 262_144,
            start + (1 << 24) - 1,
            start + (1 << 24),
            start + 10 * 3_600_000,
            start + 30 * day,
            start + 400 * day,
        ];
        for (i, d) in deadlines.iter().enumerate() {
            w.insert(*d, i as u32);
        }
        let mut now = start;
        let mut fired = Vec::new();
        // Drive it like a daemon: sleep until next_deadline, never beyond.
        while let Some(nd) = w.next_deadline() {
            assert!(nd >= now, "next_deadline went backwards");
            now = nd;
            for (d, v) in fire(&mut w, now) {
                assert_eq!(d, now, "fired late or early");
                fired.push(v);
            }
        }
        assert_eq!(fired, (0..deadlines.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn big_jump_fires_everything_due() {
        let mut w = TimerWheel::new(0);
        for i in 0..1000u32 {
            w.insert(u64::from(i) * 997_331, i);
        }
        let got = fire(&mut w, 500 * 997_331);
        assert_eq!(got.len(), 501);
        let mut prev = 0;
        for (d, _) in &got {
            assert!(*d >= prev, "not in deadline order");
            prev = *d;
        }
        assert_eq!(w.len(), 499);
    }

    #[test]
    fn deadline_near_u64_max() {
        let mut w = TimerWheel::new(u64::MAX - 5_000_000);
        w.insert(u64::MAX, 1);
        w.insert(u64::MAX - 1, 2);
        assert!(fire(&mut w, u64::MAX - 2).is_empty());
        let mut got = fire(&mut w, u64::MAX);
        got.sort();
        assert_eq!(got, vec![(u64::MAX - 1, 2), (u64::MAX, 1)]);
    }

    /// Random inserts, cancels and advances against a BTreeMap reference:
    /// exactly the due timers fire at each advance, none twice, none early.
    #[test]
    fn matches_btreemap_reference() {
        for seed in [1u64, 2, 3, 0xdead_beef, 42_4242] {
            let mut rng = Rng::new(seed);
            let start = rng.below(1 << 40);
            let mut w = TimerWheel::new(start);
            let mut reference: BTreeMap<(u64, u32), TimerHandle> = BTreeMap::new();
            let mut handles: Vec<(TimerHandle, u64, u32)> = Vec::new();
            let mut now = start;
            let mut next_id = 0u32;
            for _step in 0..20_000 {
                match rng.below(10) {
                    0..=4 => {
                        let horizon = match rng.below(4) {
                            0 => 64,
                            1 => 10_000,
                            2 => 20_000_000,
                            _ => 1 << 34,
                        };
                        let d = (now + rng.below(horizon)).saturating_sub(rng.below(3));
                        let h = w.insert(d, next_id);
                        reference.insert((d, next_id), h);
                        handles.push((h, d, next_id));
                        next_id += 1;
                    }
                    5..=6 if !handles.is_empty() => {
                        let i = rng.below(handles.len() as u64) as usize;
                        let (h, d, id) = handles.swap_remove(i);
                        let expect = reference.remove(&(d, id)).map(|_| id);
                        assert_eq!(w.cancel(h), expect);
                    }
                    _ => {
                        let step = match rng.below(3) {
                            0 => rng.below(100),
                            1 => rng.below(100_000),
                            _ => rng.below(1 << 30),
                        };
                        // Sometimes stop at the wheel's own next_deadline.
                        now = if rng.below(4) == 0 {
                            w.next_deadline().map_or(now + step, |nd| nd.max(now))
                        } else {
                            now + step
                        };
                        let mut got = fire(&mut w, now);
                        got.sort();
                        let due: Vec<(u64, u32)> = reference
                            .range(..=(now, u32::MAX))
                            .map(|(k, _)| *k)
                            .collect();
                        for k in &due {
                            reference.remove(k);
                        }
                        assert_eq!(got, due, "seed {seed} now {now}");
                        if let Some(((first, _), _)) = reference.iter().next() {
                            let nd = w.next_deadline().unwrap();
                            assert!(nd <= *first && nd > now, "seed {seed}: {nd} vs {first}");
                        } else {
                            assert_eq!(w.next_deadline(), None);
                        }
                    }
                }
                assert_eq!(w.len(), reference.len());
            }
        }
    }
}
