//! Target codecs: how one view's `tokens x dim` floats become bytes.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::pca::PcaModel;

/// A target codec. The numeric id is written in every shard header.
///
/// New codecs get new ids; a reader that meets an unknown id refuses the
/// shard. Every codec decodes to `f32`. Fixed-size codecs also allow
/// zero-copy access to the stored values ([`crate::TargetsRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Codec {
    /// IEEE-754 binary32, little-endian. Exact.
    F32,
    /// IEEE-754 binary16, little-endian, round-to-nearest-even from `f32`.
    /// Relative error below 2^-11 per value; the default.
    F16,
    /// Per token: an `f32` scale `max |x| / 127`, then one signed byte per
    /// value, `round_ties_even(x / scale)`. Half the bytes of f16; token
    /// cosine to f32 above 0.9999 on real teachers (BENCHMARKS.md).
    Int8,
    /// A transform coder fitted per store (principal axes of the unit
    /// tokens, one quantiser step, entropy-coded residuals; [`crate::PcaModel`]).
    /// Keeps token directions only, at a fitted mean token cosine (0.996 by
    /// default); records vary in size. Needs the store's model file to
    /// encode or decode.
    Pca,
}

impl Codec {
    /// All codecs this build knows.
    pub const ALL: [Codec; 4] = [Codec::F32, Codec::F16, Codec::Int8, Codec::Pca];

    /// The id stored in shard headers.
    pub fn id(self) -> u32 {
        match self {
            Codec::F32 => 0,
            Codec::F16 => 1,
            Codec::Int8 => 2,
            Codec::Pca => 3,
        }
    }

    /// The codec with the given header id.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }

