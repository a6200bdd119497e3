//! `caev2 train` end to end on real images with targets from the real
//! DINOv2-style teacher: the loss falls, cached and live-teacher targets give
//! the same losses, a killed run resumes to the same losses, and unusable
//! stores are refused with a reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use caev2_tests::*;

/// One store for the whole test binary: 20 ImageNet photos x 2 views.
fn store() -> &'static (PathBuf, PathBuf) {
    static STORE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("tmp"))).path().to_owned();
        let data = dep("data/imagenet-mini");
        let out = dir.join("store");
        run_ok(&["extract", "--teacher", s(&dinov2()), "--data", s(&data), "--out", s(&out), "--views", "2", "--no-progress"]);
        (data, out)
    })
}

fn train_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let (data, store) = store();
    vec![
        "train",
        "--shards",
        s_static(store),
        "--data",
        s_static(data),
        "--out",
        out,
        "--model",
        "tiny",
        "--batch",
        "4",
        "--steps",
        steps,
        "--lr",
        "5e-4",
        "--warmup-steps",
        "5",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
}

fn s_static(p: &Path) -> &'static str {
    Box::leak(p.to_str().expect("utf-8").to_owned().into_boxed_str())
}

#[test]
fn loss_falls_substantially_in_a_few_hundred_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    run_ok(&train_args(s(&run), "200"));
    let l = losses(&run);
    assert_eq!(l.len(), 200);
    let first: f64 = l[..3].iter().map(|x| x.1).sum::<f64>() / 3.0;
    let last: f64 = l[190..].iter().map(|x| x.1).sum::<f64>() / 10.0;
    let last_z: f64 = l[190..].iter().map(|x| x.3).sum::<f64>() / 10.0;
    eprintln!("mean loss of the first 3 steps {first:.4}, of the last 10 {last:.4} (l_z {last_z:.4})");
    // measured (2 cores, 4 tests at once): 1.00 -> 0.33, l_z 0.45; the thresholds leave a margin
    assert!(first > 0.95, "a random student starts near cosine distance 1 ({first})");
    assert!(last < 0.45, "after 200 steps the loss must have fallen substantially ({first} -> {last})");
    assert!(last_z < 0.6, "the regressor's masked predictions must have learnt too ({last_z})");
    assert!(run.join("checkpoints/step-00000200/model.safetensors").exists());
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["num_masked"], 30, "ViT-Tiny masks 30 of 196 patches by default");
}

#[test]
fn cached_and_live_teacher_targets_give_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (cached, live) = (tmp.path().join("cached"), tmp.path().join("live"));
    run_ok(&train_args(s(&cached), "6"));
    let mut args = train_args(s(&live), "6");
    let teacher = dinov2();
    args.extend(["--live-teacher", s(&teacher)]);
    run_ok(&args);
    let (a, b) = (losses(&cached), losses(&live));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        eprintln!("step {}: cached {:.7} live {:.7}", x.0, x.1, y.1);
        // f16 storage of the targets is the only difference
        assert!((x.1 - y.1).abs() < 1e-3 * x.1.abs().max(1e-3), "step {}: cached {} vs live {}", x.0, x.1, y.1);
    }
}

#[test]
fn killed_training_resumes_to_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (full, killed) = (tmp.path().join("full"), tmp.path().join("killed"));
    let mut args = train_args(s(&full), "16");
    args.extend(["--checkpoint-every", "4"]);
    run_ok(&args);
    let mut args = train_args(s(&killed), "16");
    args.extend(["--checkpoint-every", "4"]);
    let mut child = Command::new(caev2()).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    wait_for_checkpoint(&killed, "step-00000008");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let before = losses(&killed).len();
    assert!(before < 16, "the kill came too late ({before} steps done)");
    args.push("--resume");
    let text = run_ok(&args);
    assert!(!text.contains("steps 0.."), "it must continue, not restart: {text}");
    let (a, b) = (losses(&full), losses(&killed));
    assert_eq!(b.len(), 16, "metrics cover every step once");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() < 1e-6, "step {}: uninterrupted {} vs resumed {}", x.0, x.1, y.1);
    }
}

/// A /14 teacher at 224 px gives 16x16 tokens; the loader maps them to the
/// ViT's 14x14 grid (FORMAT.md, "Token grids") and training proceeds.
#[test]
fn a_teacher_grid_other_than_the_students_is_mapped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 4);
    let store = tmp.path().join("s224");
    run_ok(&[
        "extract",
        "--teacher",
        s(&dinov2()),
        "--teacher-size",
        "224",
        "--data",
        s(&data),
        "--out",
        s(&store),
        "--views",
        "1",
        "--no-progress",
    ]);
    let run_dir = tmp.path().join("run");
    let out = run_ok(&[
        "train",
        "--shards",
        s(&store),
        "--data",
        s(&data),
        "--out",
        s(&run_dir),
        "--batch",
        "2",
        "--steps",
        "4",
        "--lr",
        "5e-4",
        "--warmup-steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]);
    let l = losses(&run_dir);
    assert_eq!(l.len(), 4, "{out}");
    assert!(l.iter().all(|x| x.1.is_finite() && x.1 > 0.0 && x.1 < 1.5), "{l:?}");
}

#[test]
fn unusable_stores_and_settings_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, _) = store();
    // the student is built for the store's --student-size; one that is not a
    // multiple of the patch size cannot be
    let other = tmp.path().join("s120");
    run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(data),
        "--out",
        s(&other),
        "--views",
        "1",
        "--student-size",
        "120",
        "--no-progress",
    ]);
    let fail = |args: &[&str]| {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let run_dir = tmp.path().join("r");
    let e = fail(&["train", "--shards", s(&other), "--data", s(data), "--out", s(&run_dir), "--steps", "1", "--batch", "2"]);
    assert!(e.contains("120 px") && e.contains("patch size 16"), "{e}");
    // resuming with other settings
    let run2 = tmp.path().join("r2");
    run_ok(&train_args(s(&run2), "2"));
    let mut args = train_args(s(&run2), "3");
    args.push("--resume");
    assert!(fail(&args).contains("settings differ"));
    assert!(fail(&train_args(s(&run2), "2")).contains("--resume"), "an existing run is not overwritten");
    // a teacher that is not the store's
    let run3 = tmp.path().join("r3");
    let mut args = train_args(s(&run3), "2");
    let t = tiny_vit();
    args.extend(["--live-teacher", s(&t)]);
    assert!(fail(&args).contains("is not the store's teacher"));
}

