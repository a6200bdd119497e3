//! `caev2 extract`.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use shard_store::Codec;
use target_extractor::{DEFAULT_BATCH, DEFAULT_IMAGES_PER_SHARD, DEFAULT_STUDENT_SIZE, DEFAULT_VIEWS, ExtractConfig, run_extract};
use teacher::{ClipModel, TeacherDevice, TeacherSpec, models_dir};

use super::parse_range;

#[derive(Args)]
pub struct ExtractArgs {
    /// Image folder: ImageNet layout (DATA/<class>/<image>) or a flat folder.
    #[arg(long)]
    data: PathBuf,
    /// Store folder to create or resume, or a bucket: s3://BUCKET/PREFIX,
    /// gs://..., az://... (credentials and endpoint from AWS_*, GOOGLE_*,
    /// AZURE_* variables; AWS_ENDPOINT_URL for S3-compatible servers). Each
    /// shard is written to a local staging copy in --cache, uploaded and
    /// checked, and only then marked complete in the bucket.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    cache: super::CacheArgs,
    /// With a bucket --out: minutes after which another worker's claim on a
    /// shard is taken over (a claim of a dead process on this host is taken
    /// at once).
    #[arg(long, value_name = "MINUTES", default_value_t = remote_store::DEFAULT_CLAIM_TTL.as_secs() / 60)]
    claim_ttl: u64,
    /// Built-in CLIP teacher (base16: ViT-B/16 at 224 px; large14: ViT-L/14
    /// at 196 px), looked up in --models; see target-extractor/scripts/export_clip.py.
    #[arg(long, value_name = "base16|large14", value_parser = parse_clip, conflicts_with = "teacher", required_unless_present = "teacher")]
    clip: Option<ClipModel>,
    /// Any ONNX teacher with one input [B,3,S,S] and a [B,tokens,dim] output,
    /// e.g. .deps/models/efficientnet-lite0.onnx (semantic, ImageNet) or
    /// .deps/models/dinov2-vits14.onnx.
    #[arg(long, value_name = "FILE.onnx")]
    teacher: Option<PathBuf>,
    /// Folder of teacher models [default: $CAEV2_MODELS or .deps/models].
    #[arg(long)]
    models: Option<PathBuf>,
    /// Views per image (K).
    #[arg(long, default_value_t = DEFAULT_VIEWS)]
    views: u32,
    /// Teacher batch size.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// ONNX Runtime threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Image decoding / augmentation threads [default: all cores but one when
    /// the teacher runs on a GPU, else cores / 4, at least 1].
    #[arg(long)]
    decode_threads: Option<usize>,
    /// Where the teacher runs: auto (the GPU when this machine has an NVIDIA
    /// driver and setup installed onnxruntime-gpu, else the CPU), cpu, cuda
    /// or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Run the teacher with TensorRT (on the --device GPU; engines are built
    /// once, in minutes, and cached in --tensorrt-cache).
    #[arg(long)]
    tensorrt: bool,
    /// With --tensorrt: let TensorRT run layers in float16 (recorded as the
    /// store's teacher precision; compare with `caev2 inspect compare`).
    #[arg(long, requires = "tensorrt")]
    teacher_fp16: bool,
    /// With --tensorrt: engine cache folder [default: ~/.cache/caev2/tensorrt].
    #[arg(long, requires = "tensorrt")]
    tensorrt_cache: Option<PathBuf>,
    /// Target codec: f16 (default), f32, int8 (half of f16), or pca (a
    /// transform coder fitted on the store's first run: ~9x smaller than
    /// f16 for ViT teachers at token cosine 0.996; see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = Codec::F16)]
    codec: Codec,
    #[command(flatten)]
    fit: super::FitArgs,
    /// Seed of the view sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Student input size recorded with the views; `train` builds its
    /// student for it (224: 14x14 patches of 16 px; 112: 7x7, the native grid
    /// of the EfficientNet-Lite0 teacher, 4x cheaper steps).
    #[arg(long, default_value_t = DEFAULT_STUDENT_SIZE)]
    student_size: u32,
    /// Teacher input size [default: the model's caev2.default_input_size].
    #[arg(long)]
    teacher_size: Option<u32>,
    /// Teacher input mean R,G,B [default: from the model's metadata].
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    teacher_mean: Option<[f32; 3]>,
    /// Teacher input std R,G,B [default: from the model's metadata].
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    teacher_std: Option<[f32; 3]>,
    /// Teacher patch size [default: from the model's metadata].
    #[arg(long)]
    teacher_patch: Option<u32>,
    /// Whether the teacher's first token is CLS [default: metadata, else true].
    #[arg(long)]
    teacher_has_cls: Option<bool>,
    /// Name of the teacher output holding the tokens [default: first output].
    #[arg(long)]
    teacher_output: Option<String>,
    /// Name recorded for the teacher [default: metadata or file name].
    #[arg(long)]
    teacher_name: Option<String>,
    /// Images per shard (a shard is the unit of work, resume and locking).
    #[arg(long, default_value_t = DEFAULT_IMAGES_PER_SHARD)]
    images_per_shard: u32,
    /// Split the work across N processes or machines writing one store...
    /// [default: the launcher's count under torchrun (WORLD_SIZE), srun
    /// (SLURM_NTASKS) or a Slurm array (SLURM_ARRAY_TASK_COUNT), else 1]
    #[arg(long)]
    num_workers: Option<u32>,
    /// ...of which this is number I (it takes shards s with s % N == I)
    /// [default: the launcher's RANK, SLURM_PROCID or array task, else 0;
    /// flags that disagree with a launcher are refused]
    #[arg(long)]
    worker_index: Option<u32>,
    /// Only these shards, e.g. 0..100 (end exclusive).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    shards: Option<Range<u32>>,
    /// Ignore EXIF orientation (torchvision's default loader does).
    #[arg(long)]
    ignore_exif: bool,
    /// Store each image's file bytes in the store (format version 2,
    /// unchanged bytes: the views rebuild bit for bit), so that `train`,
    /// `eval align` and `inspect show/render` need no --data: one folder
    /// to copy to a cluster or a node's local disk.
    #[arg(long)]
    embed_images: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Write every teacher input tensor to this folder (for tests).
    #[arg(long, hide = true)]
    debug_dump_inputs: Option<PathBuf>,
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    teacher::parse_triple(s).ok_or_else(|| format!("{s:?}: expected three comma-separated numbers R,G,B"))
}

