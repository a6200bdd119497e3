//! A training run from start to end ([`run_train`], which reads as its
//! outline), and the loader measured alone ([`measure_loader`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::{Tensor, nn};

use crate::config::{MAX_THREADS, RunOptions, TrainConfig};
use crate::dist::{Dist, digest_payload, text_of_payload, text_payload};
use crate::error::{Result, TrainError};
use crate::loader::{DataSource, LoaderConfig, TargetMap};
use crate::masking::MaskGenerator;
use crate::model::{Cae2, decays};
use crate::optim::AdamW;
use crate::run_folder::{Invocation, RankInfo, RunFolder};
use crate::step::{DeviceBatch, Metrics, Stepper, flush};
use crate::{checkpoint, device};

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// First step of this invocation.
    pub start_step: u64,
    /// Steps completed in total.
    pub steps: u64,
    /// Metrics of every step of this invocation.
    pub metrics: Vec<Metrics>,
    /// Wall time of this invocation.
    pub elapsed: Duration,
    /// The device line.
    pub device: String,
    /// Last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

/// Train (or resume) a CAE v2 student: in this process alone, or as one
/// rank of a data-parallel group when `opts.launch` says so (every rank
/// builds its slice of each global batch; rank 0 alone owns the run
/// folder).
///
/// # Errors
/// Incompatible store, bad settings, a run folder another training holds,
/// data errors, IO, libtorch errors, a failed rendezvous or collective,
/// another rank's failure.
pub fn run_train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t0 = Instant::now();
    // 1. the group (of one without a launcher); every rank checks the
    //    settings and opens its device and the store, and all agree on the
    //    outcome, on the settings and on who runs where, in one collective
    let mut dist = Dist::join(opts.launch.as_ref(), opts.dist_timeout)?;
    let (setup, ranks) = open_everywhere(cfg, opts, &dist)?;
    let Setup { device, mut device_line, autocast, source, manifest: m } = setup;
    // 2. gradients over NCCL or Gloo, threads, the device's peak for MFU
    let backend = dist.set_backend(device, opts.dist_backend, opts.dist_timeout)?;
    let (torch_threads, loader_threads) = device::thread_budget(opts.threads, device.is_cuda(), opts.loader_threads);
    tch::set_num_threads(torch_threads as i32);
    device_line.push_str(&format!(", {torch_threads} libtorch + {loader_threads} loader threads"));
    let peak = opts
        .peak_tflops
        .or_else(|| if device.is_cuda() { device::gpu_model().and_then(|g| device::peak_tflops(&g, autocast)) } else { None });
    let local = cfg.batch / dist.world;
    let rows = dist.rank * local..(dist.rank + 1) * local;
    if dist.world > 1 {
        device_line
            .push_str(&format!(", data-parallel: {} ranks ({}, {backend}), {local} images per rank and step", dist.world, dist.launcher));
    }
    // 3. the student and its optimiser; rank 0 takes the run folder (its
    //    lock first), restores a checkpoint and hands the state to the others
    let (mut vs, model) = Cae2::seeded(&cfg.model, cfg.seed, device);
    let mut opt = AdamW::new(cfg.adamw, vs.variables(), decays);
    let folder = if dist.is_main() { Some(RunFolder::take(&opts.out)) } else { None }.transpose();
    let resumed = folder.and_then(|f| match &f {
        Some(folder) => {
            let start =
                if folder.prepare(cfg, &m.store_id, opts.resume)? { checkpoint::restore(&opts.out, &mut vs, &mut opt, device)? } else { 0 };
            Ok((f, start))
        }
        None => Ok((f, 0)),
    });
    let start_of = |r: &Result<(Option<RunFolder>, u64)>| r.as_ref().map_or(0.0, |(_, s)| *s as f64);
    let payload = [start_of(&resumed)];
    let ((folder, _), starts) = dist.agree_and_gather("preparing the run folder", resumed, &payload)?;
    let start = starts[0][0] as u64;
    if dist.world > 1 {
        let mut state = parameters_by_name(&vs);
        state.extend(opt.state().into_iter().map(|(_, t)| t));
        dist.copy_from_main(&state)?;
        opt.set_steps(start as i64);
    }
    let mut teacher = live_teacher(cfg, &m, opts, device)?;
    let mut metrics_log = match &folder {
        Some(f) => {
            f.record_start(invocation(opts, &m, &dist, &backend, start, ranks))?;
            Some(f.metrics(start)?)
        }
        None => None,
    };
    // 4. the loader, one epoch's samples ahead, two batches prefetched
    let grid = cfg.model.grid() as usize;
    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let rx = source.stream(loader_config(cfg, rows.clone(), loader_threads, teacher.is_some()), masks, start, cfg.steps);
    let bar = if opts.progress && dist.is_main() { ProgressBar::new(cfg.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} train [{elapsed_precise}] {wide_bar} step {pos}/{len} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar.println(&device_line);

    // 5. the loop: a step never waits for the host; losses are read back
    //    every --metrics-every steps and at each checkpoint
    let stepper = Stepper {
        cfg,
        model: &model,
        dist: &dist,
        device,
        autocast,
        rows,
        grid,
        teacher_grid: (m.teacher.grid[0] as usize, m.teacher.grid[1] as usize),
        dim: i64::from(m.teacher.dim),
        target_map: TargetMap::of(source.store(), device),
    };
    let mut summary = TrainSummary {
        start_step: start,
        steps: start,
        metrics: Vec::new(),
        elapsed: Duration::ZERO,
        device: device_line,
        checkpoint: None,
    };
    let flops_per_step = cfg.model.train_flops_per_image(cfg.num_masked as i64) * cfg.batch as f64;
    let metrics_every = opts.metrics_every.max(1);
    let next = |teacher: Option<&mut teacher::Teacher>| -> Result<DeviceBatch> {
        let batch = rx.recv().map_err(|_| TrainError::Loader("stopped unexpectedly".into()))??;
        stepper.upload(batch, teacher)
    };
    let mut upcoming = if start < cfg.steps { Some(next(teacher.as_mut())?) } else { None };
    let mut pending = Vec::new();
    let mut window = Instant::now();
    for step in start..cfg.steps {
        let Some(batch) = upcoming.take() else { break };
        pending.push(stepper.step(step, &batch, &mut opt)?);
        drop(batch);
        if step + 1 < cfg.steps {
            upcoming = Some(next(teacher.as_mut())?);
        }
        let checkpoint = (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == cfg.steps;
        bar.inc(1);
        if !(checkpoint || pending.len() as u64 >= metrics_every) {
            continue;
        }
        let now = Instant::now();
        let done = flush(&mut pending, &dist, cfg.batch, flops_per_step, peak, now.duration_since(window))?;
        window = now;
        if let Some(log) = metrics_log.as_mut() {
            log.append(&done)?;
            if checkpoint {
                log.sync()?;
                summary.checkpoint = Some(checkpoint::save(&opts.out, &vs, &opt, step + 1, cfg.seed)?);
            }
        }
        if let Some(met) = done.last() {
            let mfu = met.mfu.map(|u| format!(" MFU {:.1}%", 100.0 * u)).unwrap_or_default();
            bar.set_message(format!(
                "loss_v {:.4} loss_z {:.4} lr {:.2e} {:.1} img/s{mfu}",
                met.loss_v, met.loss_z, met.lr, met.images_per_sec
            ));
        }
        summary.metrics.extend(done);
        summary.steps = step + 1;
    }
    bar.finish_and_clear();
    if let Some(f) = &folder {
        f.record_end(summary.steps)?;
    }
    summary.elapsed = t0.elapsed();
    Ok(summary)
}

/// What every rank opens before training: the device and the data.
struct Setup {
    device: tch::Device,
    device_line: String,
    autocast: bool,
    source: Arc<DataSource>,
    manifest: shard_store::Manifest,
}

/// Bytes of a rank's description in the start-up collective.
const RANK_INFO_BYTES: usize = 512;

/// [`open_setup`] on every rank, with one collective: all ranks open, all
/// hold the same settings (the digest of [`settings_digest`]), and each
/// learns where the others run (for `run.json`).
fn open_everywhere(cfg: &TrainConfig, opts: &RunOptions, dist: &Dist) -> Result<(Setup, Vec<RankInfo>)> {
    let setup = open_setup(cfg, opts, dist);
    let (digest, me) = match &setup {
        Ok(s) => {
            let me = RankInfo {
                rank: dist.rank,
                host: crate::dist::host_name(),
                pid: std::process::id(),
                device: match s.device {
                    tch::Device::Cuda(i) => format!("cuda:{i}"),
                    _ => "cpu".into(),
                },
                gpu: if s.device.is_cuda() { device::gpu_model() } else { None },
            };
            (settings_digest(cfg, &s.manifest.store_id, opts), serde_json::to_string(&me).unwrap_or_default())
        }
        Err(_) => ([0; 32], String::new()),
    };
    let mut payload = digest_payload(&digest);
    let n = payload.len();
    payload.extend(text_payload(&me, RANK_INFO_BYTES));
    let (setup, rows) = dist.agree_and_gather("set-up", setup, &payload)?;
    dist.check_same("the settings", &rows.iter().map(|r| &r[..n]).collect::<Vec<_>>())?;
    let ranks = rows.iter().map(|r| serde_json::from_str(&text_of_payload(&r[n..])).unwrap_or_default()).collect();
    Ok((setup, ranks))
}

/// Check the settings and open the device and the store (on every rank).
fn open_setup(cfg: &TrainConfig, opts: &RunOptions, dist: &Dist) -> Result<Setup> {
    shard_store::check_local(&opts.out)?;
    cfg.validate()?;
    if !(1..=MAX_THREADS).contains(&opts.threads) {
        return Err(TrainError::setting("--threads", opts.threads, format!("must be between 1 and {MAX_THREADS}")));
    }
    if let Some(l) = opts.loader_threads.filter(|l| !(1..=MAX_THREADS).contains(l)) {
        return Err(TrainError::setting("--loader-threads", l, format!("must be between 1 and {MAX_THREADS}")));
    }
    if let Some(p) = opts.peak_tflops.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(TrainError::setting("--peak-tflops", p, "must be a positive number of TFLOP/s"));
    }
    if !cfg.batch.is_multiple_of(dist.world) {
        return Err(TrainError::setting(
            "--batch",
            cfg.batch,
            format!("must be a multiple of the {} ranks (each trains an equal slice of the global batch)", dist.world),
        ));
    }
    let (device, device_line, autocast) = device::for_run(&opts.device, opts.bf16, dist.local_rank)?;
    let source = open_source(cfg)?;
    let manifest = source.store().manifest().clone();
    Ok(Setup { device, device_line, autocast, source, manifest })
}

