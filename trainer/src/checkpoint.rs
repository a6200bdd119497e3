//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holds the weights (timm's
//! ViT names, `model.safetensors`), the optimiser's moments
//! (`optimizer.safetensors`) and the position (`state.json`: step and
//! seed, which with the configuration is the whole loader and RNG state);
//! `checkpoints/latest` names the newest. Saving, restoring for `--resume`,
//! and loading a student for evaluation or export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::model::Cae2;
use crate::optim::AdamW;
use crate::run_folder::{Provenance, read_provenance};

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    seed: u64,
}

/// Save model, optimiser and position as `checkpoints/step-NNNNNNNN/` (a
/// temporary folder committed whole), then point `checkpoints/latest` at
/// it; keeps the two newest.
pub(crate) fn save(out: &Path, vs: &nn::VarStore, opt: &AdamW, step: u64, seed: u64) -> Result<PathBuf> {
    let dir = out.join("checkpoints");
    let name = format!("step-{step:08}");
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp, "create checkpoint folder"))?;
    vs.save(tmp.join("model.safetensors"))?;
    let state = opt.state();
    Tensor::write_safetensors(&state, tmp.join("optimizer.safetensors"))?;
    let st = serde_json::to_vec_pretty(&CheckpointState { step, seed })
        .map_err(|e| TrainError::Checkpoint { path: tmp.clone(), what: format!("cannot serialise the state: {e}") })?;
    std::fs::write(tmp.join("state.json"), st).map_err(TrainError::io(&tmp, "write state"))?;
    // the three files appear together or not at all
    let final_dir = dir.join(&name);
    shard_store::commit_folder(&tmp, &final_dir)?;
    shard_store::write_file_atomic(&dir.join("latest"), name.as_bytes())?;
    let mut old: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(TrainError::io(&dir, "list"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    old.sort();
    for p in old.iter().rev().skip(2) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(final_dir)
}

/// Load the latest checkpoint's model and optimiser; returns its step.
pub(crate) fn restore(out: &Path, vs: &mut nn::VarStore, opt: &mut AdamW, device: tch::Device) -> Result<u64> {
    let ck = latest_checkpoint(out)?;
    vs.load(ck.join("model.safetensors")).map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    let state: CheckpointState = serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(TrainError::io(&ck, "read state"))?)
        .map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    let t = tensors_of(&ck.join("optimizer.safetensors"))?.into_iter().map(|(k, v)| (k, v.to_device(device))).collect();
    opt.load_state(&t, state.step as i64).map_err(|what| TrainError::Checkpoint { path: ck.clone(), what })?;
    Ok(state.step)
}

/// The latest checkpoint folder of a run.
///
/// # Errors
/// When the run has none.
pub fn latest_checkpoint(out: &Path) -> Result<PathBuf> {
    let latest = out.join("checkpoints/latest");
    let name = std::fs::read_to_string(&latest)
        .map_err(|_| TrainError::Checkpoint { path: latest.clone(), what: "no checkpoint to resume from".into() })?;
    Ok(out.join("checkpoints").join(name.trim()))
}

fn tensors_of(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)?.into_iter().collect())
}

/// A trained (or freshly initialised) student loaded for evaluation or export.
#[derive(Debug)]
pub struct LoadedModel {
    /// The run's configuration.
    pub config: TrainConfig,
    /// The parameters.
    pub vs: nn::VarStore,
    /// The model.
    pub model: Cae2,
    /// How its run ran (`RUN/run.json`), when recorded.
    pub provenance: Option<Provenance>,
}

/// Load the student of a checkpoint folder (`RUN/checkpoints/step-N`, or the
/// run folder itself for its latest checkpoint); the configuration is read
/// from `RUN/config.json`.
///
/// # Errors
/// Missing files or parameters that do not fit the configuration.
pub fn load_checkpoint(path: &Path, device: tch::Device) -> Result<LoadedModel> {
    let (ck, run) = locate(path)?;
    let cfg_path = run.join("config.json");
    let config: TrainConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(TrainError::io(&cfg_path, "read config"))?)
        .map_err(|e| TrainError::Checkpoint { path: cfg_path.clone(), what: e.to_string() })?;
    let mut vs = nn::VarStore::new(device);
    let model = Cae2::new(&vs.root(), &config.model);
    vs.load(ck.join("model.safetensors")).map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    Ok(LoadedModel { config, vs, model, provenance: read_provenance(&run) })
}

/// The checkpoint folder `path` names (a checkpoint, or a run folder for its
/// latest one) and its run folder.
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let ck = if path.join("model.safetensors").exists() { path.to_owned() } else { latest_checkpoint(path)? };
    let run = ck
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| TrainError::Checkpoint { path: ck.clone(), what: "not inside a run folder".into() })?
        .to_owned();
    Ok((ck, run))
}

/// How the run of checkpoint `path` (a checkpoint or a run folder) ran, when
/// its run folder records it: what evaluations and exports carry.
pub fn provenance_of(path: &Path) -> Option<Provenance> {
    locate(path).ok().and_then(|(_, run)| read_provenance(&run))
}

/// The student of `loaded`'s run as it was before its first step: the same
/// configuration, freshly initialised from the run's seed (the floor that
/// alignment and k-NN numbers are compared with).
pub fn initial_model(loaded: &LoadedModel, device: tch::Device) -> LoadedModel {
    let (vs, model) = Cae2::seeded(&loaded.config.model, loaded.config.seed, device);
    LoadedModel { config: loaded.config.clone(), vs, model, provenance: loaded.provenance.clone() }
}
