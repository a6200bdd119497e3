//! Target codecs: how one view's `tokens x dim` floats become bytes.

use serde::{Deserialize, Serialize};

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
}

impl Codec {
    /// All codecs this build knows.
    pub const ALL: [Codec; 2] = [Codec::F32, Codec::F16];

    /// The id stored in shard headers.
    pub fn id(self) -> u32 {
        match self {
            Codec::F32 => 0,
            Codec::F16 => 1,
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
        }
    }

    /// Parse a name as given on the command line.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Encoded size of one view's targets.
    pub fn encoded_len(self, values: usize) -> usize {
        match self {
            Codec::F32 => values * 4,
            Codec::F16 => values * 2,
        }
    }

    /// Append the encoding of `values` to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
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
        }
    }

    /// Decode `bytes` (exactly [`Codec::encoded_len`] of `out.len()`) into
    /// `out`. Returns `false` when the length is wrong.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> bool {
        if bytes.len() != self.encoded_len(out.len()) {
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
        Codec::F16.encode(&xs, &mut bulk);
        let scalar: Vec<u8> = xs.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        assert_eq!(bulk, scalar);
        let mut back = vec![0.0f32; xs.len()];
        assert!(Codec::F16.decode(&bulk, &mut back));
        let one_by_one: Vec<f32> = scalar.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert!(back.iter().zip(&one_by_one).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }

    #[test]
    fn round_trip() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        for c in Codec::ALL {
            let mut bytes = Vec::new();
            c.encode(&xs, &mut bytes);
            assert_eq!(bytes.len(), c.encoded_len(xs.len()));
            let mut back = vec![0.0; xs.len()];
            assert!(c.decode(&bytes, &mut back));
            for (a, b) in xs.iter().zip(&back) {
                let tol = if c == Codec::F32 { 0.0 } else { a.abs() * 1e-3 + 1e-4 };
                assert!((a - b).abs() <= tol, "{c}: {a} vs {b}");
            }
            assert_eq!(Codec::from_id(c.id()), Some(c));
            assert_eq!(Codec::parse(c.name()), Some(c));
        }
    }

    #[test]
    fn wrong_length_is_refused() {
        let mut out = vec![0.0; 3];
        assert!(!Codec::F16.decode(&[0; 5], &mut out));
    }
}