/// This invocation, for `run.json`.
fn invocation(opts: &RunOptions, m: &shard_store::Manifest, dist: &Dist, backend: &str, start: u64, ranks: Vec<RankInfo>) -> Invocation {
    let cuda = ranks.first().is_some_and(|r| r.device.starts_with("cuda"));
    Invocation {
        started: crate::run_folder::now(),
        start_step: start,
        end_step: None,
        ended: None,
        program: opts.program.clone(),
        libtorch: device::libtorch_version(),
        cuda_runtime: if cuda { device::cuda_runtime_version() } else { None },
        nvidia_driver: device::nvidia_driver_version(),
        onnxruntime: teacher::ort_version(),
        store_id: m.store_id.clone(),
        world_size: dist.world,
        launcher: dist.launcher.into(),
        backend: if backend.is_empty() { "none".into() } else { backend.into() },
        ranks,
    }
}

/// A digest of everything that must be equal on every data-parallel rank:
/// the configuration (but not the store's and images' paths, which may
/// differ between nodes), the store's identity, the precision, the steps at
/// which the ranks read their losses back together (`--metrics-every`, and
/// every checkpoint step) and the build.
fn settings_digest(cfg: &TrainConfig, store_id: &str, opts: &RunOptions) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(&cfg.without_paths()).unwrap_or_default());
    h.update(store_id.as_bytes());
    h.update([u8::from(opts.bf16)]);
    h.update(opts.metrics_every.max(1).to_le_bytes());
    h.update(opts.checkpoint_every.max(1).to_le_bytes());
    h.update(format!("{:?}", opts.dist_backend).as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.finalize().into()
}

