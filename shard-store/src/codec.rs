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
                for v in values {
                    out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
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
            Codec::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
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
