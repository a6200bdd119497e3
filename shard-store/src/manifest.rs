//! `manifest.json`: what makes the targets of a store comparable.

use std::path::{Path, PathBuf};

use caev2_views::ViewSettings;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::Codec;
use crate::error::{Result, StoreError, io};
use crate::format::{EMBEDDED_IMAGES_VERSION, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, OLDEST_SUPPORTED_VERSION, PLAIN_FORMAT_VERSION};
use crate::images::ImagePackHeader;
use crate::pca::{PcaFit, PcaModel};
use crate::shard::ShardHeader;

/// Write `v` as canonical JSON: no whitespace, object keys sorted by their
/// bytes at every level, strings and numbers as serde_json writes them
/// (numbers in their shortest round-trip form). It does not depend on the
/// order of serde_json's maps (which a `preserve_order` feature enabled by
/// any dependency would change) or of struct fields.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The teacher whose outputs are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// Human-readable name, e.g. `clip-vit-b16`.
    pub name: String,
    /// SHA-256 of the ONNX file, hex.
    pub onnx_sha256: String,
    /// Name of the graph output that holds the tokens.
    pub output: String,
    /// Input size in pixels (square).
    pub input_size: u32,
    /// Per-channel input mean (RGB), applied after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel input standard deviation (RGB).
    pub std: [f32; 3],
    /// Patch size of the teacher in pixels.
    pub patch_size: u32,
    /// Whether token 0 is a CLS token.
    pub has_cls: bool,
    /// Patch grid `[rows, cols]`; `tokens = has_cls + rows * cols`.
    pub grid: [u32; 2],
    /// Tokens per view.
    pub tokens: u32,
    /// Values per token.
    pub dim: u32,
    /// Numeric precision the teacher ran in (`fp32`).
    pub precision: String,
}

impl TeacherInfo {
    /// Fit the `pca` codec's model to `sample` (whole views of this
    /// teacher's targets, `tokens x dim` each), keeping the fewest axes
    /// that reach mean token cosine `cosine`.
    ///
    /// # Errors
    /// As [`PcaModel::fit`].
    pub fn fit_pca(&self, sample: &[f32], cosine: f32) -> Result<PcaModel> {
        let g = self.grid;
        PcaModel::fit(sample, self.tokens as usize, self.dim as usize, self.has_cls, (g[0] as usize, g[1] as usize), cosine)
    }
}

/// How views were generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewsInfo {
    /// Seed of the view sampler.
    pub seed: u64,
    /// Views stored per image (K).
    pub views_per_image: u32,
    /// Augmentation settings.
    pub settings: ViewSettings,
    /// Identity of the image decoder (a different decoder can give different
    /// pixels for the same JPEG, so views would not rebuild bit for bit).
    pub decoder: String,
}

/// The images the store was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// The folder given on the command line (informational: other machines
    /// may mount the same data elsewhere).
    pub root: String,
    /// Number of image files found (including any that fail to decode).
    pub num_images: u64,
    /// SHA-256 of the sorted relative paths, each followed by `\n`, hex.
    pub file_list_sha256: String,
    /// Class folder names in label order; empty for an unlabelled folder.
    pub classes: Vec<String>,
}

/// How images are split into shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Images per shard; shard `s` holds images `s*n .. (s+1)*n`.
    pub images_per_shard: u32,
    /// Number of shards.
    pub num_shards: u32,
}

impl Layout {
    /// The layout for `num_images` images with `images_per_shard` per shard.
    pub fn new(num_images: u64, images_per_shard: u32) -> Self {
        let ips = u64::from(images_per_shard.max(1));
        Self { images_per_shard: images_per_shard.max(1), num_shards: num_images.div_ceil(ips) as u32 }
    }

    /// Where view `view` of image `image_id` lives: `(shard, slot)`, with
    /// slot `(image_id - first image of the shard) * K + view` (FORMAT.md).
    pub fn slot(&self, image_id: u64, view: u32, views_per_image: u32) -> (u32, u64) {
        let ips = u64::from(self.images_per_shard);
        ((image_id / ips) as u32, (image_id % ips) * u64::from(views_per_image) + u64::from(view))
    }