/// The parameters in name order (the same on every rank).
fn parameters_by_name(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

/// Open the run's store and images, and check that they can train `cfg`'s
/// student with its batch and masking.
fn open_source(cfg: &TrainConfig) -> Result<Arc<DataSource>> {
    let grid = cfg.model.grid() as usize;
    let mut source = DataSource::open(&cfg.store, cfg.data.as_deref(), cfg.model.image_size as u32, cfg.train_views.map(|n| 0..n))?;
    if cfg.fresh_views {
        source = source.with_fresh_views()?;
        let last_epoch = cfg.steps.saturating_sub(1) / source.steps_per_epoch(cfg.batch).max(1);
        if crate::loader::fresh_view(last_epoch).is_none() {
            return Err(TrainError::setting("--steps", cfg.steps, "too many epochs for fresh views (at most 2^31)"));
        }
    }
    let source = Arc::new(source);
    let dim = source.store().manifest().teacher.dim;
    if i64::from(dim) != cfg.model.target_dim {
        return Err(TrainError::Incompatible {
            store: cfg.store.clone(),
            what: format!("targets have {dim} dims, the model's head outputs {}", cfg.model.target_dim),
        });
    }
    if source.steps_per_epoch(cfg.batch) == 0 {
        return Err(TrainError::setting("--batch", cfg.batch, format!("more than the store's {} images", source.num_images())));
    }
    if cfg.num_masked == 0 || cfg.num_masked >= grid * grid {
        return Err(TrainError::setting("--num-masked", cfg.num_masked, format!("must be between 1 and {}", grid * grid - 1)));
    }
    Ok(source)
}

/// The loader settings of the run `cfg`: this process's `rows` of every
/// global batch, built by `threads` threads, two batches ahead, with the
/// teacher's inputs instead of stored targets when `teacher_inputs`.
pub fn loader_config(cfg: &TrainConfig, rows: std::ops::Range<usize>, threads: usize, teacher_inputs: bool) -> LoaderConfig {
    LoaderConfig {
        batch: cfg.batch,
        rows,
        seed: cfg.seed,
        threads,
        prefetch: 2,
        image_size: cfg.model.image_size as u32,
        grid: cfg.model.grid() as usize,
        teacher_inputs,
    }
}

/// The store's own teacher for `--live-teacher` (checked by its SHA-256).
/// With `--fresh-views` the store's targets must also be what this teacher
/// computes on the CPU for a view of the store's settings, so that fresh
/// and stored targets come from one distribution.
fn live_teacher(cfg: &TrainConfig, m: &shard_store::Manifest, opts: &RunOptions, device: tch::Device) -> Result<Option<teacher::Teacher>> {
    let Some(p) = &cfg.live_teacher else { return Ok(None) };
    let bad = |what: String| TrainError::Incompatible { store: cfg.store.clone(), what };
    let on = match (opts.live_teacher_gpu, device) {
        (false, _) => teacher::TeacherDevice::Cpu,
        (true, tch::Device::Cuda(i)) if !cfg.fresh_views => teacher::TeacherDevice::Cuda { device: i as i32 },
        (true, tch::Device::Cuda(_)) => {
            return Err(bad(
                "--live-teacher-gpu with --fresh-views: fresh targets must be computed as the stored ones were, on the CPU".into()
            ));
        }
        (true, _) => return Err(bad("--live-teacher-gpu: the student trains on the CPU here (--device cuda for a GPU)".into())),
    };
    let sha = teacher::sha256_file(p)?;
    if sha != m.teacher.onnx_sha256 {
        return Err(bad(format!("--live-teacher {} is not the store's teacher (sha256 {sha} vs {})", p.display(), m.teacher.onnx_sha256)));
    }
    if cfg.fresh_views && m.teacher.precision != "fp32" {
        return Err(bad(format!(
            "--fresh-views: its targets came from the teacher in {}, the live teacher runs in fp32 on the CPU, so fresh targets would differ from stored ones",
            m.teacher.precision
        )));
    }
    if cfg.fresh_views && m.teacher.input_size != m.views.settings.teacher_size {
        return Err(bad(format!(
            "--fresh-views: its views were rendered at {} px for the teacher, the teacher takes {} px",
            m.views.settings.teacher_size, m.teacher.input_size
        )));
    }
    let spec = teacher::TeacherSpec {
        path: p.clone(),
        name: Some(m.teacher.name.clone()),
        input_size: Some(m.teacher.input_size),
        mean: Some(m.teacher.mean),
        std: Some(m.teacher.std),
        patch_size: Some(m.teacher.patch_size),
        has_cls: Some(m.teacher.has_cls),
        output: Some(m.teacher.output.clone()),
        // on the CPU, as the store's targets were checked against, unless asked
        device: on,
    };
    Ok(Some(teacher::Teacher::load(&spec, opts.threads)?))
}

/// What [`measure_loader`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderSpeed {
    /// Images timed (after one warm-up batch).
    pub images: u64,
    /// Seconds they took.
    pub seconds: f64,
    /// Loader threads.
    pub threads: usize,
}

