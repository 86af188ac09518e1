//! Per-sender anti-replay window over link message counters: the sliding-window scheme of
//! RFC 4303 §3.4.3 applied to the HA link's 64-bit counter (no ESN inference needed, the
//! counter is sent whole). Checked before decryption, marked only after the message
//! authenticated and decoded.

/// Window size in messages.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Sliding window: `top` is the highest counter accepted; bit `i` of the map is counter
/// `top - i`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    top: Option<u64>,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// Whether `counter` would be accepted (not seen, not left of the window).
    pub fn check(&self, counter: u64) -> bool {
        let Some(top) = self.top else { return true };
        if counter > top {
            return true;
        }
        let age = top - counter;
        if age >= WINDOW {
            return false;
        }
        !self.bit(age)
    }

    /// Record `counter` as seen. Call only after [`ReplayWindow::check`] passed and the
    /// message authenticated.
    pub fn mark(&mut self, counter: u64) {
        match self.top {
            Some(top) if counter <= top => {
                let age = top - counter;
                if age < WINDOW {
                    self.set(age);
                }
            }
            Some(top) => {
                self.shift(counter - top);
                self.top = Some(counter);
                self.set(0);
            }
            None => {
                self.top = Some(counter);
                self.set(0);
            }
        }
    }

    fn bit(&self, age: u64) -> bool {
        // age < WINDOW, so the word index is < WORDS; `get` keeps it panic-free regardless.
        let w = (age / 64) as usize;
        self.bits.get(w).is_some_and(|v| v >> (age % 64) & 1 == 1)
    }

    fn set(&mut self, age: u64) {
        let w = (age / 64) as usize;
        if let Some(v) = self.bits.get_mut(w) {
            *v |= 1 << (age % 64);
        }
    }

    /// Age every entry by `n` (a new top `n` above the old one).
    fn shift(&mut self, n: u64) {
        if n >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let ws = (n / 64) as usize;
        let bs = (n % 64) as u32;
        let old = self.bits;
        for (i, word) in self.bits.iter_mut().enumerate() {
            let lo = i
                .checked_sub(ws)
                .and_then(|s| old.get(s))
                .copied()
                .unwrap_or(0);
            let carry = if bs == 0 {
                0
            } else {
                i.checked_sub(ws + 1)
                    .and_then(|s| old.get(s))
                    .map_or(0, |v| v >> (64 - bs))
            };
            *word = lo.checked_shl(bs).unwrap_or(0) | carry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Reference model: the set of accepted counters; accept iff unseen and within WINDOW of
    /// the maximum.
    fn model_check(seen: &BTreeSet<u64>, c: u64) -> bool {
        match seen.iter().next_back() {
            None => true,
            Some(&top) => !seen.contains(&c) && (c > top || top - c < WINDOW),
        }
    }

    #[test]
    fn matches_a_set_model_under_reordering() {
        // Deterministic xorshift: jumps forward, back, far and near.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut w = ReplayWindow::default();
        let mut seen = BTreeSet::new();
        let mut base: u64 = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = match x % 8 {
                0 => base + (x >> 8) % 3000,
                1..=4 => base + (x >> 8) % 70,
                _ => base.saturating_sub((x >> 8) % 1100),
            };
            let want = model_check(&seen, c);
            assert_eq!(w.check(c), want, "counter {c} base {base}");
            if want {
                w.mark(c);
                seen.insert(c);
                base = base.max(c);
            }
        }
    }

    #[test]
    fn edges() {
        let mut w = ReplayWindow::default();
        assert!(w.check(0));
        w.mark(0);
        assert!(!w.check(0));
        w.mark(WINDOW);
        assert!(!w.check(0), "left of the window");
        assert!(w.check(1));
        w.mark(1);
        assert!(!w.check(1));
        w.mark(u64::MAX);
        assert!(!w.check(u64::MAX));
        assert!(w.check(u64::MAX - 1));
        assert!(!w.check(WINDOW));
    }
}