    /// Image ids of shard `s`.
    pub fn images_of(&self, shard: u32, num_images: u64) -> std::ops::Range<u64> {
        let start = u64::from(shard) * u64::from(self.images_per_shard);
        start.min(num_images)..(start + u64::from(self.images_per_shard)).min(num_images)
    }
}

/// A fitted codec's settings and its model file (codecs that need a fit,
/// [`Codec::needs_fit`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodecFit {
    /// Views asked for the fit.
    pub views: u64,
    /// Mean token cosine asked of the fit.
    pub cosine: f32,
    /// The model file, relative to the store folder (empty until fitted).
    pub file: String,
    /// SHA-256 of the model file, hex (empty until fitted).
    pub sha256: String,
}

impl CodecFit {
    /// What a run with `codec` and `fit` asks for (`None` for codecs
    /// without a fit); the model's file and hash are filled in when the
    /// store is created.
    pub fn asked(codec: Codec, fit: PcaFit) -> Option<Self> {
        codec.needs_fit().then(|| Self { views: fit.views, cosine: fit.cosine, file: String::new(), sha256: String::new() })
    }
}

/// The `images` value of a store that carries its images.
const EMBEDDED: &str = "embedded";

/// The manifest of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"caev2-store"`.
    pub format: String,
    /// 1, or 2 for a store that carries its images.
    pub format_version: u32,
    /// First 12 bytes of the SHA-256 of the identity fields, hex; also in
    /// every shard header.
    pub store_id: String,
    /// The teacher.
    pub teacher: TeacherInfo,
    /// View generation.
    pub views: ViewsInfo,
    /// Target codec.
    pub codec: Codec,
    /// The fitted codec's settings and model (absent for codecs without a fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec_fit: Option<CodecFit>,
    /// The images.
    pub dataset: DatasetInfo,
    /// `"embedded"` when every shard carries its images' file bytes in an
    /// image pack (format version 2); absent when the images are read from
    /// the dataset folder (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// Sharding.
    pub layout: Layout,
    /// Program that created the store (informational).
    pub created_by: String,
}

impl Manifest {
    /// A manifest with its `store_id` computed from the other fields.
    pub fn new(teacher: TeacherInfo, views: ViewsInfo, codec: Codec, dataset: DatasetInfo, layout: Layout, created_by: String) -> Self {
        let mut m = Self {
            format: FORMAT_NAME.into(),
            format_version: PLAIN_FORMAT_VERSION,
            store_id: String::new(),
            teacher,
            views,
            codec,
            codec_fit: None,
            dataset,
            images: None,
            layout,
            created_by,
        };
        m.store_id = m.compute_store_id();
        m
    }

    /// This manifest for a store that carries its images (`embed`) or not:
    /// format version 2 with `images: "embedded"`, or version 1 (the
    /// `store_id` follows).
    pub fn with_embedded_images(mut self, embed: bool) -> Self {
        self.images = embed.then(|| EMBEDDED.to_owned());
        self.format_version = if embed { EMBEDDED_IMAGES_VERSION } else { PLAIN_FORMAT_VERSION };
        self.store_id = self.compute_store_id();
        self
    }

    /// Whether the store carries its images.
    pub fn embeds_images(&self) -> bool {
        self.images.as_deref() == Some(EMBEDDED)
    }

    /// The header every image pack `s` of this store must carry.
    pub fn image_pack_header(&self, s: u32) -> ImagePackHeader {
        let range = self.layout.images_of(s, self.dataset.num_images);
        ImagePackHeader {
            shard_index: s,
            first_image: range.start,
            num_images: (range.end - range.start) as u32,
            store_id: self.store_id_bytes(),
        }
    }

    /// This manifest with the codec's fit settings and model file (the
    /// `store_id` follows).
    pub fn with_codec_fit(mut self, fit: Option<CodecFit>) -> Self {
        self.codec_fit = fit;
        self.store_id = self.compute_store_id();
        self
    }