impl LoaderSpeed {
    /// Images per second.
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

/// Stream `steps` batches of the run `cfg` describes through the loader
/// alone (decode, view rebuild, targets or the live teacher's inputs,
/// masks), with `threads` loader
/// threads and no model: the most images per second this loader can feed a
/// device, for telling a loader-bound run from a device-bound one.
///
/// # Errors
/// Bad settings, an incompatible store, data errors.
pub fn measure_loader(cfg: &TrainConfig, threads: usize, steps: u64) -> Result<LoaderSpeed> {
    // nothing is trained: the schedule's bounds (a peak under --min-lr) do not apply
    TrainConfig { min_lr: 0.0, ..cfg.clone() }.validate()?;
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(TrainError::setting("--threads", threads, format!("must be between 1 and {MAX_THREADS}")));
    }
    let source = open_source(cfg)?;
    let grid = cfg.model.grid() as usize;
    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let rx = source.stream(loader_config(cfg, 0..cfg.batch, threads, cfg.live_teacher.is_some()), masks, 0, steps.max(2));
    let mut first = true;
    let (mut images, mut t0) = (0u64, Instant::now());
    for batch in rx {
        let batch = batch?;
        if first {
            first = false;
            t0 = Instant::now();
        } else {
            images += batch.samples.len() as u64;
        }
    }
    Ok(LoaderSpeed { images, seconds: t0.elapsed().as_secs_f64(), threads })
}
