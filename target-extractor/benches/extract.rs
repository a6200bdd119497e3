//! Extraction benchmark: `caev2 extract` vs the teacher alone vs the Python
//! reference pipeline, side by side in one run with the same model, images,
//! views, batch and thread count.
//!
//! ```text
//! cargo bench -p target-extractor --bench extract -- [--data DIR] [--images N]
//!     [--views K] [--batch B] [--threads T] [--decode-threads D] [--model M.onnx]
//! ```
//! Defaults: `../shared/data/imagenet-sample` when present (else the setup's
//! sample photos), 100 images, K = 2, B = 16, T = all cores, the DINOv2-style
//! ViT-S/14 teacher at its default 196 px. Prints a Markdown table and writes
//! `target/bench/extract.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use target_extractor::{Dataset, ExtractConfig, run_extract};
use teacher::{Teacher, TeacherSpec, deps_dir};

struct Args {
    data: PathBuf,
    images: usize,
    views: u32,
    batch: usize,
    threads: usize,
    decode_threads: usize,
    model: PathBuf,
    rounds: usize,
}

fn parse() -> Args {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned();
    let shared = ws.parent().expect("parent").join("shared/data/imagenet-sample/images");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut a = Args {
        data: if shared.exists() { shared } else { deps_dir().join("data/imagenet-mini") },
        images: 100,
        views: 2,
        batch: 16,
        threads: cores,
        decode_threads: (cores / 4).max(1),
        model: deps_dir().join("models/dinov2-vits14.onnx"),
        rounds: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).filter(|x| x != "--bench").collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--data" => a.data = v.into(),
            "--images" => a.images = v.parse().expect("--images N"),
            "--views" => a.views = v.parse().expect("--views K"),
            "--batch" => a.batch = v.parse().expect("--batch B"),
            "--threads" => a.threads = v.parse().expect("--threads T"),
            "--decode-threads" => a.decode_threads = v.parse().expect("--decode-threads D"),
            "--model" => a.model = v.into(),
            "--rounds" => a.rounds = v.parse().expect("--rounds R"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A folder of symlinks to the first `n` images (class layout kept).
fn subset(data: &Path, n: usize, dst: &Path) {
    let ds = Dataset::scan(data).expect("scan dataset");
    for f in ds.files.iter().take(n) {
        let to = dst.join(&f.rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(data.join(&f.rel), &to).expect("symlink");
    }
}

fn main() {
    let a = parse();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    subset(&a.data, a.images, &data);
    let views_total = (a.images as u64) * u64::from(a.views);
    eprintln!(
        "bench: {} images x {} views, batch {}, {} ORT threads, {} decode threads, model {}",
        a.images,
        a.views,
        a.batch,
        a.threads,
        a.decode_threads,
        a.model.display()
    );

    let cfg = ExtractConfig {
        views: a.views,
        batch: a.batch,
        threads: a.threads,
        decode_threads: a.decode_threads,
        ..ExtractConfig::new(data.clone(), tmp.path().join("store"), TeacherSpec { path: a.model.clone(), ..Default::default() })
    };
    let mut teacher = Teacher::load(&cfg.teacher, a.threads).expect("teacher");
    let size = teacher.info().input_size as usize;
    let per = 3 * size * size;
    let input: Vec<f32> = (0..per * a.batch).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let py = std::env::var_os("CAEV2_PYTHON").map(PathBuf::from).unwrap_or_else(|| deps_dir().join("py/bin/python"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference_pipeline.py");
    // Interleaved rounds; the best of each is reported (least disturbed by
    // whatever else the machine does).
    let (mut infer_vps, mut extract_vps, mut py_vps) = (0f64, 0f64, 0f64);
    let (mut infer_secs, mut extract_secs, mut py_secs) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 0..a.rounds {
        // 1. the teacher alone on ready-made inputs, same batch and threads
        let t = Instant::now();
        let mut done = 0u64;
        while done < views_total {
            let n = (views_total - done).min(a.batch as u64) as usize;
            teacher.forward(&input[..n * per], n).expect("forward");
            done += n as u64;
        }
        infer_secs = infer_secs.min(t.elapsed().as_secs_f64());
        infer_vps = views_total as f64 / infer_secs;

        // 2. caev2 extract (pipeline time, excluding the one-time teacher load)
        let _ = std::fs::remove_dir_all(&cfg.out);
        let s = run_extract(&cfg).expect("extract");
        assert_eq!(s.views_stored, views_total, "every view stored");
        extract_secs = extract_secs.min((s.elapsed - s.teacher_load).as_secs_f64());
        extract_vps = views_total as f64 / extract_secs;

        // 3. the Python reference pipeline (PIL + torchvision-style transforms + onnxruntime)
        let out = Command::new(&py)
            .arg(&script)
            .args(["bench", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&a.model)
            .args(["--views", &a.views.to_string(), "--batch", &a.batch.to_string(), "--threads", &a.threads.to_string()])
            .arg("--out")
            .arg(tmp.path().join("python.f16"))
            .output()
            .expect("run python reference");
        assert!(out.status.success(), "python reference failed: {}", String::from_utf8_lossy(&out.stderr));
        let py_json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python json");
        py_secs = py_secs.min(py_json["seconds"].as_f64().expect("seconds"));
        py_vps = views_total as f64 / py_secs;
        eprintln!("round {round}: inference {infer_vps:.2}, extract {extract_vps:.2}, python {py_vps:.2} views/s (best so far)");
    }

    // 4. decode + augmentation alone, one thread each: what feeds a fast (GPU) teacher
    let ds = Dataset::scan(&data).expect("scan");
    let sampler = caev2_views::ViewSampler::new(0, caev2_views::ViewSettings::cae_v2(224, size as u32));
    let mut buf = vec![0f32; per];
    let t = Instant::now();
    for (id, f) in ds.files.iter().enumerate() {
        let img = caev2_views::decode_image(&data.join(&f.rel), true).expect("decode").rgb;
        for v in 0..a.views {
            let p = sampler.sample(id as u64, v, img.width(), img.height());
            caev2_views::normalize_chw(&caev2_views::render_view(&img, &p, size as u32), [0.5; 3], [0.25; 3], &mut buf);
        }
    }
    let prep_vps = views_total as f64 / t.elapsed().as_secs_f64();
    let out = Command::new(&py)
        .arg(&script)
        .args(["bench", "--no-inference", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&a.model)
        .args(["--views", &a.views.to_string(), "--batch", &a.batch.to_string(), "--threads", "1"])
        .output()
        .expect("run python reference");
    assert!(out.status.success(), "python reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let py_prep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python json");
    let py_prep_vps = py_prep["views_per_second"].as_f64().expect("views_per_second");

    println!("| pipeline | views | seconds | views/s | vs inference only |");
    println!("|---|---:|---:|---:|---:|");
    println!("| teacher inference only (ort) | {views_total} | {infer_secs:.2} | {infer_vps:.2} | 1.00 |");
    println!(
        "| caev2 extract (decode + views + inference + f16 store) | {views_total} | {extract_secs:.2} | {extract_vps:.2} | {:.3} |",
        extract_vps / infer_vps
    );
    println!(
        "| Python reference (PIL + transforms + onnxruntime) | {views_total} | {py_secs:.2} | {py_vps:.2} | {:.3} |",
        py_vps / infer_vps
    );
    println!(
        "\nDecode + augmentation only, one core: caev2 {prep_vps:.1} views/s, Python (PIL) {py_prep_vps:.1} views/s = {:.2}x",
        prep_vps / py_prep_vps
    );
    println!(
        "\ncaev2 extract / Python reference = {:.2}x; extract / inference-only = {:.3}",
        extract_vps / py_vps,
        extract_vps / infer_vps
    );
    let report = serde_json::json!({
        "rounds": a.rounds, "images": a.images, "views_per_image": a.views, "batch": a.batch, "threads": a.threads,
        "decode_threads": a.decode_threads, "model": a.model, "data": a.data,
        "extract_views_per_second": extract_vps, "inference_only_views_per_second": infer_vps,
        "python_views_per_second": py_vps,
        "prep_one_core_views_per_second": prep_vps, "python_prep_one_core_views_per_second": py_prep_vps,
        "extract_over_inference": extract_vps / infer_vps, "extract_over_python": extract_vps / py_vps,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("ws").join("target/bench");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("extract.json"), serde_json::to_string_pretty(&report).expect("json")).expect("write");
}