    /// The identity fields as JSON: everything except `store_id`,
    /// `created_by` and `dataset.root` (`codec_fit` and `images` only when
    /// present, so the ids of stores without them did not change when they
    /// were added).
    fn identity(&self) -> serde_json::Value {
        let d = &self.dataset;
        let mut id = serde_json::json!({
            "format_version": self.format_version,
            "teacher": self.teacher,
            "views": self.views,
            "codec": self.codec,
            "dataset": {"num_images": d.num_images, "file_list_sha256": d.file_list_sha256, "classes": d.classes},
            "layout": self.layout,
        });
        if let (Some(fit), Some(map)) = (&self.codec_fit, id.as_object_mut()) {
            map.insert("codec_fit".into(), serde_json::json!(fit));
        }
        if let (Some(images), Some(map)) = (&self.images, id.as_object_mut()) {
            map.insert("images".into(), serde_json::json!(images));
        }
        id
    }

    /// The identity without the fitted model (its file and hash): what a
    /// run asks for before it has fitted anything.
    fn settings(&self) -> serde_json::Value {
        let mut id = self.identity();
        if let Some(fit) = id.get_mut("codec_fit").and_then(|f| f.as_object_mut()) {
            fit.remove("file");
            fit.remove("sha256");
        }
        id
    }

    /// The identity as canonical JSON (see [`canonical_json`]): the bytes
    /// `store_id` hashes.
    pub fn identity_json(&self) -> String {
        let mut out = String::new();
        canonical_json(&self.identity(), &mut out);
        out
    }

    fn compute_store_id(&self) -> String {
        let digest = Sha256::digest(self.identity_json().as_bytes());
        hex::encode(&digest[..12])
    }

    /// The store id as the 12 bytes written in shard headers.
    pub fn store_id_bytes(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        if let Ok(b) = hex::decode(&self.store_id)
            && b.len() == 12
        {
            out.copy_from_slice(&b);
        }
        out
    }

    /// The header every shard `s` of this store must carry.
    pub fn shard_header(&self, s: u32) -> ShardHeader {
        let range = self.layout.images_of(s, self.dataset.num_images);
        ShardHeader {
            codec: self.codec,
            shard_index: s,
            views_per_image: self.views.views_per_image,
            first_image: range.start,
            num_images: (range.end - range.start) as u32,
            tokens: self.teacher.tokens,
            dim: self.teacher.dim,
            store_id: self.store_id_bytes(),
        }
    }

    /// Target values per view (`tokens * dim`).
    pub fn values_per_view(&self) -> usize {
        self.teacher.tokens as usize * self.teacher.dim as usize
    }

    /// The first identity field that differs from `requested`, as
    /// `(dotted path, this value, requested value)`. A fitted codec's model
    /// is not compared (a run that opens a store reuses the store's).
    pub fn first_difference(&self, requested: &Manifest) -> Option<(String, String, String)> {
        fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<(String, String, String)> {
            match (a, b) {
                (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                    for (k, va) in x {
                        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        match y.get(k) {
                            Some(vb) => {
                                if let Some(d) = walk(&path, va, vb) {
                                    return Some(d);
                                }
                            }
                            None => return Some((path, va.to_string(), "nothing".into())),
                        }
                    }
                    y.keys().find(|k| !x.contains_key(*k)).map(|k| (format!("{prefix}.{k}"), "nothing".into(), y[k].to_string()))
                }
                _ if a == b => None,
                _ => Some((prefix.to_owned(), a.to_string(), b.to_string())),
            }
        }
        walk("", &self.settings(), &requested.settings())
    }

    /// Fail with [`StoreError::Incompatible`] if `requested` differs from
    /// this manifest in any identity field.
    ///
    /// # Errors
    /// [`StoreError::Incompatible`] naming the first differing field.
    pub fn check_same(&self, store: &Path, requested: &Manifest) -> Result<()> {
        match self.first_difference(requested) {
            None => Ok(()),
            Some((field, found, requested)) => Err(StoreError::Incompatible { store: store.to_owned(), field, found, requested }),
        }
    }

