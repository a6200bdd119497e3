//! The run folder, owned by one training at a time:
//!
//! ```text
//! RUN/
//!   run.lock        exclusive lock of the training that holds the folder (pid, host, start)
//!   config.json     the resolved settings (TrainConfig)
//!   run.json        how it ran: every invocation's program, versions, host, ranks and devices
//!   metrics.jsonl   a line per step (step.rs's Metrics)
//!   checkpoints/    step-NNNNNNNN/ and latest (checkpoint.rs)
//! ```
//!
//! The lock is `flock(2)` on `run.lock`, taken before anything else in the
//! folder is read or written and held for the whole run; the kernel drops
//! it when the process ends, however it ends, so a killed run never leaves
//! a stale lock, and `--resume` takes the folder over at once.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Program, TrainConfig};
use crate::error::{Result, TrainError};
use crate::step::Metrics;

/// The lock file of a run folder.
pub const LOCK_FILE: &str = "run.lock";
/// The provenance file of a run folder.
pub const PROVENANCE_FILE: &str = "run.json";

/// A run folder held by this process.
#[derive(Debug)]
pub(crate) struct RunFolder {
    out: PathBuf,
    /// Holds the `flock` until dropped.
    _lock: File,
}

impl RunFolder {
    /// Take the run folder `out` (created if needed) for this process.
    ///
    /// # Errors
    /// [`TrainError::RunFolder`] when another training holds it, naming
    /// its pid, host and start; IO errors. Nothing in the folder changes.
    pub(crate) fn take(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(TrainError::io(out, "create run folder"))?;
        let path = out.join(LOCK_FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(TrainError::io(&path, "open the run folder's lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // the holder writes who it is right after locking: give it a moment
                let mut holder = String::new();
                for _ in 0..100 {
                    holder = std::fs::read_to_string(&path).unwrap_or_default().trim().to_owned();
                    if !holder.is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                if holder.is_empty() {
                    holder = "one that has not written its pid yet".into();
                }
                return Err(TrainError::RunFolder {
                    path: out.to_owned(),
                    what: format!("in use by another training ({holder}); wait for it to end, or train into another --out"),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(TrainError::Io { path, op: "lock the run folder", source: e }),
        }
        // who holds it, for the message above (the lock, not this text, is what excludes)
        let me = format!("pid {} on {} since {}", std::process::id(), crate::dist::host_name(), now());
        file.set_len(0).and_then(|()| file.write_all(me.as_bytes())).map_err(TrainError::io(&path, "write the run folder's lock"))?;
        Ok(Self { out: out.to_owned(), _lock: file })
    }

    /// Create or check `config.json`. Returns whether the run resumes from
    /// a checkpoint. A run killed before its first checkpoint holds no
    /// progress: both a plain rerun and `--resume` start it over.
    ///
    /// # Errors
    /// A folder holding another run, or checkpoints without `--resume`.
    pub(crate) fn prepare(&self, cfg: &TrainConfig, store_id: &str, resume: bool) -> Result<bool> {
        let cfg_path = self.out.join("config.json");
        let has_checkpoint = self.out.join("checkpoints/latest").exists();
        if resume && has_checkpoint {
            let old: TrainConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(TrainError::io(&cfg_path, "read config"))?)
                .map_err(|source| TrainError::Json { path: cfg_path.clone(), source })?;
            // where the store and the images are may change (another node, a
            // copy on local disk, another cache folder); what they are may not.
            // A run folder from before run.json names no store: its paths must stay.
            let trained_on = read_provenance(&self.out).and_then(|p| p.invocations.last().map(|i| i.store_id.clone()));
            let same_settings = match &trained_on {
                Some(_) => old.without_paths() == cfg.without_paths(),
                None => old == *cfg,
            };
            if !same_settings {
                return Err(TrainError::RunFolder {
                    path: cfg_path,
                    what: "--resume: the settings differ from this run's (resume with the same arguments)".into(),
                });
            }
            if let Some(id) = trained_on.filter(|id| id != store_id) {
                return Err(TrainError::RunFolder {
                    path: cfg_path,
                    what: format!("--resume: the run trained on store {id}, and {} is store {store_id}", cfg.store.display()),
                });
            }
            if old != *cfg {
                // the same run at its new paths, for `eval` and later resumes
                let json = serde_json::to_vec_pretty(cfg).map_err(|source| TrainError::Json { path: cfg_path.clone(), source })?;
                shard_store::write_file_atomic(&cfg_path, &json)?;
            }
            return Ok(true);
        }
        if has_checkpoint {
            return Err(TrainError::RunFolder {
                path: self.out.clone(),
                what: "already holds a run with checkpoints: pass --resume to continue it, or another --out".into(),
            });
        }
        let json = serde_json::to_vec_pretty(cfg).map_err(|source| TrainError::Json { path: cfg_path.clone(), source })?;
        shard_store::write_file_atomic(&cfg_path, &json)?;
        Ok(false)
    }

    /// `metrics.jsonl`, opened for appending: emptied for a new run; on
    /// resume, only the steps the checkpoint at `start` covers are kept.
    ///
    /// # Errors
    /// IO errors.
    pub(crate) fn metrics(&self, start: u64) -> Result<MetricsLog> {
        let path = self.out.join("metrics.jsonl");
        let kept: String = if start > 0 {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| serde_json::from_str::<Metrics>(l).is_ok_and(|m| m.step <= start))
                .map(|l| format!("{l}\n"))
                .collect()
        } else {
            String::new()
        };
        shard_store::write_file_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(TrainError::io(&path, "open metrics"))?;
        Ok(MetricsLog { path, file })
    }

    /// Add `invocation` to `run.json` (a new run starts the file again; a
    /// resumed one appends).
    ///
    /// # Errors
    /// IO errors.
    pub(crate) fn record_start(&self, invocation: Invocation) -> Result<()> {
        let mut p = if invocation.start_step > 0 { read_provenance(&self.out).unwrap_or_default() } else { Provenance::default() };
        p.invocations.push(invocation);
        self.write_provenance(&p)
    }

    /// Mark the last invocation of `run.json` finished at `step`.
    ///
    /// # Errors
    /// IO errors.
    pub(crate) fn record_end(&self, step: u64) -> Result<()> {
        let mut p = read_provenance(&self.out).unwrap_or_default();
        if let Some(last) = p.invocations.last_mut() {
            last.end_step = Some(step);
            last.ended = Some(now());
        }
        self.write_provenance(&p)
    }

    fn write_provenance(&self, p: &Provenance) -> Result<()> {
        let path = self.out.join(PROVENANCE_FILE);
        let json = serde_json::to_vec_pretty(p).map_err(|source| TrainError::Json { path: path.clone(), source })?;
        shard_store::write_file_atomic(&path, &json)?;
        Ok(())
    }
}

/// `metrics.jsonl` of a run, appended to as steps are read back.
#[derive(Debug)]
pub(crate) struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Append a line per step.
    ///
    /// # Errors
    /// IO errors.
    pub(crate) fn append(&mut self, metrics: &[Metrics]) -> Result<()> {
        for m in metrics {
            let line = serde_json::to_string(m).map_err(|source| TrainError::Json { path: self.path.clone(), source })?;
            writeln!(self.file, "{line}").map_err(TrainError::io(&self.path, "append metrics"))?;
        }
        Ok(())
    }

    /// Make the lines written so far durable (before a checkpoint names
    /// their step).
    ///
    /// # Errors
    /// IO errors.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(TrainError::io(&self.path, "fsync metrics"))
    }
}

/// How a run ran: `run.json`, one entry per invocation (a resumed run has
/// several).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Every invocation, oldest first.
    pub invocations: Vec<Invocation>,
}

