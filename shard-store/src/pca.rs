//! The `pca` codec: a per-store transform coder for token targets.
//!
//! Fitted once per store on a sample of its views, then frozen in a model
//! file beside the manifest (`codec-pca-<hash>.bin`, FORMAT.md), whose
//! SHA-256 is part of the store's identity. Per view:
//!
//! 1. each token is scaled to unit length (the losses only see directions,
//!    REFERENCE.md), centred on the fitted mean and rotated onto the fitted
//!    principal axes;
//! 2. every coefficient is quantised with one uniform step (chosen at fit
//!    time so that the fit sample's mean token cosine reaches the asked
//!    value) to an integer in `-127..=127`;
//! 3. each component's integers are predicted from the same component of
//!    the token's left, upper and upper-left neighbours on the patch grid
//!    (LOCO-I's median edge detector), and the residuals are entropy coded
//!    with per-component static frequency tables (rANS with 32 interleaved
//!    lanes that decode in SIMD, 12-bit frequencies: [`crate::rans`]).
//!
//! Decoding gives back the quantised coefficients exactly
//! ([`PcaModel::decode_coefficients`], cheap), or the reconstructed unit
//! tokens ([`PcaModel::decode`], a `D x D` product per token). The trainer
//! takes the coefficients and applies the (affine) reconstruction on its
//! device; grid resampling, being an affine combination of tokens, commutes
//! with it.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Result, StoreError};
use crate::rans::{ESC, SYMBOLS, Tables};

/// Magic bytes at the start of a model file.
pub const PCA_MAGIC: [u8; 8] = *b"CAEV2PCA";
/// Model file version this build writes and reads. Version 2 records use
/// 64 interleaved lanes with 16-bit words and raw escapes (decoded in
/// SIMD); version 1's byte-wise four-state records are refused.
pub const PCA_VERSION: u32 = 2;
const M: u32 = 1 << crate::rans::SCALE_BITS;
/// Fixed part of the model file before the per-component arrays.
const HEADER_BYTES: usize = 48;

/// Settings of a fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PcaFit {
    /// Views to fit on (spread over the dataset, see [`fit_sample_images`]).
    pub views: u64,
    /// Mean token cosine to reach on the fit sample.
    pub cosine: f32,
}

impl Default for PcaFit {
    /// 1,000 views, cosine 0.996 (issue 12 asks for 0.995 on held-out views;
    /// the margin covers the gap between fit and held-out views).
    fn default() -> Self {
        Self { views: 1000, cosine: 0.996 }
    }
}

/// The images whose views (all of them) make the fit sample of a store of
/// `num_images` images with `views_per_image` views: `ceil(fit_views / K)`
/// ids spread evenly over the dataset, `j * num_images / n`, ascending. The
/// same for `extract` and `inspect recode`, so both fit on the same views.
pub fn fit_sample_images(num_images: u64, views_per_image: u32, fit_views: u64) -> Vec<u64> {
    let n = fit_views.div_ceil(u64::from(views_per_image.max(1))).clamp(1, num_images.max(1)).min(num_images);
    (0..n).map(|j| (u128::from(j) * u128::from(num_images) / u128::from(n)) as u64).collect()
}

/// Frequencies from counts: every seen residual at least 1, the escape 1
/// when some residual was never seen, the rest in proportion to the
/// counts, the remainder to the most frequent residual.
fn frequencies_from_counts(counts: &[u64; 256]) -> [u16; SYMBOLS] {
    let used = counts.iter().filter(|&&c| c > 0).count() as u64;
    let esc = u64::from(used < 256);
    let total: u64 = counts.iter().sum::<u64>().max(1);
    let spare = u64::from(M) - esc - used;
    let mut freq = [0u16; SYMBOLS];
    for (f, &c) in freq.iter_mut().zip(counts) {
        if c > 0 {
            *f = (1 + c * spare / total) as u16;
        }
    }
    freq[ESC] = esc as u16;
    let sum: u64 = freq.iter().map(|&f| u64::from(f)).sum();
    let top = (0..256).max_by_key(|&s| (counts[s], std::cmp::Reverse(s))).unwrap_or(0);
    freq[top] += (u64::from(M) - sum) as u16;
    freq
}

/// A fitted `pca` codec (see the module docs).
#[derive(Debug, Clone)]
pub struct PcaModel {
    tokens: usize,
    dim: usize,
    has_cls: bool,
    grid: (usize, usize),
    step: f32,
    fit_cosine: f32,
    fit_views: u64,
    mean: Vec<f32>,
    variance: Vec<f32>,
    /// Row `k` is principal axis `k` (`dim x dim`).
    basis: Vec<f32>,
    /// The transpose: row `i` holds value `i` of every axis.
    basis_t: Vec<f32>,
    tables: Tables,
    bytes: Vec<u8>,
    sha256: String,
}

/// Round to the nearest integer, ties to even, for `|y| < 2^22` (adding and
/// removing 1.5 * 2^23 in IEEE single precision), clamped to `-127..=127`.
fn quantise(y: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    (((y.clamp(-127.0, 127.0)) + MAGIC) - MAGIC) as i8
}