    /// Read and validate `dir/manifest.json`.
    ///
    /// # Errors
    /// IO, JSON, unsupported version, or a `store_id` that does not match the
    /// contents (a hand-edited manifest).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(io(&path, "read manifest"))?;
        let head: serde_json::Value = serde_json::from_slice(&bytes).map_err(|source| StoreError::Json { path: path.clone(), source })?;
        if head.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(StoreError::Corrupt { path, offset: 0, what: format!("not a caev2 store manifest (format != {FORMAT_NAME:?})") });
        }
        let version = head.get("format_version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if !(OLDEST_SUPPORTED_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(StoreError::UnsupportedVersion { path, found: version, supported: FORMAT_VERSION });
        }
        let m: Manifest = serde_json::from_value(head).map_err(|source| StoreError::Json { path: path.clone(), source })?;
        let images_ok = match version {
            EMBEDDED_IMAGES_VERSION => m.embeds_images(),
            _ => m.images.is_none(),
        };
        if !images_ok {
            return Err(StoreError::Corrupt {
                path,
                offset: 0,
                what: format!(
                    "format_version {version} with images {:?} (version 2 stores, and only they, have images \"{EMBEDDED}\")",
                    m.images
                ),
            });
        }
        if m.store_id != m.compute_store_id() {
            return Err(StoreError::Corrupt {
                path,
                offset: 0,
                what: format!("store_id {} does not match the manifest contents ({})", m.store_id, m.compute_store_id()),
            });
        }
        Ok(m)
    }

    /// Path of the manifest in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Pretty JSON bytes.
    ///
    /// # Errors
    /// [`StoreError::Json`] (not expected: every field serialises).
    pub fn to_json(&self, path: &Path) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self).map_err(|source| StoreError::Json { path: path.to_owned(), source })?;
        v.push(b'\n');
        Ok(v)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest::new(
            TeacherInfo {
                name: "tiny".into(),
                onnx_sha256: "ab".repeat(32),
                output: "tokens".into(),
                input_size: 32,
                mean: [0.5; 3],
                std: [0.25; 3],
                patch_size: 16,
                has_cls: true,
                grid: [2, 2],
                tokens: 5,
                dim: 8,
                precision: "fp32".into(),
            },
            ViewsInfo { seed: 0, views_per_image: 2, settings: ViewSettings::cae_v2(224, 32), decoder: "image-0.25.10".into() },
            Codec::F16,
            DatasetInfo { root: "/data".into(), num_images: 5, file_list_sha256: "cd".repeat(32), classes: vec![] },
            Layout::new(5, 2),
            "test".into(),
        )
    }

    #[test]
    fn store_id_ignores_root_and_creator() {
        let a = sample();
        let mut b = a.clone();
        b.dataset.root = "/elsewhere".into();
        b.created_by = "other".into();
        assert_eq!(a.first_difference(&b), None);
        let c = Manifest::new(b.teacher.clone(), b.views.clone(), Codec::F32, b.dataset.clone(), b.layout.clone(), "x".into());
        assert_ne!(a.store_id, c.store_id);
        let (field, found, req) = a.first_difference(&c).expect("codec differs");
        assert_eq!((field.as_str(), found.as_str(), req.as_str()), ("codec", "\"f16\"", "\"f32\""));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b": {"z": 1, "a": [2.5, {"y": true, "x": null}]}, "a": "s\"q"}"#).expect("json");
        let mut out = String::new();
        canonical_json(&v, &mut out);
        assert_eq!(out, r#"{"a":"s\"q","b":{"a":[2.5,{"x":null,"y":true}],"z":1}}"#);
    }

    #[test]
    fn store_id_test_vector() {
        // Pinned: a change here orphans every existing store (format v1).
        let m = sample();
        assert_eq!(m.store_id, "2b4c6858c87ffe9746425b26", "identity JSON: {}", m.identity_json());
    }

    #[test]
    fn embedded_images_make_a_version_2_store_with_its_own_id() {
        let plain = sample();
        let embedded = sample().with_embedded_images(true);
        assert_eq!((plain.format_version, embedded.format_version), (1, 2));
        assert!(embedded.embeds_images() && !plain.embeds_images());
        assert_ne!(plain.store_id, embedded.store_id);
        assert!(embedded.identity_json().contains(r#""images":"embedded""#));
        assert_eq!(embedded.clone().with_embedded_images(false), plain, "and back");
        let (field, _, _) = plain.first_difference(&embedded).expect("differs");
        assert_eq!(field, "format_version");
        // pinned like version 1's
        assert_eq!(embedded.store_id, "3b572857dd7b8d1de102d38b", "identity JSON: {}", embedded.identity_json());
    }

    #[test]
    fn layout_ranges() {
        let l = Layout::new(5, 2);
        assert_eq!(l.num_shards, 3);
        assert_eq!(l.images_of(2, 5), 4..5);
    }
}
