//! Mapping targets between token grids.
//!
//! A store keeps the teacher's tokens on the teacher's own patch grid (e.g.
//! 16x16 for a /14 teacher at 224 px). When a /16 student at 224 px (14x14)
//! trains on it, the patch targets are resampled to the student grid by
//! bilinear interpolation with `align_corners = false` (PyTorch's
//! `F.interpolate(..., mode="bilinear")` convention), each patch centre
//! mapped to the same image position; the CLS token, if any, is passed
//! through. Stores extracted at a teacher size that gives the student's grid
//! (the paper's CLIP-L/14 at 196 px) need no resampling.

/// Resample `tokens` (`[has_cls + from.0 * from.1, dim]`, row-major) to the
/// grid `to`, returning `[has_cls + to.0 * to.1, dim]`.
///
/// # Panics
/// If `tokens.len()` does not match `from`, `has_cls` and `dim`.
pub fn resample_grid(tokens: &[f32], dim: usize, has_cls: bool, from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let c = usize::from(has_cls);
    assert_eq!(tokens.len(), (c + from.0 * from.1) * dim, "token buffer does not match the grid");
    if from == to {
        return tokens.to_vec();
    }
    let mut out = vec![0f32; (c + to.0 * to.1) * dim];
    out[..c * dim].copy_from_slice(&tokens[..c * dim]);
    let patches = &tokens[c * dim..];
    // source coordinate of destination index i: (i + 0.5) * in/out - 0.5, clamped at 0
    let coord = |i: usize, n_in: usize, n_out: usize| -> (usize, usize, f32) {
        let s = ((i as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, (s - i0 as f64) as f32)
    };
    for y in 0..to.0 {
        let (y0, y1, wy) = coord(y, from.0, to.0);
        for x in 0..to.1 {
            let (x0, x1, wx) = coord(x, from.1, to.1);
            let dst = &mut out[(c + y * to.1 + x) * dim..(c + y * to.1 + x + 1) * dim];
            let at = |yy: usize, xx: usize| &patches[(yy * from.1 + xx) * dim..(yy * from.1 + xx + 1) * dim];
            let (a, b, cc, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            for k in 0..dim {
                let top = a[k] * (1.0 - wx) + b[k] * wx;
                let bottom = cc[k] * (1.0 - wx) + d[k] * wx;
                dst[k] = top * (1.0 - wy) + bottom * wy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_grid_is_identity() {
        let t: Vec<f32> = (0..(1 + 4) * 3).map(|i| i as f32).collect();
        assert_eq!(resample_grid(&t, 3, true, (2, 2), (2, 2)), t);
    }

    #[test]
    fn cls_passes_through_and_constants_stay() {
        let dim = 2;
        let mut t = vec![9.0, -9.0];
        t.extend(std::iter::repeat_n([1.5f32, -0.5], 16 * 16).flatten());
        let out = resample_grid(&t, dim, true, (16, 16), (14, 14));
        assert_eq!(out.len(), (1 + 196) * dim);
        assert_eq!(&out[..2], &[9.0, -9.0]);
        assert!(out[2..].chunks(2).all(|p| (p[0] - 1.5).abs() < 1e-6 && (p[1] + 0.5).abs() < 1e-6));
    }

    #[test]
    fn linear_field_maps_to_the_same_image_positions() {
        // value = image x position of the patch centre, in units of the image width
        let (from, to) = ((16usize, 16usize), (14usize, 14usize));
        let t: Vec<f32> = (0..from.0 * from.1).map(|i| ((i % from.1) as f32 + 0.5) / from.1 as f32).collect();
        let out = resample_grid(&t, 1, false, from, to);
        for y in 0..to.0 {
            for x in 1..to.1 - 1 {
                let expect = (x as f32 + 0.5) / to.1 as f32;
                assert!((out[y * to.1 + x] - expect).abs() < 1e-5, "x={x}: {} vs {expect}", out[y * to.1 + x]);
            }
        }
    }
}
