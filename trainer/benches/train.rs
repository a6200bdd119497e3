//! Training benchmark, side by side in one run:
//!
//! 1. step time of the same ViT student with cached targets vs with the live
//!    teacher (same ONNX teacher, same views, same batch and threads);
//! 2. loader throughput on one core (decode + view rebuild + targets) vs
//!    the Python loader (PIL + torchvision-style transforms + numpy memmap).
//!
//! ```text
//! cargo bench -p trainer --bench train -- [--teacher M.onnx] [--data DIR]
//!     [--images N] [--steps S] [--batch B] [--model tiny] [--device cpu]
//! ```
//! Defaults: the DINOv2-style ViT-S/14 from setup, `../shared/data/imagenet-sample`
//! when present (else the setup's photos), 64 images, 6 steps of batch 8,
//! ViT-Tiny, CPU. Pass a CLIP-B/16 export (`export_clip.py --random-weights`
//! works) for the paper's setting. Writes `target/bench/train.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use target_extractor::{Dataset, ExtractConfig, run_extract};
use teacher::{TeacherSpec, deps_dir};
use trainer::loader::{DataSource, LoaderConfig};
use trainer::masking::{MaskGenerator, Masking};
use trainer::model::Preset;
use trainer::{Budget, RunOptions, TrainConfig, run_train};