/// The median edge detector of LOCO-I: the prediction of a grid value from
/// its left (`a`), upper (`b`) and upper-left (`c`) neighbours.
/// It equals the median of `a`, `b` and `a + b - c`, computed without
/// branches (the values are data, so branches would be mispredicted).
/// Generic so that the decoder can run it in 16-bit lanes, which vectorise.
#[inline(always)]
fn med<T: Ord + Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T>>(a: T, b: T, c: T) -> T {
    a.min(b).max(a.max(b).min(a + b - c))
}

impl PcaModel {
    /// Fit on `sample` (`n` views of `tokens x dim` values, concatenated):
    /// mean and principal axes of the unit tokens, the largest quantiser
    /// step whose mean token cosine on the sample reaches `cosine`, and the
    /// residual frequency tables.
    ///
    /// # Errors
    /// [`StoreError::OutOfRange`] for an empty sample, a shape that does not
    /// match `tokens = has_cls + rows * cols`, non-finite values, or a
    /// cosine outside `(0, 1)`.
    pub fn fit(sample: &[f32], tokens: usize, dim: usize, has_cls: bool, grid: (usize, usize), cosine: f32) -> Result<Self> {
        let bad = |what: String| Err(StoreError::OutOfRange(format!("pca fit: {what}")));
        let per_view = tokens * dim;
        if dim == 0 || tokens != usize::from(has_cls) + grid.0 * grid.1 {
            return bad(format!("{tokens} tokens do not make a {}x{} grid (cls: {has_cls})", grid.0, grid.1));
        }
        if sample.is_empty() || !sample.len().is_multiple_of(per_view) {
            return bad(format!("the sample must be whole views of {tokens} x {dim} values"));
        }
        if !(cosine > 0.0 && cosine < 1.0) {
            return bad(format!("target cosine {cosine} must be between 0 and 1"));
        }
        if sample.iter().any(|x| !x.is_finite()) {
            return bad("the sample has non-finite values".into());
        }
        let n_views = sample.len() / per_view;
        let rows = sample.len() / dim;
        let mut unit = sample.to_vec();
        unit.chunks_exact_mut(dim).for_each(normalise);
        // mean and covariance in double precision
        let mut mean64 = vec![0f64; dim];
        for t in unit.chunks_exact(dim) {
            for (m, &x) in mean64.iter_mut().zip(t) {
                *m += f64::from(x);
            }
        }
        mean64.iter_mut().for_each(|m| *m /= rows as f64);
        let mean: Vec<f32> = mean64.iter().map(|&m| m as f32).collect();
        let mut cov = nalgebra::DMatrix::<f64>::zeros(dim, dim);
        for chunk in unit.chunks(dim * 4096) {
            let r = chunk.len() / dim;
            let centred = nalgebra::DMatrix::<f32>::from_fn(r, dim, |i, j| chunk[i * dim + j] - mean[j]);
            let part = centred.tr_mul(&centred);
            cov += part.map(f64::from);
        }
        cov /= rows as f64;
        let eig = nalgebra::SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let mut basis = vec![0f32; dim * dim];
        let mut variance = vec![0f32; dim];
        for (k, &e) in order.iter().enumerate() {
            let v = eig.eigenvectors.column(e);
            // sign: the largest entry positive, so a refit gives the same axes
            let big = (0..dim).max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs())).unwrap_or(0);
            let sign = if v[big] < 0.0 { -1.0 } else { 1.0 };
            for i in 0..dim {
                basis[k * dim + i] = (sign * v[i]) as f32;
            }
            variance[k] = eig.eigenvalues[e].max(0.0) as f32;
        }
        // the axes alone first (no tables yet), to project with the encoder's arithmetic
        let mut model = Self::assemble(tokens, dim, has_cls, grid, 1.0, 0.0, n_views as u64, mean, variance, basis, Vec::new())
            .expect("no tables to check");
        // coefficients of the sample, with the encoder's own arithmetic
        let mut coef = vec![0f32; unit.len()];
        model.project(&unit, &mut coef);
        let step = model.search_step(&unit, &coef, cosine);
        let fit_cosine = model.mean_cosine(&unit, &coef, step, 1);
        // residual statistics at that step
        let mut counts = vec![[0u64; 256]; dim];
        let mut qc = vec![0i8; per_view];
        for view in coef.chunks_exact(per_view) {
            for (t, ct) in view.chunks_exact(dim).enumerate() {
                for (k, &c) in ct.iter().enumerate() {
                    qc[k * tokens + t] = quantise(c * (1.0 / step));
                }
            }
            model.residuals(&mut qc, |k, r| counts[k][r as usize] += 1);
        }
        let freqs: Vec<[u16; SYMBOLS]> = counts.iter().map(frequencies_from_counts).collect();
        model =
            Self::assemble(tokens, dim, has_cls, grid, step, fit_cosine, n_views as u64, model.mean, model.variance, model.basis, freqs)
                .ok_or_else(|| StoreError::OutOfRange("pca fit: frequency tables".into()))?;
        Ok(model)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        tokens: usize,
        dim: usize,
        has_cls: bool,
        grid: (usize, usize),
        step: f32,
        fit_cosine: f32,
        fit_views: u64,
        mean: Vec<f32>,
        variance: Vec<f32>,
        basis: Vec<f32>,
        freqs: Vec<[u16; SYMBOLS]>,
    ) -> Option<Self> {
        let mut basis_t = vec![0f32; dim * dim];
        for k in 0..dim {
            for i in 0..dim {
                basis_t[i * dim + k] = basis[k * dim + i];
            }
        }
        let mut bytes = Vec::with_capacity(HEADER_BYTES + dim * (8 + 4 * dim + 2 * SYMBOLS));
        bytes.extend_from_slice(&PCA_MAGIC);
        for v in [PCA_VERSION, tokens as u32, dim as u32, u32::from(has_cls), grid.0 as u32, grid.1 as u32] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&step.to_le_bytes());
        bytes.extend_from_slice(&fit_cosine.to_le_bytes());
        bytes.extend_from_slice(&fit_views.to_le_bytes());
        for x in mean.iter().chain(&variance).chain(&basis) {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        for f in freqs.iter().flatten() {
            bytes.extend_from_slice(&f.to_le_bytes());
        }
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let tables = Tables::new(freqs)?;
        Some(Self { tokens, dim, has_cls, grid, step, fit_cosine, fit_views, mean, variance, basis, basis_t, tables, bytes, sha256 })
    }

    /// Parse a model file's bytes (read from `path`, named in errors).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] or [`StoreError::UnsupportedModelVersion`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let corrupt = |offset: usize, what: String| StoreError::Corrupt { path: path.to_owned(), offset: offset as u64, what };
        if bytes.len() < HEADER_BYTES || bytes[..8] != PCA_MAGIC {
            return Err(corrupt(0, "not a caev2 pca model file (bad magic or too short)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let f32_at = |o: usize| f32::from_bits(u32_at(o));
        if u32_at(8) != PCA_VERSION {
            return Err(StoreError::UnsupportedModelVersion { path: path.to_owned(), found: u32_at(8), supported: PCA_VERSION });
        }
        let (tokens, dim, cls, rows, cols) =
            (u32_at(12) as usize, u32_at(16) as usize, u32_at(20), u32_at(24) as usize, u32_at(28) as usize);
        let (step, fit_cosine) = (f32_at(32), f32_at(36));
        let fit_views = u64::from(u32_at(40)) | (u64::from(u32_at(44)) << 32);
        let expected =
            dim.checked_mul(8 + 2 * SYMBOLS).and_then(|a| dim.checked_mul(dim)?.checked_mul(4)?.checked_add(a)?.checked_add(HEADER_BYTES));
        if dim == 0 || cls > 1 || Some(tokens) != rows.checked_mul(cols).and_then(|p| p.checked_add(cls as usize)) {
            return Err(corrupt(12, format!("impossible shape: {tokens} tokens, {dim} dims, {rows}x{cols} grid, cls {cls}")));
        }
        if expected != Some(bytes.len()) {
            return Err(corrupt(bytes.len(), format!("{} bytes, a model of {dim} dims has {expected:?}", bytes.len())));
        }
        if !(step.is_finite() && step > 0.0) {
            return Err(corrupt(32, format!("quantiser step {step} must be positive")));
        }
        let floats: Vec<f32> = bytes[HEADER_BYTES..HEADER_BYTES + 4 * dim * (dim + 2)]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(i) = floats.iter().position(|x| !x.is_finite()) {
            return Err(corrupt(HEADER_BYTES + 4 * i, "non-finite value".into()));
        }
        let fstart = HEADER_BYTES + 4 * dim * (dim + 2);
        let freqs: Vec<[u16; SYMBOLS]> = bytes[fstart..]
            .chunks_exact(2 * SYMBOLS)
            .map(|c| std::array::from_fn(|s| u16::from_le_bytes([c[2 * s], c[2 * s + 1]])))
            .collect();
        if let Some(k) = freqs.iter().position(|f| Tables::new(vec![*f]).is_none()) {
            return Err(corrupt(
                fstart + 2 * SYMBOLS * k,
                format!("frequency table of component {k} does not sum to {M} or has a wrong escape"),
            ));
        }
        let (mean, rest) = floats.split_at(dim);
        let (variance, basis) = rest.split_at(dim);
        let m = Self::assemble(
            tokens,
            dim,
            cls == 1,
            (rows, cols),
            step,
            fit_cosine,
            fit_views,
            mean.into(),
            variance.into(),
            basis.into(),
            freqs,
        )
        .ok_or_else(|| corrupt(fstart, "frequency tables".into()))?;
        debug_assert_eq!(m.bytes, bytes);
        Ok(m)
    }

    /// The model file's bytes (FORMAT.md).
    pub fn to_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// SHA-256 of [`PcaModel::to_bytes`], hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Name of the model file in a store folder: `codec-pca-` and the
    /// first 12 hex digits of its SHA-256.
    pub fn file_name(&self) -> String {
        format!("codec-pca-{}.bin", &self.sha256[..12])
    }

    /// Values per token.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens per view.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The quantiser step.
    pub fn step(&self) -> f32 {
        self.step
    }

    /// Mean token cosine reached on the fit sample.
    pub fn fit_cosine(&self) -> f32 {
        self.fit_cosine
    }

    /// Views the model was fitted on.
    pub fn fit_views(&self) -> u64 {
        self.fit_views
    }

    /// The mean unit token (`dim`).
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Variance of the fit sample along each axis, descending.
    pub fn variance(&self) -> &[f32] {
        &self.variance
    }

    /// The principal axes, row `k` = axis `k` (`dim x dim`, row-major):
    /// a token is `mean + sum_k c_k * basis[k]`.
    pub fn basis(&self) -> &[f32] {
        &self.basis
    }

    /// The largest record [`PcaModel::encode`] can write for `tokens x dim`
    /// values; `None` when it does not fit a `u64` (sizes read from a
    /// damaged header).
    pub fn max_encoded_len(tokens: u64, dim: u64) -> Option<u64> {
        Tables::max_encoded_len(tokens.checked_mul(dim)?)
    }

    /// Coefficients of unit tokens `u` (`n x dim`) into `c`:
    /// `c_k = sum_i (u_i - mean_i) basis[k][i]`, one multiply and one add
    /// per term, summed over `i` in order (the same bits on every machine,
    /// with or without AVX2). Eight tokens at a time share each row of the
    /// transposed basis, so it is read from memory once per eight tokens.
    fn project(&self, u: &[f32], c: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { project_avx512(self.dim, &self.mean, &self.basis_t, u, c) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { project_avx2(self.dim, &self.mean, &self.basis_t, u, c) };
        }
        project_impl::<8>(self.dim, &self.mean, &self.basis_t, u, c)
    }

    /// Mean cosine between the unit tokens and their reconstructions at
    /// `step`, over every `stride`-th token, computed in coefficient space
    /// (the basis is orthonormal): with `m = basis . mean`,
    /// `u . r = |mean|^2 + m . (c + q) + c . q` and `|r|^2 = |mean|^2 + 2 m . q + |q|^2`.
    fn mean_cosine(&self, unit: &[f32], coef: &[f32], step: f32, stride: usize) -> f32 {
        let dim = self.dim;
        let mean2: f64 = self.mean.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let m: Vec<f64> = (0..dim).map(|k| (0..dim).map(|i| f64::from(self.basis[k * dim + i]) * f64::from(self.mean[i])).sum()).collect();
        let (mut sum, mut n) = (0f64, 0usize);
        for (u, c) in unit.chunks_exact(dim).zip(coef.chunks_exact(dim)).step_by(stride.max(1)) {
            if u.iter().all(|&x| x == 0.0) {
                continue;
            }
            let (mut dot, mut r2) = (mean2, mean2);
            for ((&ck, &mk), _) in c.iter().zip(&m).zip(u) {
                let q = f64::from(f32::from(quantise(ck * (1.0 / step))) * step);
                let ck = f64::from(ck);
                dot += mk * (ck + q) + ck * q;
                r2 += 2.0 * mk * q + q * q;
            }
            sum += if r2 > 0.0 { dot / r2.sqrt() } else { 0.0 };
            n += 1;
        }
        if n == 0 { 1.0 } else { (sum / n as f64) as f32 }
    }

    /// The largest step (to 0.1 %) whose mean cosine reaches `target`, on
    /// up to ~50,000 of the sample's tokens. Steps below `max |c| / 127`
    /// would clip coefficients, so the search starts there (and returns
    /// that step when even it misses the target).
    fn search_step(&self, unit: &[f32], coef: &[f32], target: f32) -> f32 {
        let stride = (unit.len() / self.dim / 50_000).max(1);
        let max = coef.iter().fold(0f32, |m, c| m.max(c.abs()));
        let (mut lo, mut hi) = ((max / 127.0).max(1e-6), 2.0f32);
        if self.mean_cosine(unit, coef, hi, stride) >= target {
            return hi;
        }
        if self.mean_cosine(unit, coef, lo, stride) < target {
            return lo;
        }
        while hi / lo > 1.001 {
            let mid = (lo * hi).sqrt();
            if self.mean_cosine(unit, coef, mid, stride) >= target { lo = mid } else { hi = mid }
        }
        lo
    }

    /// Call `f(component, residual byte)` for every value of the quantised
    /// view `qc` (component-major: `qc[k * tokens + t]`), component by
    /// component, tokens in order.
    fn residuals(&self, qc: &mut [i8], mut f: impl FnMut(usize, u8)) {
        let (cls, cols) = (usize::from(self.has_cls), self.grid.1);
        for (k, col) in qc.chunks_exact_mut(self.tokens).enumerate() {
            walk(col, cls, cols, |pred, v| {
                f(k, (i32::from(v) - pred) as u8);
                Some(v)
            });
        }
    }

    /// Append the record of `values` (`tokens x dim`) to `out`.
    ///
    /// # Panics
    /// If `values` is not `tokens x dim` long.
    pub fn encode(&self, values: &[f32], out: &mut Vec<u8>) {
        let dim = self.dim;
        assert_eq!(values.len(), self.tokens * dim, "values must be tokens x dim");
        let mut u = values.to_vec();
        u.chunks_exact_mut(dim).for_each(normalise);
        let mut c = vec![0f32; values.len()];
        self.project(&u, &mut c);
        let inv = 1.0 / self.step;
        let mut qc = vec![0i8; values.len()];
        for (t, ct) in c.chunks_exact(dim).enumerate() {
            for (k, &ci) in ct.iter().enumerate() {
                qc[k * self.tokens + t] = quantise(ci * inv);
            }
        }
        let mut residuals = Vec::with_capacity(values.len());
        self.residuals(&mut qc, |_, r| residuals.push(r));
        self.tables.encode(&residuals, self.tokens, out);
    }

    /// Decode a record into the quantised coefficients, `q * step`
    /// (`tokens x dim`). `false` when the record is not a valid encoding
    /// (wrong length, bytes left over or missing, final states wrong).
    pub fn decode_coefficients(&self, bytes: &[u8], out: &mut [f32]) -> bool {
        let mut q = vec![0i8; self.tokens * self.dim];
        if out.len() != q.len() || !self.decode_q(bytes, &mut q) {
            return false;
        }
        let step = self.step;
        let convert = |out: &mut [f32], q: &[i8]| {
            for (x, &v) in out.iter_mut().zip(q) {
                *x = f32::from(v) * step;
            }
        };
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            fn wide(out: &mut [f32], q: &[i8], convert: impl Fn(&mut [f32], &[i8])) {
                convert(out, q)
            }
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { wide(out, &q, convert) };
            return true;
        }
        convert(out, &q);
        true
    }

    /// Decode a record into reconstructed unit tokens:
    /// `mean + sum_k q_k step basis[k]` (`tokens x dim`).
    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) -> bool {
        let dim = self.dim;
        let mut c = vec![0f32; out.len()];
        if !self.decode_coefficients(bytes, &mut c) {
            return false;
        }
        for (o, ct) in out.chunks_exact_mut(dim).zip(c.chunks_exact(dim)) {
            o.copy_from_slice(&self.mean);
            for (k, &ck) in ct.iter().enumerate() {
                if ck != 0.0 {
                    for (x, &b) in o.iter_mut().zip(&self.basis[k * dim..(k + 1) * dim]) {
                        *x += ck * b;
                    }
                }
            }
        }
        true
    }

    /// Decode a record (FORMAT.md) into token-major `q` (`tokens x dim`).
    fn decode_q(&self, bytes: &[u8], q: &mut [i8]) -> bool {
        // the residuals, component-major (the coding order), then moved
        // token-major, then the predictions added token by token, every
        // component at once (the same values as `walk`, in an order that
        // vectorises)
        let (tokens, dim) = (self.tokens, self.dim);
        let mut residuals = vec![0u8; tokens * dim];
        if !self.tables.decode(bytes, tokens, &mut residuals) {
            return false;
        }
        transpose(&residuals, dim, tokens, q);
        let (cls, cols) = (usize::from(self.has_cls), self.grid.1);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512bw") {
            #[target_feature(enable = "avx512f,avx512bw")]
            fn wide(q: &mut [i8], dim: usize, cls: usize, cols: usize) {
                add_predictions(q, dim, cls, cols)
            }
            // SAFETY: the CPU supports AVX-512BW, checked just above.
            unsafe { wide(q, dim, cls, cols) };
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn wide(q: &mut [i8], dim: usize, cls: usize, cols: usize) {
                add_predictions(q, dim, cls, cols)
            }
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { wide(q, dim, cls, cols) };
            return true;
        }
        add_predictions(q, dim, cls, cols);
        true
    }
}

