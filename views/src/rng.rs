//! The project's deterministic random stream.
//!
//! SplitMix64 (Steele, Lea, Flood 2014) is 5 lines, has no dependency and is
//! specified exactly in `shard-store/FORMAT.md`, so the draws never change
//! when a crate is upgraded. Streams are keyed by mixing the run seed with the
//! item coordinates; each coordinate goes through the finaliser so nearby keys
//! give unrelated streams.

/// A SplitMix64 pseudo-random generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator with the given state.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for the stream identified by `seed` and `keys`
    /// (`state = mix(...mix(mix(seed) ^ k0) ^ k1...)`).
    pub fn keyed(seed: u64, keys: &[u64]) -> Self {
        let mut s = mix(seed);
        for &k in keys {
            s = mix(s ^ k.wrapping_add(GOLDEN));
        }
        Self { state: s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in `[0, n)`; `n` must be positive. Uses the widening
    /// multiply (Lemire) without rejection: the bias is below 2^-32 for any
    /// `n` under 2^32, far below anything sampling can notice.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // Published SplitMix64 outputs for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn keyed_streams_differ_and_repeat() {
        let a = SplitMix64::keyed(0, &[1, 2]).next_u64();
        let b = SplitMix64::keyed(0, &[2, 1]).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, SplitMix64::keyed(0, &[1, 2]).next_u64());
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(7);
        for n in [1u64, 2, 3, 10, 1000] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
    }
}
