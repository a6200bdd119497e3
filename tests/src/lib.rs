//! Helpers for caev2's end-to-end tests: the freshly built `caev2` binary,
//! the project's Python tools venv, fixtures and the sample images that
//! `scripts/setup.sh` installs from registry packages.
//!
//! The tests themselves are in `tests/tests/`. They run the real binary on
//! real images with real ONNX teachers (a committed tiny ViT and the
//! registry's DINOv2-style ViT-S/14 and EfficientNet-Lite0).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shard_store::Store;

/// A path as the `&str` argument of a command line.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `(step, loss, loss_v, loss_z)` of every line of a run's `metrics.jsonl`.
pub fn losses(run: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["step"].as_u64().expect("step"),
                v["loss"].as_f64().expect("loss"),
                v["loss_v"].as_f64().expect("v"),
                v["loss_z"].as_f64().expect("z"),
            )
        })
        .collect()
}

/// Wait (at most 300 s) until a run's `checkpoints/latest` names `name`
/// (e.g. `step-00000008`) or a later checkpoint.
pub fn wait_for_checkpoint(run: &Path, name: &str) {
    let latest = run.join("checkpoints/latest");
    let t = Instant::now();
    while !std::fs::read_to_string(&latest).is_ok_and(|s| s.trim() >= name) {
        assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint {name} written in {}", run.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// A file or folder installed by `scripts/setup.sh`, with a clear failure
/// when setup has not been run.
pub fn dep(rel: &str) -> PathBuf {
    let p = workspace().join(".deps").join(rel);
    assert!(p.exists(), "{} missing: run scripts/setup.sh first", p.display());
    p
}

/// A committed fixture.
pub fn fixture(rel: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(rel)
}

/// The real DINOv2-style teacher.
pub fn dinov2() -> PathBuf {
    dep("models/dinov2-vits14.onnx")
}

/// The semantic EfficientNet-Lite0 token teacher (7x7 + CLS at 224 px).
pub fn effnet() -> PathBuf {
    dep("models/efficientnet-lite0.onnx")
}

/// The tiny ViT fixture teacher.
pub fn tiny_vit() -> PathBuf {
    fixture("tiny_vit.onnx")
}

/// The release `caev2` binary, built once per test process (the test run
/// itself holds no cargo lock by the time tests execute).
pub fn caev2() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--quiet", "-p", "tools", "--bin", "caev2"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building caev2 failed");
        workspace().join("target/release/caev2")
    })
    .clone()
}

/// Run `caev2 ARGS`; returns the output (not asserting success).
pub fn run(args: &[&str]) -> Output {
    Command::new(caev2()).args(args).output().expect("spawn caev2")
}

/// Run `caev2 ARGS` and assert it succeeds; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "caev2 {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tools venv's Python.
pub fn python() -> PathBuf {
    dep("py/bin/python")
}

/// Copy files into `dst/<class>/<name>` to make an ImageNet-style folder.
pub fn make_dataset(dst: &Path, files: &[(&str, PathBuf)]) {
    for (class, src) in files {
        let d = dst.join(class);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::copy(src, d.join(src.file_name().expect("file name"))).expect("copy image");
    }
}

/// Six photos in two classes: `a/` the scikit-image astronaut, coffee and
/// chelsea PNGs, `b/` the first three foolbox ImageNet JPEGs.
pub fn two_class_photos(data: &Path) {
    let photos = dep("data/photos");
    let mut files: Vec<(&str, PathBuf)> = ["astronaut.png", "coffee.png", "chelsea.png"].iter().map(|f| ("a", photos.join(f))).collect();
    files.extend(imagenet_photos(3).into_iter().map(|(_, p)| ("b", p)));
    make_dataset(data, &files);
}

/// Copy a folder tree (a store, a run).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

/// The first `n` ImageNet photos shipped by foolbox (class folder, file).
pub fn imagenet_photos(n: usize) -> Vec<(String, PathBuf)> {
    let root = dep("data/imagenet-mini");
    let mut out = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(&root).expect("ls").map(|e| e.expect("entry").path()).collect();
    classes.sort();
    for c in classes {
        let mut files: Vec<_> = std::fs::read_dir(&c).expect("ls").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for f in files {
            out.push((c.file_name().expect("name").to_string_lossy().into_owned(), f));
        }
    }
    out.truncate(n);
    out
}

/// An ImageNet-style folder `data` holding the first `n` ImageNet photos.
pub fn imagenet_dataset(data: &Path, n: usize) {
    make_dataset(data, &imagenet_photos(n).iter().map(|(c, p)| (c.as_str(), p.clone())).collect::<Vec<_>>());
}

/// Teacher targets of every stored view of `store`, recomputed
/// independently by the Python reference pipeline (Pillow + onnxruntime).
/// Returns `(index rows, values)` in index order.
pub fn python_targets(store: &Store, data: &Path, model: &Path) -> (Vec<shard_store::IndexRow>, Vec<f32>) {
    use caev2_views::ColorOp::*;
    let m = store.manifest();
    let rows = store.index().expect("index");
    let views: Vec<_> = rows
        .iter()
        .map(|r| {
            let p = &r.params;
            serde_json::json!({
                "image": data.join(&r.path), "order": p.jitter_order(),
                "brightness": p.factor(Brightness), "contrast": p.factor(Contrast), "saturation": p.factor(Saturation),
                "flip": p.flip, "top": p.crop.top, "left": p.crop.left, "height": p.crop.height, "width": p.crop.width,
            })
        })
        .collect();
    let spec = serde_json::json!({
        "model": model, "size": m.teacher.input_size, "mean": m.teacher.mean, "std": m.teacher.std, "views": views,
    });
    let dir = tempfile::tempdir().expect("tmp");
    let spec_path = dir.path().join("spec.json");
    let out_path = dir.path().join("out.f32");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    let status = Command::new(python())
        .arg(workspace().join("target-extractor/scripts/reference_pipeline.py"))
        .arg("views")
        .arg(&spec_path)
        .arg(&out_path)
        .status()
        .expect("run python");
    assert!(status.success(), "reference_pipeline.py views failed");
    let bytes = std::fs::read(&out_path).expect("read");
    let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (rows, values)
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30)) as f32
}

/// `caev2 extract` of `data` into `out` with the tiny ViT teacher and the
/// `extra` flags, no progress bar; its stdout.
pub fn extract_tiny(data: &Path, out: &Path, extra: &[&str]) -> String {
    let teacher = tiny_vit();
    let args = ["extract", "--teacher", s(&teacher), "--data", s(data), "--out", s(out), "--no-progress"];
    run_ok(&[&args[..], extra].concat())
}

/// All files of a store that must be identical between two runs (shards,
/// index parts, image packs, reports, manifest minus the informational fields), as
/// `(relative path, bytes)`, sorted.
pub fn store_contents(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["shards", "index", "images", "done"] {
        if sub == "images" && !root.join(sub).exists() {
            continue; // a store without its images
        }
        let mut files: Vec<_> = std::fs::read_dir(root.join(sub)).expect("ls").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().expect("name").to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "leftover temporary file {}", f.display());
            out.push((format!("{sub}/{name}"), std::fs::read(&f).expect("read")));
        }
    }
    out
}