/// `dst[c * rows + r] = src[r * cols + c]` for a `rows x cols` byte matrix
/// `src`: in 16 x 16 blocks with SSE2 on x86-64 (four rounds of byte
/// interleaves), the edges (and other CPUs) byte by byte.
fn transpose(src: &[u8], rows: usize, cols: usize, dst: &mut [i8]) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols, "transpose: sizes");
    #[cfg(target_arch = "x86_64")]
    let (r16, c16) = (rows / 16 * 16, cols / 16 * 16);
    #[cfg(not(target_arch = "x86_64"))]
    let (r16, c16) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    for r0 in (0..r16).step_by(16) {
        for c0 in (0..c16).step_by(16) {
            use std::arch::x86_64::*;
            // SAFETY: SSE2 is part of x86-64; the 16 rows of 16 bytes read
            // lie within `src` (r0 + 15 < rows, c0 + 15 < cols) and those
            // written within `dst` (c0 + 15 < cols, r0 + 15 < rows), as the
            // assert above makes both `rows x cols`.
            unsafe {
                let mut a: [__m128i; 16] = std::array::from_fn(|i| _mm_loadu_si128(src.as_ptr().add((r0 + i) * cols + c0).cast()));
                for _ in 0..4 {
                    let b = a;
                    for i in 0..8 {
                        a[2 * i] = _mm_unpacklo_epi8(b[i], b[i + 8]);
                        a[2 * i + 1] = _mm_unpackhi_epi8(b[i], b[i + 8]);
                    }
                }
                for (i, v) in a.iter().enumerate() {
                    _mm_storeu_si128(dst.as_mut_ptr().add((c0 + i) * rows + r0).cast(), *v);
                }
            }
        }
    }
    for r in 0..rows {
        let from = if r < r16 { c16 } else { 0 };
        for c in from..cols {
            dst[c * rows + r] = src[r * cols + c] as i8;
        }
    }
}

