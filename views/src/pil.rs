//! Pillow's 8-bit image operations, reproduced bit for bit.
//!
//! These follow Pillow's C sources (`libImaging/Resample.c`, `Blend.c`,
//! `Convert.c`) and `ImageEnhance`/`ImageStat`. Each function documents the
//! exact arithmetic so that `shard-store/FORMAT.md` can refer to it.

use crate::RgbImage;

/// `PRECISION_BITS` of Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel with `a = -0.5`, evaluated in `f64`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point coefficients of one resampling direction
/// (`precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coeffs {
    ksize: usize,
    /// `(first input index, number of taps)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` coefficients per output index.
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    // Pillow passes the box as C floats; in0 = 0, in1 = in_size.
    let in1 = in_size as f32;
    let scale = f64::from(in1) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            kk[xx * ksize + x] = if v < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an RGB image with Pillow's `Image.resize(size, Image.BICUBIC)`
/// (no `reducing_gap`): a horizontal pass into an intermediate 8-bit image
/// covering only the rows the vertical pass reads, then a vertical pass, each
/// with 22-bit fixed-point coefficients, rounding offset `1 << 21` and
/// clipping to `0..=255`. Returns a copy when the size is unchanged.
pub fn resize_bicubic(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if (in_w, in_h) == (ow, oh) {
        return src.clone();
    }
    let need_h = ow != in_w;
    let need_v = oh != in_h;
    let horiz = precompute_coeffs(in_w, ow);
    let vert = precompute_coeffs(in_h, oh);
    let src_px: &[u8] = src.as_raw();

    // Horizontal pass over the rows the vertical pass needs.
    let (tmp, tmp_w, row0, rows) = if need_h {
        let first = vert.bounds[0].0;
        let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
        let rows = last - first;
        let mut tmp = vec![0u8; rows * ow * 3];
        for y in 0..rows {
            let in_row = &src_px[(y + first) * in_w * 3..(y + first + 1) * in_w * 3];
            let out_row = &mut tmp[y * ow * 3..(y + 1) * ow * 3];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.kk[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                let pix = &in_row[xmin * 3..(xmin + n) * 3];
                for (p, &kx) in pix.chunks_exact(3).zip(k) {
                    ss[0] += i32::from(p[0]) * kx;
                    ss[1] += i32::from(p[1]) * kx;
                    ss[2] += i32::from(p[2]) * kx;
                }
                out_row[xx * 3] = clip8(ss[0]);
                out_row[xx * 3 + 1] = clip8(ss[1]);
                out_row[xx * 3 + 2] = clip8(ss[2]);
            }
        }
        (tmp, ow, first, rows)
    } else {
        (src_px.to_vec(), in_w, 0, in_h)
    };
    let _ = rows;
    if !need_v {
        return RgbImage::from_raw(out_w, out_h, tmp).expect("buffer size matches");
    }

    // Vertical pass: accumulate whole rows (vectorisable).
    let mut out = vec![0u8; oh * tmp_w * 3];
    let stride = tmp_w * 3;
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let k = &vert.kk[yy * vert.ksize..yy * vert.ksize + n];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        let base = ymin - row0;
        for (y, &ky) in k.iter().enumerate() {
            let in_row = &tmp[(base + y) * stride..(base + y + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(in_row) {
                *a += i32::from(v) * ky;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size matches")
}

/// Pillow's `Image.blend(a, b, alpha)` on 8-bit bands:
/// `a + alpha * (b - a)` in `f32`, truncated towards zero and clipped.
#[inline]
pub fn blend(a: u8, b: u8, alpha: f32) -> u8 {
    (f32::from(a) + alpha * ((i32::from(b) - i32::from(a)) as f32)) as u8
}

/// Pillow's `convert("L")` of one RGB pixel:
/// `(r*19595 + g*38470 + b*7471 + 0x8000) >> 16`.
#[inline]
pub fn to_grayscale(p: [u8; 3]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
}

/// `int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)` given the sum of
/// the grayscale values and the number of pixels (the mean is a `f64`
/// division, as in Python).
pub fn contrast_mean(gray_sum: u64, pixels: u64) -> u8 {
    if pixels == 0 {
        return 0;
    }
    ((gray_sum as f64 / pixels as f64) + 0.5).floor() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_matches_pillow_cases() {
        // brightness 1.4 on 200 saturates; 0.6 on 201 truncates 120.6 -> 120.
        assert_eq!(blend(0, 200, 1.4), 255);
        assert_eq!(blend(0, 201, 0.6), 120);
        // contrast below the mean with factor > 1 goes negative and clips.
        assert_eq!(blend(128, 10, 1.4), 0);
    }

    #[test]
    fn gray_weights() {
        assert_eq!(to_grayscale([255, 255, 255]), 255);
        assert_eq!(to_grayscale([0, 0, 0]), 0);
        assert_eq!(to_grayscale([255, 0, 0]), 76);
    }

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 99]));
        let same = resize_bicubic(&img, 37, 23);
        assert_eq!(same, img);
        for (w, h) in [(224, 224), (5, 7), (1, 1), (37, 100)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [12, 200, 99]), "constant image stays constant at {w}x{h}");
        }
    }
}