/// One invocation of `train` on a run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// When it started (UTC, RFC 3339).
    pub started: String,
    /// The step it started from (0, or the checkpoint it resumed).
    pub start_step: u64,
    /// The step it ended at; `None` when it did not end (killed, failed).
    pub end_step: Option<u64>,
    /// When it ended.
    pub ended: Option<String>,
    /// The program and its command line.
    pub program: Program,
    /// libtorch's version (its headers', which are its library's).
    pub libtorch: String,
    /// The CUDA runtime's version, on CUDA.
    pub cuda_runtime: Option<String>,
    /// The NVIDIA driver's version, where one is loaded.
    pub nvidia_driver: Option<String>,
    /// ONNX Runtime's version, where its library loads.
    pub onnxruntime: Option<String>,
    /// The store's identity (its manifest's `store_id`).
    pub store_id: String,
    /// Processes.
    pub world_size: usize,
    /// `single`, `torchrun` or `slurm`.
    pub launcher: String,
    /// What all-reduces the gradients: `none` (one process), `Gloo` or
    /// `NCCL x.y.z`, with the reason where Gloo stands in for NCCL.
    pub backend: String,
    /// Each rank's host and device.
    pub ranks: Vec<RankInfo>,
}

/// Where one rank ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RankInfo {
    /// Global rank.
    pub rank: usize,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's model, on CUDA.
    pub gpu: Option<String>,
}

/// The provenance of the run in folder `run`, if it records one.
pub fn read_provenance(run: &Path) -> Option<Provenance> {
    serde_json::from_slice(&std::fs::read(run.join(PROVENANCE_FILE)).ok()?).ok()
}

/// Now, in UTC, to the second.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
