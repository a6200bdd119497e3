//! Deterministic sampling of view parameters with torchvision's distributions.

use crate::params::{ColorOp, CropBox, ViewParams, ViewSettings};
use crate::rng::SplitMix64;

/// Draws the parameters of view `v` of image `i` from `(seed, i, v)`.
///
/// Draw order (documented in `shard-store/FORMAT.md`): the three jitter
/// factors (brightness, contrast, saturation, each `1 + s * (2u - 1)`), a
/// Fisher-Yates permutation of the three operations, the flip (`u <
/// flip_prob`), then `RandomResizedCrop.get_params`: up to 10 tries of
/// `area * U(scale)` and `exp(U(log ratio))`, `w = round(sqrt(A * r))`,
/// `h = round(sqrt(A / r))`, accepted when `0 < w <= W` and `0 < h <= H`, with
/// `top = below(H - h + 1)`, `left = below(W - w + 1)`; otherwise the
/// torchvision centre-crop fallback.
#[derive(Debug, Clone)]
pub struct ViewSampler {
    seed: u64,
    settings: ViewSettings,
}

impl ViewSampler {
    /// A sampler for the given run seed and settings.
    pub fn new(seed: u64, settings: ViewSettings) -> Self {
        Self { seed, settings }
    }

    /// The settings views are drawn with.
    pub fn settings(&self) -> &ViewSettings {
        &self.settings
    }

    /// The parameters of view `view` of image `image_id`, whose decoded size
    /// is `width x height`.
    pub fn sample(&self, image_id: u64, view: u32, width: u32, height: u32) -> ViewParams {
        let s = &self.settings;
        let mut rng = SplitMix64::keyed(self.seed, &[image_id, u64::from(view)]);
        let factor = |rng: &mut SplitMix64, strength: f64| rng.uniform(1.0 - strength, 1.0 + strength).max(0.0) as f32;
        let b = factor(&mut rng, s.brightness);
        let c = factor(&mut rng, s.contrast);
        let sat = factor(&mut rng, s.saturation);
        let mut jitter = [(ColorOp::Brightness, b), (ColorOp::Contrast, c), (ColorOp::Saturation, sat)];
        rng.shuffle(&mut jitter);
        let flip = rng.next_f64() < s.flip_prob;
        let crop = random_resized_crop(&mut rng, width, height, s.scale, s.ratio);
        ViewParams { image_width: width, image_height: height, jitter, flip, crop }
    }
}

fn random_resized_crop(rng: &mut SplitMix64, width: u32, height: u32, scale: (f64, f64), ratio: (f64, f64)) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        // Python's round() is round-half-even.
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= i64::from(width) && 0 < h && h <= i64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio.0 {
        (width, ((f64::from(width) / ratio.0).round_ties_even() as u32).clamp(1, height))
    } else if in_ratio > ratio.1 {
        (((f64::from(height) * ratio.1).round_ties_even() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_bounds() {
        let s = ViewSampler::new(42, ViewSettings::cae_v2(224, 224));
        for id in 0..200u64 {
            for v in 0..4 {
                let (w, h) = (100 + (id as u32 * 37) % 900, 50 + (id as u32 * 91) % 700);
                let p = s.sample(id, v, w, h);
                assert_eq!(p, s.sample(id, v, w, h));
                let c = p.crop;
                assert!(c.width > 0 && c.height > 0 && c.left + c.width <= w && c.top + c.height <= h);
                for (_, f) in p.jitter {
                    assert!((0.6..=1.4).contains(&f));
                }
            }
        }
        assert_ne!(s.sample(0, 0, 500, 400), s.sample(0, 1, 500, 400));
    }

    #[test]
    fn crop_area_and_ratio_follow_the_settings() {
        let s = ViewSampler::new(1, ViewSettings::cae_v2(224, 224));
        let mut flips = 0;
        for id in 0..2000u64 {
            let p = s.sample(id, 0, 640, 480);
            flips += u32::from(p.flip);
            let frac = f64::from(p.crop.width * p.crop.height) / (640.0 * 480.0);
            assert!((0.38..=1.0).contains(&frac), "area fraction {frac}");
        }
        assert!((900..1100).contains(&flips), "flip rate {flips}/2000");
    }

    #[test]
    fn tiny_and_extreme_images() {
        let s = ViewSampler::new(3, ViewSettings::cae_v2(224, 224));
        for (w, h) in [(1, 1), (1, 500), (500, 1), (2, 3)] {
            let p = s.sample(0, 0, w, h);
            assert!(p.crop.left + p.crop.width <= w && p.crop.top + p.crop.height <= h, "{w}x{h}: {p:?}");
            assert!(p.crop.width > 0 && p.crop.height > 0);
        }
    }
}