fn parse_clip(s: &str) -> Result<ClipModel, String> {
    ClipModel::parse(s).ok_or_else(|| format!("{s:?}: expected base16 or large14"))
}

/// The teacher's device from `--device`, `--tensorrt` and friends. `auto`
/// takes the GPU when there is an NVIDIA driver and the loaded ONNX Runtime
/// has the CUDA provider, and otherwise says why it stays on the CPU.
fn teacher_device(a: &ExtractArgs) -> Result<(TeacherDevice, Option<String>)> {
    let gpu = match a.device.as_str() {
        "cpu" if a.tensorrt => bail!("--tensorrt needs a GPU: use --device cuda or auto"),
        "cpu" => return Ok((TeacherDevice::Cpu, None)),
        "auto" => match teacher::gpu_unavailable()? {
            Some(why) if a.tensorrt => bail!("--tensorrt needs a GPU: {why}"),
            Some(why) => return Ok((TeacherDevice::Cpu, Some(format!("auto: {why}")))),
            None => 0,
        },
        "cuda" => 0,
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse::<i32>().ok()).filter(|&n| n >= 0) {
            Some(n) => n,
            None => bail!("--device {d}: expected auto, cpu, cuda or cuda:N"),
        },
    };
    if !a.tensorrt {
        return Ok((TeacherDevice::Cuda { device: gpu }, None));
    }
    let cache = match &a.tensorrt_cache {
        Some(c) => c.clone(),
        None => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/caev2/tensorrt"),
    };
    Ok((TeacherDevice::TensorRt { device: gpu, fp16: a.teacher_fp16, cache }, None))
}