    /// Lower-case name, as on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Int8 => "int8",
            Codec::Pca => "pca",
        }
    }

    /// Parse a name as given on the command line.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether every record has the same size ([`Codec::encoded_len`]).
    pub fn is_fixed_size(self) -> bool {
        self != Codec::Pca
    }

    /// Whether the codec is fitted per store (a model file beside the manifest).
    pub fn needs_fit(self) -> bool {
        self == Codec::Pca
    }

    /// Encoded size of one view's targets (`tokens x dim` values); for a
    /// codec whose records vary in size, the largest record.
    pub fn encoded_len(self, tokens: usize, dim: usize) -> usize {
        match self {
            Codec::F32 => tokens * dim * 4,
            Codec::F16 => tokens * dim * 2,
            Codec::Int8 => tokens * (4 + dim),
            Codec::Pca => PcaModel::max_encoded_len(tokens as u64, dim as u64).map_or(usize::MAX, |n| n as usize),
        }
    }

    /// [`Codec::encoded_len`] without overflow (`None` when it does not fit
    /// a `u64`), for sizes read from untrusted headers.
    pub fn encoded_len_checked(self, tokens: u64, dim: u64) -> Option<u64> {
        match self {
            Codec::F32 => tokens.checked_mul(dim)?.checked_mul(4),
            Codec::F16 => tokens.checked_mul(dim)?.checked_mul(2),
            Codec::Int8 => tokens.checked_mul(dim.checked_add(4)?),
            Codec::Pca => PcaModel::max_encoded_len(tokens, dim),
        }
    }

    /// Append the encoding of `values` (tokens of `dim` values each) to `out`.
    ///
    /// # Panics
    /// If `dim` is zero or does not divide `values.len()`, or for
    /// [`Codec::Pca`], which encodes with its model ([`crate::PcaModel::encode`]).
    pub fn encode(self, values: &[f32], dim: usize, out: &mut Vec<u8>) {
        assert!(dim > 0 && values.len().is_multiple_of(dim), "values must be whole tokens of dim {dim}");
        match self {
            Codec::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Codec::F16 => {
                let start = out.len();
                out.resize(start + 2 * values.len(), 0);
                let mut halves = vec![half::f16::ZERO; values.len()];
                {
                    use half::slice::HalfFloatSliceExt;
                    halves.convert_from_f32_slice(values);
                }
                for (o, h) in out[start..].chunks_exact_mut(2).zip(&halves) {
                    o.copy_from_slice(&h.to_le_bytes());
                }
            }
            Codec::Int8 => {
                for token in values.chunks_exact(dim) {
                    let max = token.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    // round_ties_even, without a libm call per value: adding
                    // and removing 1.5 * 2^23 rounds |y| <= 127 to an integer,
                    // ties to even, in IEEE arithmetic
                    const MAGIC: f32 = 12_582_912.0;
                    out.extend(token.iter().map(|v| ((((v * inv).clamp(-127.0, 127.0) + MAGIC) - MAGIC) as i8) as u8));
                }
            }
            Codec::Pca => panic!("the pca codec encodes with its fitted model (PcaModel::encode)"),
        }
    }

    /// [`Codec::encode`] for every codec: `pca` is the store's fitted model,
    /// which [`Codec::Pca`] encodes with.
    ///
    /// # Errors
    /// [`StoreError::OutOfRange`] for [`Codec::Pca`] without its model.
    ///
    /// # Panics
    /// As [`Codec::encode`].
    pub fn encode_with(self, pca: Option<&PcaModel>, values: &[f32], dim: usize, out: &mut Vec<u8>) -> Result<()> {
        match (pca, self) {
            (Some(model), Codec::Pca) => model.encode(values, out),
            (None, Codec::Pca) => return Err(StoreError::OutOfRange("a pca store needs its fitted model to encode".into())),
            (_, codec) => codec.encode(values, dim, out),
        }
        Ok(())
    }

    /// Decode `bytes` (exactly [`Codec::encoded_len`] of `out`'s tokens of
    /// `dim` values) into `out`. Returns `false` when the length is wrong,
    /// and for [`Codec::Pca`], which decodes with its model
    /// ([`crate::PcaModel::decode`]).
    pub fn decode(self, bytes: &[u8], dim: usize, out: &mut [f32]) -> bool {
        if self == Codec::Pca || dim == 0 || !out.len().is_multiple_of(dim) || bytes.len() != self.encoded_len(out.len() / dim, dim) {
            return false;
        }
        match self {
            Codec::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Codec::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                // Aligned on a little-endian machine: the bulk conversion,
                // which uses the CPU's F16C instructions when it has them.
                Ok(halves) if cfg!(target_endian = "little") => {
                    use half::slice::HalfFloatSliceExt;
                    halves.convert_to_f32_slice(out);
                }
                _ => {
                    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            },
            Codec::Int8 => {
                for (o, rec) in out.chunks_exact_mut(dim).zip(bytes.chunks_exact(4 + dim)) {
                    let scale = f32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
                    for (x, &q) in o.iter_mut().zip(&rec[4..]) {
                        *x = f32::from(q as i8) * scale;
                    }
                }
            }
            Codec::Pca => return false,
        }
        true
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk conversions (F16C when the CPU has it) give the same bits as
    /// the one-value software conversions, subnormals and rounding included,
    /// so a store's bytes do not depend on the machine that wrote it.
    #[test]
    fn bulk_f16_equals_scalar_f16() {
        let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, 65504.0, 65520.0, 1e9, -1e9, 6.1e-5, 5.96e-8, 2.9e-8, 1e-10, f32::MIN_POSITIVE];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        while xs.len() < 100_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = f32::from_bits((state >> 32) as u32);
            if v.is_finite() {
                xs.push(v);
            }
        }
        let mut bulk = Vec::new();
        Codec::F16.encode(&xs, 1, &mut bulk);
        let scalar: Vec<u8> = xs.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        assert_eq!(bulk, scalar);
        let mut back = vec![0.0f32; xs.len()];
        assert!(Codec::F16.decode(&bulk, 1, &mut back));
        let one_by_one: Vec<f32> = scalar.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert!(back.iter().zip(&one_by_one).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }

    /// int8, byte by byte as FORMAT.md describes it: the scale, then the
    /// rounded values (ties to even); an all-zero token has scale 0.
    #[test]
    fn int8_bytes_as_documented() {
        let mut out = Vec::new();
        Codec::Int8.encode(&[127.0, -63.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0], 4, &mut out);
        assert_eq!(&out[..4], &1f32.to_le_bytes());
        let q: Vec<i8> = out[4..8].iter().map(|&b| b as i8).collect();
        assert_eq!(q, [127, -64, 0, 2], "-63.5 rounds to -64, 0.5 to 0, 1.5 to 2");
        assert_eq!(&out[8..12], &0f32.to_le_bytes());
        assert_eq!(&out[12..], &[0, 0, 0, 0]);
        let mut back = [9.0f32; 8];
        assert!(Codec::Int8.decode(&out, 4, &mut back));
        assert_eq!(back[4..], [0.0; 4]);
    }

    /// The rounding trick of the int8 encoder equals `round_ties_even` on
    /// every f32 in [-127, 127] of a fine grid, halves included.
    #[test]
    fn int8_rounding_is_ties_to_even() {
        for i in -254_000..=254_000 {
            let y = i as f32 / 2000.0;
            let mut out = Vec::new();
            Codec::Int8.encode(&[127.0, y], 2, &mut out);
            assert_eq!(out[5] as i8, y.round_ties_even() as i8, "{y}");
        }
    }

    #[test]
    fn round_trip() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let dim = 50;
        for c in Codec::ALL.into_iter().filter(|c| c.is_fixed_size()) {
            let mut bytes = Vec::new();
            c.encode(&xs, dim, &mut bytes);
            assert_eq!(bytes.len(), c.encoded_len(xs.len() / dim, dim));
            assert_eq!(Some(bytes.len() as u64), c.encoded_len_checked((xs.len() / dim) as u64, dim as u64));
            let mut back = vec![0.0; xs.len()];
            assert!(c.decode(&bytes, dim, &mut back));
            assert!(!c.decode(&bytes[1..], dim, &mut back), "{c}: a short record is refused");
            for (token, rec) in xs.chunks(dim).zip(back.chunks(dim)) {
                let max = token.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in token.iter().zip(rec) {
                    let tol = match c {
                        Codec::F32 => 0.0,
                        Codec::F16 => a.abs() * 1e-3 + 1e-4,
                        // half a quantisation step of the token's scale
                        _ => max / 127.0 * 0.5 * 1.0001,
                    };
                    assert!((a - b).abs() <= tol, "{c}: {a} vs {b}");
                }
            }
        }
        for c in Codec::ALL {
            assert_eq!(Codec::from_id(c.id()), Some(c));
            assert_eq!(Codec::parse(c.name()), Some(c));
        }
        // pca decodes with its model only (pca.rs tests it); its bound on a
        // record's length is one formula, also for the smallest views
        assert!(!Codec::Pca.decode(&[0; 64], 4, &mut [0.0; 4]));
        for (tokens, dim) in [(1, 1), (5, 6), (197, 512)] {
            let n = Codec::Pca.encoded_len(tokens, dim) as u64;
            assert_eq!(Codec::Pca.encoded_len_checked(tokens as u64, dim as u64), Some(n));
            assert!(n >= 260 + 3 * (tokens * dim) as u64, "{tokens}x{dim}: {n}");
        }
    }

    #[test]
    fn wrong_length_is_refused() {
        let mut out = vec![0.0; 3];
        assert!(!Codec::F16.decode(&[0; 5], 1, &mut out));
    }
}
