//! Inbound anti-replay window (RFC 4303 §3.4.3) with extended sequence numbers (RFC 4303
//! Appendix A2, RFC 4304).
//!
//! Use: [`ReplayWindow::check`] before decryption (cheap rejection of replays and of packets
//! left of the window, and inference of the high 32 bits with ESN), then
//! [`ReplayWindow::accept`] only after the ICV verified, so forged packets never move the
//! window.

use crate::error::{EspError, Result};

/// Default window size: what the seeds show (`replaywin=2048`).
pub const DEFAULT_WINDOW: u32 = 2048;
/// Largest configurable window (bits). Keeps the bitmap at 128 KiB at most.
pub const MAX_WINDOW: u32 = 1 << 20;
/// Window used only to infer the high sequence bits when replay checking is disabled.
const INFER_WINDOW_DISABLED: u32 = 1 << 30;

/// Sliding window over the highest sequence numbers received.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Window size W in packets; 0 disables the replay check (not ESN inference).
    size: u32,
    esn: bool,
    /// Highest authenticated sequence number (0 = nothing received yet).
    top: u64,
    /// Ring bitmap: bit (seq & mask) says whether seq was received. Length is a power of two
    /// (in words) so that `mask` replaces a division.
    bits: Box<[u64]>,
    mask: u64,
}

impl ReplayWindow {
    /// A window of `size` packets (0 = replay checking disabled, RFC 4303 §3.4.3 allows the
    /// receiver to turn it off). `esn` selects 64-bit sequence numbers.
    pub fn new(size: u32, esn: bool) -> Result<Self> {
        if size > MAX_WINDOW {
            return Err(EspError::Config("replay window too large"));
        }
        let words = if size == 0 {
            1
        } else {
            (size as usize).div_ceil(64).next_power_of_two()
        };
        Ok(ReplayWindow {
            size,
            esn,
            top: 0,
            bits: vec![0u64; words].into_boxed_slice(),
            mask: (words as u64 * 64) - 1,
        })
    }

    /// The configured window size.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Highest authenticated sequence number so far (0 if none).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Restore the window top after a restart or takeover: everything at or below `top`
    /// is treated as already received.
    pub fn restore(&mut self, top: u64) {
        self.top = top;
        self.bits.fill(u64::MAX);
    }

    /// Reconstruct the full sequence number from its low 32 bits (RFC 4303 Appendix A2.2);
    /// without ESN it is the 32-bit value.
    pub fn infer(&self, seq_lo: u32) -> Option<u64> {
        if !self.esn {
            return Some(u64::from(seq_lo));
        }
        let w = if self.size == 0 {
            INFER_WINDOW_DISABLED
        } else {
            self.size
        };
        let tl = self.top as u32;
        let th = self.top >> 32;
        let seq_hi = if tl >= w - 1 {
            // Case A: the window lies within one sequence number subspace.
            if seq_lo >= tl - (w - 1) {
                th
            } else {
                th.checked_add(1)?
            }
        } else {
            // Case B: the window spans two subspaces.
            if seq_lo >= tl.wrapping_sub(w - 1) {
                th.checked_sub(1)?
            } else {
                th
            }
        };
        Some((seq_hi << 32) | u64::from(seq_lo))
    }

    /// Check a received sequence number before decryption. Returns the full (inferred)
    /// sequence number to authenticate with, or [`EspError::Replay`].
    pub fn check(&self, seq_lo: u32) -> Result<u64> {
        let seq = self.infer(seq_lo).ok_or(EspError::Replay)?;
        // Sequence number 0 is never sent (RFC 4303 §3.3.3: the first packet has 1).
        if seq == 0 {
            return Err(EspError::Replay);
        }
        if self.size == 0 || seq > self.top {
            return Ok(seq);
        }
        if self.top - seq >= u64::from(self.size) {
            return Err(EspError::Replay);
        }
        if self.bit(seq) {
            return Err(EspError::Replay);
        }
        Ok(seq)
    }