#[test]
fn a_112_px_student_on_the_semantic_teacher_grid_beats_its_floor_on_a_held_out_view() {
    // EfficientNet-Lite0 gives CLS + 7x7 tokens at 224 px; a store made for a
    // 112 px student trains a /16 ViT on the same 7x7 grid, no resampling.
    let tmp = tempfile::tempdir().expect("tmp");
    let data = dep("data/imagenet-mini");
    let store = tmp.path().join("store");
    run_ok(&[
        "extract",
        "--teacher",
        s(&effnet()),
        "--data",
        s(&data),
        "--out",
        s(&store),
        "--views",
        "2",
        "--student-size",
        "112",
        "--no-progress",
    ]);
    let run = tmp.path().join("run");
    run_ok(&[
        "train",
        "--shards",
        s(&store),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--model",
        "tiny",
        "--batch",
        "8",
        "--steps",
        "60",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "5",
        "--train-views",
        "1",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["model"]["image_size"], 112, "the student's size comes from the store");
    assert_eq!(cfg["num_masked"], 7, "15 % of 49 patches");
    let out = run_ok(&["eval", "align", "--checkpoint", s(&run), "--views", "1..2", "--threads", "2", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    let (v, rv) = (j["align_visible"].as_f64().expect("v"), j["random_visible"].as_f64().expect("random v"));
    let (z, rz) = (j["align_masked"].as_f64().expect("z"), j["random_masked"].as_f64().expect("random z"));
    eprintln!("held-out view alignment: visible {v:.3} (step 0: {rv:.3}), masked {z:.3} (step 0: {rz:.3})");
    // measured (2 cores, busy): visible 0.196 vs -0.011 at step 0, masked 0.169 vs -0.010
    assert!(v > rv + 0.1 && z > rz + 0.1, "training must align the held-out view far better than the initial student");
    // the random-init floor of k-NN is built at the checkpoint's size
    let labels = dep("data/imagenet-mini-labels.tsv");
    let knn = run_ok(&[
        "eval",
        "knn",
        "--data",
        s(&data),
        "--labels",
        s(&labels),
        "--label-column",
        "kind",
        "--checkpoint",
        s(&run),
        "--k",
        "5",
        "--folds",
        "4",
        "--json",
    ]);
    let k: serde_json::Value = serde_json::from_str(&knn).expect("json");
    let names: Vec<&str> = k["rows"].as_array().expect("rows").iter().map(|r| r["encoder"].as_str().expect("name")).collect();
    assert!(names.iter().any(|n| n.contains("random-init vit_tiny_patch16_224 at 112 px")), "{names:?}");
}

/// Losses are read back from the device every `--metrics-every` steps (one
/// host sync per group): how often changes nothing in the numbers, every
/// step still gets its line, and TFLOP/s and MFU are reported. `--loader-only`
/// measures the loader alone.
#[test]
fn losses_do_not_depend_on_how_often_they_are_read_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, store) = store();
    let train = |every: &str, peak: &str| {
        let run_dir = tmp.path().join(format!("every-{every}"));
        let args = ["train", "--shards", s(store), "--data", s(data), "--out", s(&run_dir), "--batch", "2", "--steps", "6"];
        let more = [
            "--lr",
            "5e-4",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
            "--metrics-every",
            every,
            "--checkpoint-every",
            "4",
            "--peak-tflops",
            peak,
        ];
        run_ok(&[&args[..], &more[..], &["--no-progress"]].concat());
        run_dir
    };
    let (one, four) = (train("1", "1"), train("4", "2"));
    let (a, b) = (losses(&one), losses(&four));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "the read-back interval changed the losses");
    let text = std::fs::read_to_string(four.join("metrics.jsonl")).expect("metrics");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let tflops = v["tflops"].as_f64().expect("tflops");
        assert!(tflops > 0.0, "{line}");
        assert!((v["mfu"].as_f64().expect("mfu") - tflops / 2.0).abs() < 1e-12, "MFU is TFLOP/s over the peak: {line}");
    }
    let out = run_ok(&[
        "train",
        "--shards",
        s(store),
        "--data",
        s(data),
        "--out",
        s(&tmp.path().join("l")),
        "--batch",
        "4",
        "--steps",
        "5",
        // batch 4 at the default rate is refused for training (under --min-lr), not for the loader alone
        "--loader-only",
        "--threads",
        "1",
    ]);
    assert!(out.contains("images/s with 1 threads"), "{out}");
}