/// Turn token-major residuals `q` (`tokens x dim`) into values, token by
/// token, every component at once: the predictions of `walk` (left on the
/// first row, upper in the first column, the median edge detector
/// elsewhere, in 16-bit lanes where `a + b - c` fits).
#[inline(always)]
fn add_predictions(q: &mut [i8], dim: usize, cls: usize, cols: usize) {
    let tokens = q.len() / dim;
    for t in cls..tokens {
        let p = t - cls;
        let (y, x) = (p / cols, p % cols);
        let (done, rest) = q.split_at_mut(t * dim);
        let row = &mut rest[..dim];
        let at = |tt: usize| &done[tt * dim..(tt + 1) * dim];
        match (y, x) {
            (0, 0) => {}
            (0, _) => add_prediction(row, at(t - 1)),
            (_, 0) => add_prediction(row, at(t - cols)),
            _ => {
                let (a, b, c) = (at(t - 1), at(t - cols), at(t - cols - 1));
                // fixed-size blocks (so that the compiler vectorises), then the tail
                const W: usize = 64;
                let whole = dim / W * W;
                for k0 in (0..whole).step_by(W) {
                    let r: &mut [i8; W] = (&mut row[k0..k0 + W]).try_into().expect("W values");
                    let (a, b, c) = (&a[k0..k0 + W], &b[k0..k0 + W], &c[k0..k0 + W]);
                    for k in 0..W {
                        r[k] = med_add(a[k], b[k], c[k], r[k]);
                    }
                }
                for k in whole..dim {
                    row[k] = med_add(a[k], b[k], c[k], row[k]);
                }
            }
        }
    }
}