fn main() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned();
    let shared = ws.parent().expect("parent").join("shared/data/imagenet-sample/images");
    let mut teacher = deps_dir().join("models/dinov2-vits14.onnx");
    let mut data = if shared.exists() { shared } else { deps_dir().join("data/imagenet-mini") };
    let (mut images, mut steps, mut batch, mut model, mut device) = (64usize, 6u64, 8usize, "tiny".to_string(), "cpu".to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--teacher" => teacher = v.into(),
            "--data" => data = v.into(),
            "--images" => images = v.parse().expect("N"),
            "--steps" => steps = v.parse().expect("S"),
            "--batch" => batch = v.parse().expect("B"),
            "--model" => model = v.clone(),
            "--device" => device = v.clone(),
            o => panic!("unknown argument {o}"),
        }
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let sub = tmp.path().join("data");
    let ds = Dataset::scan(&data).expect("scan");
    for f in ds.files.iter().take(images) {
        let to = sub.join(&f.rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(data.join(&f.rel), &to).expect("symlink");
    }
    let store = tmp.path().join("store");
    eprintln!("bench: extracting {images} images x 1 view with {}", teacher.display());
    let x = run_extract(&ExtractConfig {
        views: 1,
        batch: 8,
        decode_threads: 1,
        ..ExtractConfig::new(sub.clone(), store.clone(), TeacherSpec { path: teacher.clone(), ..Default::default() })
    })
    .expect("extract");
    let m = x.manifest.expect("manifest");

    // 1. step time, cached vs live
    let preset = Preset::parse(&model).expect("--model tiny|small|base|large");
    let base = TrainConfig::paper(&store, Some(&sub), preset, batch, Budget::Steps(steps), None).expect("config");
    let cfg = |live: bool| TrainConfig { lr: 5e-4, warmup_steps: 1, live_teacher: live.then(|| teacher.clone()), ..base.clone() };
    let mut step_secs = [0f64; 2];
    for (i, live) in [false, true].into_iter().enumerate() {
        let opts = RunOptions {
            out: tmp.path().join(if live { "live" } else { "cached" }),
            device: device.clone(),
            threads: cores,
            loader_threads: None,
            metrics_every: 1,
            peak_tflops: None,
            checkpoint_every: u64::MAX,
            resume: false,
            progress: false,
            bf16: true,
            launch: None,
            dist_timeout: trainer::DEFAULT_DIST_TIMEOUT,
            dist_backend: trainer::dist::Backend::Auto,
            program: trainer::Program::default(),
            live_teacher_gpu: false,
        };
        let s = run_train(&cfg(live), &opts).expect("train");
        // skip the first step (allocations, caches)
        let per: Vec<f64> = s.metrics.iter().skip(1).map(|m| batch as f64 / m.images_per_sec).collect();
        step_secs[i] = per.iter().sum::<f64>() / per.len().max(1) as f64;
        eprintln!("{}: {:.3} s/step ({})", if live { "live teacher" } else { "cached targets" }, step_secs[i], s.device);
    }

    // 2. loader throughput on one core vs Python
    let src = Arc::new(DataSource::open(&store, Some(&sub), 224, None).expect("open"));
    let n_batches = (images / batch) as u64;
    let lc = LoaderConfig { batch, rows: 0..batch, seed: 0, threads: 1, prefetch: 1, image_size: 224, grid: 14, teacher_inputs: false };
    let t = Instant::now();
    let rx = src.stream(lc, MaskGenerator::new(14, 14, 30, Masking::Block), 0, n_batches);
    let mut samples = Vec::new();
    for b in rx {
        samples.extend(b.expect("batch").samples);
    }
    let rust_sps = samples.len() as f64 / t.elapsed().as_secs_f64();
    // the same samples for Python: spec + a contiguous f16 memmap of their targets
    let st = src.store();
    let index = st.index().expect("index");
    let mut targets = Vec::new();
    let mut spec = Vec::new();
    for (img, v) in &samples {
        let r = index.iter().find(|r| r.image_id == *img && r.view == *v).expect("row");
        let p = &r.params;
        use caev2_views::ColorOp::*;
        spec.push(serde_json::json!({
            "image": sub.join(&r.path), "order": p.jitter_order(), "brightness": p.factor(Brightness),
            "contrast": p.factor(Contrast), "saturation": p.factor(Saturation), "flip": p.flip,
            "top": p.crop.top, "left": p.crop.left, "height": p.crop.height, "width": p.crop.width,
        }));
        targets.extend_from_slice(st.targets(*img, *v).expect("ok").expect("stored").bytes);
    }
    // what the loader's per-record CRC-32C check costs, next to a sample
    let record_len = st.targets(samples[0].0, samples[0].1).expect("ok").expect("stored").bytes.len();
    let reps = 200;
    let t = Instant::now();
    let mut acc = 0u32;
    for _ in 0..reps {
        for chunk in targets.chunks(record_len) {
            acc ^= crc32c::crc32c(std::hint::black_box(chunk));
        }
    }
    std::hint::black_box(acc);
    let crc_us = t.elapsed().as_secs_f64() * 1e6 / (reps * samples.len()) as f64;
    let sample_us = 1e6 / rust_sps;
    let spec_path = tmp.path().join("loader.json");
    let tpath = tmp.path().join("targets.f16");
    std::fs::write(
        &spec_path,
        serde_json::json!({"tokens": m.teacher.tokens, "dim": m.teacher.dim, "size": 224, "samples": spec}).to_string(),
    )
    .expect("write");
    std::fs::write(&tpath, &targets).expect("write");
    let py = std::env::var_os("CAEV2_PYTHON").map(PathBuf::from).unwrap_or_else(|| deps_dir().join("py/bin/python"));
    let out = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference_loader.py"))
        .arg(&spec_path)
        .arg(&tpath)
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pj: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let py_sps = pj["samples_per_second"].as_f64().expect("rate");

    println!("| measurement | caev2 | baseline | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| ViT-{model} train step, batch {batch} ({device}) | {:.3} s cached targets | {:.3} s live teacher | {:.2}x faster |",
        step_secs[0],
        step_secs[1],
        step_secs[1] / step_secs[0]
    );
    println!(
        "| loader, one core (decode + view rebuild + targets) | {rust_sps:.1} samples/s | {py_sps:.1} samples/s (PIL + memmap) | {:.2}x |",
        rust_sps / py_sps
    );
    println!(
        "| record CRC-32C check ({record_len} bytes), one core | {crc_us:.2} us/sample | {sample_us:.0} us/sample (whole loader) | {:.2}% of it |",
        100.0 * crc_us / sample_us
    );
    println!("\nteacher: {} ({} tokens x {}, {} px)", m.teacher.name, m.teacher.tokens, m.teacher.dim, m.teacher.input_size);
    let dir = ws.join("target/bench");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let report = serde_json::json!({
        "teacher": m.teacher.name, "teacher_input": m.teacher.input_size, "model": model, "batch": batch, "steps": steps,
        "device": device, "images": images, "step_seconds_cached": step_secs[0], "step_seconds_live": step_secs[1],
        "live_over_cached": step_secs[1] / step_secs[0], "loader_samples_per_second_one_core": rust_sps,
        "python_loader_samples_per_second_one_core": py_sps, "record_bytes": record_len, "record_crc_microseconds": crc_us,
    });
    std::fs::write(dir.join("train.json"), serde_json::to_string_pretty(&report).expect("json")).expect("write");
}
