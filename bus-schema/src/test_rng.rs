//! A tiny deterministic generator (xorshift64*) for the workspace's property tests, so they
//! need no crate (like [`crate::samples`], for tests of this and other crates).

/// Seeded with any non-zero value; the same seed gives the same sequence.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (> 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