/// Run `caev2 extract`.
pub fn run(a: ExtractArgs) -> Result<ExitCode> {
    // under torchrun, srun or a Slurm array, this process is one worker of many
    let launcher = target_extractor::launcher::from_env(|k| std::env::var(k).ok())?;
    let (num_workers, worker_index) = target_extractor::launcher::resolve(a.num_workers, a.worker_index, launcher.as_ref())?;
    if let Some(l) = &launcher
        && super::progress(a.no_progress)
    {
        eprintln!("extract: worker {} of {}, from {}", l.index, l.count, l.source);
    }
    let models = a.models.clone().unwrap_or_else(models_dir);
    let mut spec = match (a.clip, &a.teacher) {
        (Some(c), None) => c.spec(&models)?,
        (None, Some(t)) => TeacherSpec { path: t.clone(), ..Default::default() },
        _ => bail!("give exactly one of --clip and --teacher"),
    };
    spec.input_size = a.teacher_size;
    spec.mean = a.teacher_mean;
    spec.std = a.teacher_std;
    spec.patch_size = a.teacher_patch;
    spec.has_cls = a.teacher_has_cls;
    spec.output = a.teacher_output.clone();
    spec.name = a.teacher_name.clone();
    let (device, why) = teacher_device(&a)?;
    let teacher_line = format!("teacher on {}{}", device.describe(), why.map(|w| format!(" ({w})")).unwrap_or_default());
    if super::progress(a.no_progress) {
        eprintln!("extract: {teacher_line}");
    }
    spec.device = device;
    let on_gpu = spec.device != TeacherDevice::Cpu;
    // a bucket: stage in the cache, publish each shard
    let out_text = a.out.to_string_lossy().into_owned();
    let (local_out, publish, _pin) = if remote_store::is_url(&out_text) {
        let bucket = remote_store::Bucket::open(&out_text)?;
        let (dir, pin) = a.cache.options(false).pin(&out_text)?;
        let ttl = std::time::Duration::from_secs(a.claim_ttl.saturating_mul(60));
        (dir, Some(remote_store::Publisher::new(bucket, ttl)), Some(pin))
    } else {
        (a.out.clone(), None, None)
    };
    let defaults = ExtractConfig::new(a.data.clone(), local_out, spec);
    let cfg = ExtractConfig {
        views: a.views,
        batch: a.batch,
        threads: a.threads.unwrap_or(defaults.threads),
        decode_threads: a.decode_threads.unwrap_or(if on_gpu { super::cores().saturating_sub(1).max(1) } else { defaults.decode_threads }),
        codec: a.codec,
        fit: a.fit.fit(),
        seed: a.seed,
        student_size: a.student_size,
        images_per_shard: a.images_per_shard,
        num_workers,
        worker_index,
        shards: a.shards.clone(),
        apply_exif_orientation: !a.ignore_exif,
        embed_images: a.embed_images,
        dump_inputs: a.debug_dump_inputs.clone(),
        progress: super::progress(a.no_progress),
        publish,
        ..defaults
    };
    let staging = cfg.publish.is_some().then(|| cfg.out.clone());
    let s = run_extract(&cfg).with_context(|| format!("extracting {} into {}", a.data.display(), a.out.display()))?;
    let secs = s.elapsed.as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "store": a.out, "staging": staging, "images": s.images, "shards_total": s.shards_total,
            "shards_written": s.shards_written, "shards_already_done": s.shards_already_done,
            "shards_busy": s.shards_busy, "shards_other_workers": s.shards_other_workers,
            "views_stored": s.views_stored, "skipped": s.skipped, "bytes_written": s.bytes_written,
            "seconds": secs, "views_per_second": s.views_stored as f64 / secs.max(1e-9),
            "store_complete": s.store_complete, "teacher_device": teacher_line,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "extract: {} views of {} images written in {:.1} s ({:.2} views/s), {:.1} MB; {teacher_line}",
            s.views_stored,
            s.images,
            secs,
            s.views_stored as f64 / secs.max(1e-9),
            s.bytes_written as f64 / 1e6
        );
        println!(
            "shards: {} written now, {} already complete, {} held by another process, {} for other workers; store {}",
            s.shards_written,
            s.shards_already_done,
            s.shards_busy,
            s.shards_other_workers,
            match (s.store_complete, &staging) {
                (true, None) => "complete".to_owned(),
                (false, None) => "NOT complete yet".to_owned(),
                (true, Some(dir)) => format!("complete in {} (staged in {})", a.out.display(), dir.display()),
                (false, Some(dir)) => format!("NOT complete yet in {} (staged in {})", a.out.display(), dir.display()),
            }
        );
        if !s.skipped.is_empty() {
            println!("skipped {} undecodable files (also listed in {}/done/*.json):", s.skipped.len(), a.out.display());
            for sk in &s.skipped {
                println!("  {}: {}", sk.path, sk.reason);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