    /// Record an authenticated sequence number (call only after the ICV verified and only
    /// with a value [`ReplayWindow::check`] returned). Returns false if it was a replay after
    /// all (a second packet with the same number verified in between).
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq > self.top {
            let nbits = self.mask + 1;
            if seq - self.top >= nbits {
                self.bits.fill(0);
            } else {
                // Clear the slots of the numbers between the old and the new top: they
                // held numbers that are now left of the window.
                let mut s = self.top; // highest slot already cleared (or the old top)
                while s < seq {
                    let next = s + 1; // <= seq: no overflow
                    let idx = next & self.mask;
                    let (w, b) = ((idx / 64) as usize, idx % 64);
                    if b == 0 && seq - next >= 63 {
                        if let Some(word) = self.bits.get_mut(w) {
                            *word = 0;
                        }
                        s = next + 63; // <= seq
                    } else {
                        if let Some(word) = self.bits.get_mut(w) {
                            *word &= !(1u64 << b);
                        }
                        s = next;
                    }
                }
            }
            self.top = seq;
            self.set_bit(seq);
            return true;
        }
        if self.size != 0 && (self.top - seq >= u64::from(self.size) || self.bit(seq)) {
            return false;
        }
        self.set_bit(seq);
        true
    }

    fn bit(&self, seq: u64) -> bool {
        let idx = seq & self.mask;
        // idx < bits.len() * 64 by construction of mask; get() keeps it panic-free anyway.
        self.bits
            .get((idx / 64) as usize)
            .is_some_and(|w| w & (1u64 << (idx % 64)) != 0)
    }

    fn set_bit(&mut self, seq: u64) {
        let idx = seq & self.mask;
        if let Some(w) = self.bits.get_mut((idx / 64) as usize) {
            *w |= 1u64 << (idx % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(w: &mut ReplayWindow, seq_lo: u32) -> Result<u64> {
        let s = w.check(seq_lo)?;
        assert!(w.accept(s));
        Ok(s)
    }

    #[test]
    fn basic_window() {
        let mut w = ReplayWindow::new(64, false).unwrap();
        assert_eq!(recv(&mut w, 0), Err(EspError::Replay));
        assert_eq!(recv(&mut w, 1), Ok(1));
        assert_eq!(recv(&mut w, 1), Err(EspError::Replay));
        assert_eq!(recv(&mut w, 100), Ok(100));
        // 100 - 37 = 63 < 64: inside the window, never seen.
        assert_eq!(recv(&mut w, 37), Ok(37));
        assert_eq!(recv(&mut w, 37), Err(EspError::Replay));
        // 100 - 36 = 64: left of the window.
        assert_eq!(recv(&mut w, 36), Err(EspError::Replay));
        assert_eq!(recv(&mut w, 99), Ok(99));
    }

    #[test]
    fn check_does_not_mark() {
        let mut w = ReplayWindow::new(2048, false).unwrap();
        // A forged packet passes check but is never accepted: the genuine one still passes.
        assert_eq!(w.check(5), Ok(5));
        assert_eq!(w.check(5), Ok(5));
        assert!(w.accept(5));
        assert_eq!(w.check(5), Err(EspError::Replay));
        assert_eq!(w.top(), 5);
    }

    #[test]
    fn large_jumps_clear_old_bits() {
        let mut w = ReplayWindow::new(128, false).unwrap();
        for s in 1..=200u32 {
            recv(&mut w, s).unwrap();
        }
        // Jump by less than the ring size: numbers just left of the old top are fresh slots.
        recv(&mut w, 300).unwrap();
        for s in 201..300u32 {
            assert_eq!(w.check(s), Ok(u64::from(s)), "{s}");
        }
        for s in 172..=200u32 {
            assert_eq!(w.check(s), Err(EspError::Replay), "{s}");
        }
        // Jump by more than the ring.
        recv(&mut w, 100_000).unwrap();
        assert_eq!(w.check(99_999), Ok(99_999));
        assert_eq!(w.check(300), Err(EspError::Replay));
    }

    #[test]
    fn model_check_against_set() {
        // Compare with a straightforward model over a pseudo-random arrival order.
        use std::collections::BTreeSet;
        for size in [32u32, 64, 100, 2048] {
            let mut w = ReplayWindow::new(size, false).unwrap();
            let mut seen = BTreeSet::new();
            let mut top = 0u64;
            let mut x = 12345u64;
            for _ in 0..20_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let jitter = (x >> 33) % (u64::from(size) * 2 + 10);
                let seq = (top + 5).saturating_sub(jitter).max(1);
                let expect_ok = seq > top || (top - seq < u64::from(size) && !seen.contains(&seq));
                let got = w.check(seq as u32);
                assert_eq!(got.is_ok(), expect_ok, "size {size} seq {seq} top {top}");
                if got.is_ok() {
                    assert!(w.accept(seq));
                    seen.insert(seq);
                    top = top.max(seq);
                }
            }
        }
    }

    #[test]
    fn disabled_window_accepts_everything_but_zero() {
        let mut w = ReplayWindow::new(0, false).unwrap();
        assert_eq!(recv(&mut w, 5), Ok(5));
        assert_eq!(recv(&mut w, 5), Ok(5));
        assert_eq!(recv(&mut w, 0), Err(EspError::Replay));
    }

    #[test]
    fn too_large_window_rejected() {
        assert!(ReplayWindow::new(MAX_WINDOW + 1, false).is_err());
    }

    #[test]
    fn esn_inference_case_a_and_b() {
        let mut w = ReplayWindow::new(64, true).unwrap();
        // Case A inside subspace 0.
        recv(&mut w, 1000).unwrap();
        assert_eq!(w.infer(990), Some(990));
        // Far below the window bottom: taken to be in the next subspace.
        assert_eq!(w.infer(10), Some((1 << 32) | 10));
        // Cross into subspace 1.
        w.accept(0xFFFF_FFF0);
        assert_eq!(recv(&mut w, 5), Ok((1 << 32) | 5));
        // Now Tl = 5 < W - 1: case B. Low values above the wrapped bottom belong to subspace 0.
        assert_eq!(w.infer(0xFFFF_FFF0), Some(0xFFFF_FFF0));
        assert_eq!(w.check(0xFFFF_FFF0), Err(EspError::Replay)); // already received
        assert_eq!(w.check(0xFFFF_FFF1), Ok(0xFFFF_FFF1)); // in window, not seen
        assert_eq!(w.infer(3), Some((1 << 32) | 3));
        assert_eq!(w.infer(1000), Some((1 << 32) | 1000));
    }

    #[test]
    fn esn_case_b_at_start_is_not_underflow() {
        let mut w = ReplayWindow::new(64, true).unwrap();
        recv(&mut w, 3).unwrap();
        // Would be subspace -1: rejected, not wrapped.
        assert_eq!(w.check(0xFFFF_FFF0), Err(EspError::Replay));
    }

    #[test]
    fn top_of_esn_space_does_not_overflow() {
        let mut w = ReplayWindow::new(64, true).unwrap();
        w.restore(u64::MAX - 1);
        assert_eq!(recv(&mut w, u32::MAX), Ok(u64::MAX));
        assert_eq!(w.check(u32::MAX), Err(EspError::Replay));
    }

    #[test]
    fn restore_marks_everything_below_top() {
        let mut w = ReplayWindow::new(64, false).unwrap();
        w.restore(500);
        assert_eq!(w.check(500), Err(EspError::Replay));
        assert_eq!(w.check(480), Err(EspError::Replay));
        assert_eq!(w.check(501), Ok(501));
    }
}
