//! `caev2 export`: the encoder of a checkpoint as a safetensors file that
//! timm's `vit_*_patch16_224` loads, plus its configuration and a reference
//! input/output pair for `tools/scripts/check_timm_export.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Prefixes of pretraining-only parameters, dropped on export.
pub const PRETRAINING_ONLY: [&str; 3] = ["regressor.", "enc_to_reg.", "head."];

/// The JSON written next to the weights.
#[derive(Debug, Serialize)]
pub struct ExportConfig {
    /// timm model name.
    pub architecture: String,
    /// Keyword arguments for `timm.create_model` that make its modules match.
    pub timm_kwargs: serde_json::Value,
    /// Input size.
    pub img_size: i64,
    /// Patch size.
    pub patch_size: i64,
    /// Width.
    pub embed_dim: i64,
    /// Blocks.
    pub depth: i64,
    /// Heads.
    pub num_heads: i64,
    /// Input normalisation (ImageNet).
    pub mean: [f32; 3],
    /// Input normalisation (ImageNet).
    pub std: [f32; 3],
    /// The checkpoint exported.
    pub source: String,
    /// Pretraining steps of that checkpoint.
    pub steps: u64,
    /// How its run ran (the run folder's `run.json`), when recorded.
    pub provenance: Option<trainer::Provenance>,
}

/// What `export` wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    /// Weights.
    pub weights: PathBuf,
    /// Configuration.
    pub config: PathBuf,
    /// Reference input and features for the timm check.
    pub check: PathBuf,
    /// Tensors written.
    pub tensors: usize,
}

/// Export the encoder of `checkpoint` to `out` (`.safetensors`).
///
/// # Errors
/// Unreadable checkpoint, IO.
pub fn export(checkpoint: &Path, out: &Path) -> Result<Exported> {
    let loaded = trainer::load_checkpoint(checkpoint, Device::Cpu).with_context(|| format!("loading {}", checkpoint.display()))?;
    let m = &loaded.config.model;
    let mut tensors: Vec<(String, Tensor)> = loaded
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| !PRETRAINING_ONLY.iter().any(|p| n.starts_with(p)))
        .map(|(n, t)| (n, t.detach().to_kind(Kind::Float).contiguous()))
        .collect();
    tensors.push(("pos_embed".into(), loaded.model.pos_embed().detach().contiguous()));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&tensors, out).with_context(|| format!("writing {}", out.display()))?;

    // a reference input and our features for the timm check
    tch::manual_seed(0);
    let x = Tensor::randn([2, 3, m.image_size, m.image_size], (Kind::Float, Device::Cpu));
    let all = Tensor::arange(m.num_patches(), (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
    let feats = tch::no_grad(|| loaded.model.encode(&x, &all, trainer::model::Pass::Eval));
    let check = out.with_extension("check.safetensors");
    Tensor::write_safetensors(&[("input", &x), ("features", &feats)], &check).with_context(|| format!("writing {}", check.display()))?;

    let steps = checkpoint
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(loaded.config.steps);
    let cfg = ExportConfig {
        architecture: m.preset.timm_name().into(),
        timm_kwargs: serde_json::json!({
            "num_classes": 0, "num_heads": m.heads, "init_values": m.layer_scale_init,
            "embed_dim": m.width, "depth": m.depth, "img_size": m.image_size, "patch_size": m.patch_size,
        }),
        img_size: m.image_size,
        patch_size: m.patch_size,
        embed_dim: m.width,
        depth: m.depth,
        num_heads: m.heads,
        mean: trainer::loader::IMAGENET_MEAN,
        std: trainer::loader::IMAGENET_STD,
        source: checkpoint.display().to_string(),
        steps,
        provenance: loaded.provenance.clone(),
    };
    let config = out.with_extension("json");
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg)?).with_context(|| format!("writing {}", config.display()))?;
    Ok(Exported { weights: out.to_owned(), config, check, tensors: tensors.len() })
}
