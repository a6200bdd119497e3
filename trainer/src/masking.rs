//! Mask generators: BEiT block-wise masking with an exact count (the CAE v2
//! default) and uniform random masking. Both draw from a [`SplitMix64`]
//! stream so masks are reproducible from `(seed, epoch, image)`.

use caev2_views::SplitMix64;

/// Which masking strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Masking {
    /// BEiT block-wise masking (REFERENCE.md, "Masking").
    Block,
    /// Exactly N patches uniformly at random.
    Random,
}

/// A mask generator for a `rows x cols` patch grid.
#[derive(Debug, Clone)]
pub struct MaskGenerator {
    /// Grid rows.
    pub rows: usize,
    /// Grid columns.
    pub cols: usize,
    /// Patches to mask.
    pub num_masked: usize,
    /// Smallest block area tried (16 in the CAE v2 scripts).
    pub min_block: f64,
    /// Strategy.
    pub masking: Masking,
}

impl MaskGenerator {
    /// A generator with the CAE v2 block settings (min block 16 patches,
    /// aspect ratio in [0.3, 1/0.3]).
    pub fn new(rows: usize, cols: usize, num_masked: usize, masking: Masking) -> Self {
        Self { rows, cols, num_masked: num_masked.min(rows * cols), min_block: 16.0, masking }
    }

    /// A mask (`true` = masked), row-major, with exactly `num_masked` set.
    pub fn generate(&self, rng: &mut SplitMix64) -> Vec<bool> {
        match self.masking {
            Masking::Random => {
                let mut idx: Vec<usize> = (0..self.rows * self.cols).collect();
                rng.shuffle(&mut idx);
                let mut mask = vec![false; idx.len()];
                for &i in &idx[..self.num_masked] {
                    mask[i] = true;
                }
                mask
            }
            Masking::Block => self.block(rng),
        }
    }

    fn block(&self, rng: &mut SplitMix64) -> Vec<bool> {
        let (h, w) = (self.rows, self.cols);
        let mut mask = vec![false; h * w];
        let mut count = 0;
        let (lo, hi) = (0.3f64.ln(), (1.0 / 0.3f64).ln());
        // BEiT's MaskingGenerator, with CAE's loop until the exact count.
        while count < self.num_masked {
            let max_patches = self.num_masked - count;
            let mut delta = 0;
            for _ in 0..10 {
                let target_area = rng.uniform(self.min_block, max_patches as f64);
                let aspect = rng.uniform(lo, hi).exp();
                let bh = (target_area * aspect).sqrt().round_ties_even() as usize;
                let bw = (target_area / aspect).sqrt().round_ties_even() as usize;
                if bw < w && bh < h {
                    let top = rng.below((h - bh + 1) as u64) as usize;
                    let left = rng.below((w - bw + 1) as u64) as usize;
                    let already: usize = (top..top + bh).map(|i| (left..left + bw).filter(|&j| mask[i * w + j]).count()).sum();
                    let new = bh * bw - already;
                    if 0 < new && new <= max_patches {
                        for i in top..top + bh {
                            for j in left..left + bw {
                                if !mask[i * w + j] {
                                    mask[i * w + j] = true;
                                    delta += 1;
                                }
                            }
                        }
                    }
                    if delta > 0 {
                        break;
                    }
                }
            }
            count += delta;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_count_for_every_strategy_and_ratio() {
        for masking in [Masking::Block, Masking::Random] {
            for n in [1, 15, 30, 49, 98, 118, 176, 196] {
                let g = MaskGenerator::new(14, 14, n, masking);
                for s in 0..20 {
                    let m = g.generate(&mut SplitMix64::keyed(s, &[n as u64]));
                    assert_eq!(m.iter().filter(|&&x| x).count(), n, "{masking:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn reproducible_from_the_seed() {
        let g = MaskGenerator::new(14, 14, 98, Masking::Block);
        assert_eq!(g.generate(&mut SplitMix64::keyed(1, &[2])), g.generate(&mut SplitMix64::keyed(1, &[2])));
        assert_ne!(g.generate(&mut SplitMix64::keyed(1, &[2])), g.generate(&mut SplitMix64::keyed(1, &[3])));
    }

    /// Block masks are made of rectangles: masked patches have far more
    /// masked 4-neighbours than random masks of the same count.
    #[test]
    fn block_masks_are_blocky() {
        let neighbours = |m: &[bool]| -> f64 {
            let mut total = 0;
            let mut n = 0;
            for i in 0..14 {
                for j in 0..14 {
                    if m[i * 14 + j] {
                        n += 1;
                        for (di, dj) in [(0i32, 1i32), (1, 0), (0, -1), (-1, 0)] {
                            let (a, b) = (i as i32 + di, j as i32 + dj);
                            if (0..14).contains(&a) && (0..14).contains(&b) && m[(a * 14 + b) as usize] {
                                total += 1;
                            }
                        }
                    }
                }
            }
            total as f64 / n as f64
        };
        let mut block = 0.0;
        let mut random = 0.0;
        for s in 0..50 {
            block += neighbours(&MaskGenerator::new(14, 14, 98, Masking::Block).generate(&mut SplitMix64::new(s)));
            random += neighbours(&MaskGenerator::new(14, 14, 98, Masking::Random).generate(&mut SplitMix64::new(s)));
        }
        assert!(block / 50.0 > 3.0 && random / 50.0 < 2.3, "block {} random {}", block / 50.0, random / 50.0);
    }
}