/// The median edge detector's prediction from `a`, `b`, `c` plus the
/// residual `r` (wrapping bytes), in 16-bit lanes (`a + b - c` fits).
#[inline(always)]
fn med_add(a: i8, b: i8, c: i8, r: i8) -> i8 {
    let pred = med(i16::from(a), i16::from(b), i16::from(c));
    (pred as u8).wrapping_add(r as u8) as i8
}

/// `row[k] = pred[k] + row[k]` (wrapping bytes), the residuals becoming values.
#[inline(always)]
fn add_prediction(row: &mut [i8], pred: &[i8]) {
    for (r, &p) in row.iter_mut().zip(pred) {
        *r = (p as u8).wrapping_add(*r as u8) as i8;
    }
}

/// Walk one component's values `col` (all tokens, in order) with their
/// predictions from the values before them: 0 for the CLS token and the
/// first patch, the left neighbour on the first row, the upper one in the
/// first column, the median edge detector of the left, upper and
/// upper-left ones elsewhere. `f(prediction, value)` gives the value to
/// keep (the encoder keeps it, the decoder rebuilds it); `false` when `f`
/// gave up.
#[inline(always)]
fn walk(col: &mut [i8], cls: usize, cols: usize, mut f: impl FnMut(i32, i8) -> Option<i8>) -> bool {
    for t in 0..cls.min(col.len()) {
        let Some(v) = f(0, col[t]) else { return false };
        col[t] = v;
    }
    // the left neighbour stays in a register (reading it back from `col`
    // would put a store-to-load round trip on the chain from value to value)
    let (mut x, mut first_row, mut left) = (0usize, true, 0i32);
    for t in cls..col.len() {
        let pred = match (first_row, x) {
            (true, 0) => 0,
            (true, _) => left,
            (false, 0) => i32::from(col[t - cols]),
            _ => med(left, i32::from(col[t - cols]), i32::from(col[t - cols - 1])),
        };
        let Some(v) = f(pred, col[t]) else { return false };
        col[t] = v;
        left = i32::from(v);
        x += 1;
        if x == cols {
            x = 0;
            first_row = false;
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn project_avx2(dim: usize, mean: &[f32], basis_t: &[f32], u: &[f32], c: &mut [f32]) {
    project_impl::<8>(dim, mean, basis_t, u, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn project_avx512(dim: usize, mean: &[f32], basis_t: &[f32], u: &[f32], c: &mut [f32]) {
    project_impl::<16>(dim, mean, basis_t, u, c)
}

/// The projection, blocked for registers: eight tokens by `KB` axes of
/// accumulators stay in registers while `i` runs over the values. Every
/// coefficient is still the sum over `i` in order of one product each.
#[inline(always)]
fn project_impl<const KB: usize>(dim: usize, mean: &[f32], basis_t: &[f32], u: &[f32], c: &mut [f32]) {
    const TB: usize = 8;
    let tokens = u.len() / dim;
    let (full_t, full_k) = (tokens / TB * TB, dim / KB * KB);
    let mut d = vec![0f32; TB * dim];
    for t0 in (0..full_t).step_by(TB) {
        for (dt, ut) in d.chunks_exact_mut(dim).zip(u[t0 * dim..].chunks_exact(dim)) {
            for ((x, &v), &m) in dt.iter_mut().zip(ut).zip(mean) {
                *x = v - m;
            }
        }
        for k0 in (0..full_k).step_by(KB) {
            let mut acc = [[0f32; KB]; TB];
            for i in 0..dim {
                let row: &[f32; KB] = basis_t[i * dim + k0..i * dim + k0 + KB].try_into().expect("KB values");
                for (a, dt) in acc.iter_mut().zip(d.chunks_exact(dim)) {
                    let x = dt[i];
                    for (al, &b) in a.iter_mut().zip(row) {
                        *al += x * b;
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                c[(t0 + t) * dim + k0..(t0 + t) * dim + k0 + KB].copy_from_slice(a);
            }
        }
        // the axes past the last whole block
        for t in t0..t0 + TB {
            project_plain(dim, mean, basis_t, &u[t * dim..(t + 1) * dim], &mut c[t * dim..(t + 1) * dim], full_k);
        }
    }
    for t in full_t..tokens {
        project_plain(dim, mean, basis_t, &u[t * dim..(t + 1) * dim], &mut c[t * dim..(t + 1) * dim], 0);
    }
}

/// Coefficients `from..dim` of one token, the reference order.
#[inline(always)]
fn project_plain(dim: usize, mean: &[f32], basis_t: &[f32], u: &[f32], c: &mut [f32], from: usize) {
    c[from..].fill(0.0);
    for (i, (&x, &m)) in u.iter().zip(mean).enumerate() {
        let d = x - m;
        for (ck, &b) in c[from..].iter_mut().zip(&basis_t[i * dim + from..(i + 1) * dim]) {
            *ck += d * b;
        }
    }
}

/// Scale a token to unit length (left as is when its norm is zero).
fn normalise(t: &mut [f32]) {
    let n = t.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        let inv = 1.0 / n;
        t.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views of a smooth random field on a grid: tokens with a few strong,
    /// spatially correlated directions plus noise, like a teacher's.
    fn views(n: usize, rows: usize, cols: usize, dim: usize, seed: u64) -> Vec<f32> {
        let rng = |seed: u64| {
            let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            }
        };
        // the same directions for every seed (one "teacher"), other images
        let mut fixed = rng(99);
        let axes: Vec<f32> = (0..8 * dim).map(|_| fixed()).collect();
        let mut rnd = rng(seed);
        let mut out = Vec::new();
        for _ in 0..n {
            let phase: Vec<f32> = (0..16).map(|_| rnd() * 6.0).collect();
            for t in 0..1 + rows * cols {
                let (y, x) = ((t / cols) as f32, (t % cols) as f32);
                for i in 0..dim {
                    let mut v = 0.3 + 0.05 * rnd();
                    for a in 0..8 {
                        v += (0.4 / (a + 1) as f32) * (phase[a] + 0.3 * y + 0.2 * x * phase[8 + a]).sin() * axes[a * dim + i];
                    }
                    out.push(v);
                }
            }
        }
        out
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        d / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    }

    #[test]
    fn fit_reaches_the_cosine_and_round_trips() {
        let (rows, cols, dim) = (4, 5, 24);
        let tokens = 1 + rows * cols;
        let fit = views(60, rows, cols, dim, 1);
        let m = PcaModel::fit(&fit, tokens, dim, true, (rows, cols), 0.995).expect("fit");
        assert!(m.fit_cosine() >= 0.995, "fit cosine {}", m.fit_cosine());
        let test = views(20, rows, cols, dim, 2);
        let mut cos = Vec::new();
        let mut bytes = 0;
        for v in test.chunks_exact(tokens * dim) {
            let mut rec = Vec::new();
            m.encode(v, &mut rec);
            bytes += rec.len();
            assert!(Some(rec.len() as u64) <= PcaModel::max_encoded_len(tokens as u64, dim as u64));
            let mut out = vec![0f32; v.len()];
            assert!(m.decode(&rec, &mut out));
            cos.extend(v.chunks_exact(dim).zip(out.chunks_exact(dim)).map(|(a, b)| cosine(a, b)));
            // coefficients are the quantised projections, exactly
            let mut c = vec![0f32; v.len()];
            assert!(m.decode_coefficients(&rec, &mut c));
            assert!(c.iter().all(|x| (x / m.step()).fract() == 0.0));
            // damage is caught by the decoder's own checks
            let mut bad = rec.clone();
            bad.pop();
            assert!(!m.decode_coefficients(&bad, &mut c));
        }
        let mean = cos.iter().sum::<f32>() / cos.len() as f32;
        assert!(mean > 0.99, "held-out mean cosine {mean}");
        assert!(bytes / 20 < tokens * dim, "{} bytes per view is not below one byte per value", bytes / 20);
    }

    /// Residuals the fit never saw go through the escape, and still decode
    /// exactly: quantised values far from anything in the sample.
    #[test]
    fn escapes_decode_exactly() {
        let (rows, cols, dim) = (3, 3, 8);
        let tokens = 1 + rows * cols;
        let m = PcaModel::fit(&views(30, rows, cols, dim, 3), tokens, dim, true, (rows, cols), 0.999).expect("fit");
        let mut odd = views(1, rows, cols, dim, 4);
        for (i, x) in odd.iter_mut().enumerate() {
            *x = if i % 7 == 0 { -3.0 } else { (i as f32 * 1.7).sin() };
        }
        let mut rec = Vec::new();
        m.encode(&odd, &mut rec);
        let mut c = vec![0f32; odd.len()];
        assert!(m.decode_coefficients(&rec, &mut c));
        // compare with the encoder's own quantisation
        for (t, ct) in odd.chunks_exact(dim).zip(c.chunks_exact(dim)) {
            let mut u = t.to_vec();
            normalise(&mut u);
            let mut p = vec![0f32; dim];
            project_plain(dim, m.mean(), &m.basis_t, &u, &mut p, 0);
            for (a, b) in p.iter().zip(ct) {
                assert_eq!(f32::from(quantise(a / m.step())) * m.step(), *b);
            }
        }
    }

    #[test]
    fn model_file_round_trips_and_damage_is_refused() {
        let (rows, cols, dim) = (2, 2, 6);
        let m = PcaModel::fit(&views(10, rows, cols, dim, 5), 5, dim, true, (rows, cols), 0.99).expect("fit");
        let p = Path::new("codec.bin");
        let back = PcaModel::from_bytes(p, m.to_bytes()).expect("parse");
        assert_eq!(back.sha256(), m.sha256());
        let mut bad = m.to_bytes().to_vec();
        let n = bad.len();
        bad[n - 2] ^= 0x40; // a frequency: the table no longer sums to 4096
        assert!(PcaModel::from_bytes(p, &bad).expect_err("damaged table").to_string().contains("frequency table"));
        assert!(PcaModel::from_bytes(p, &bad[..n - 1]).is_err());
    }

    /// The blocked projections (AVX-512, AVX2 or neither, whichever this
    /// CPU takes) give the reference order's bits, tails included.
    #[test]
    fn blocked_projection_equals_the_reference_order() {
        let (dim, tokens) = (40, 21);
        let m = PcaModel::fit(&views(12, 4, 5, dim, 6), tokens, dim, true, (4, 5), 0.99).expect("fit");
        let u: Vec<f32> = (0..tokens * dim).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let mut reference = vec![0f32; u.len()];
        for (ut, ct) in u.chunks_exact(dim).zip(reference.chunks_exact_mut(dim)) {
            project_plain(dim, m.mean(), &m.basis_t, ut, ct, 0);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for c in [
            {
                let mut c = vec![0f32; u.len()];
                m.project(&u, &mut c);
                c
            },
            {
                let mut c = vec![0f32; u.len()];
                project_impl::<8>(dim, m.mean(), &m.basis_t, &u, &mut c);
                c
            },
            {
                let mut c = vec![0f32; u.len()];
                project_impl::<16>(dim, m.mean(), &m.basis_t, &u, &mut c);
                c
            },
        ] {
            assert_eq!(bits(&c), bits(&reference));
        }
    }

    #[test]
    fn sample_images_are_spread() {
        assert_eq!(fit_sample_images(10, 2, 6), vec![0, 3, 6]);
        assert_eq!(fit_sample_images(3, 10, 1000), vec![0, 1, 2]);
        assert_eq!(fit_sample_images(5, 1, 0), vec![0]);
    }

    #[test]
    fn transpose_equals_the_plain_loop() {
        for (rows, cols) in [(16, 24), (384, 197), (5, 3), (9, 17), (8, 8), (320, 50), (33, 47)] {
            let src: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 251) as u8).collect();
            let mut dst = vec![0i8; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r] as u8, src[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
        }
    }

    #[test]
    fn med_predictor() {
        assert_eq!(med(3, 5, 6), 3);
        assert_eq!(med(3, 5, 1), 5);
        assert_eq!(med(3, 5, 4), 4);
    }
}
