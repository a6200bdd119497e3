//! `caev2 train --fresh-views` (the authors' regime, K = infinity): every
//! epoch draws a new view of every image, drawn as `extract` drew the stored
//! ones (a two-sample test of their parameters, with controls that show the
//! test rejects a sampler that is slightly off), a killed run resumes to the
//! same losses, and what cannot work is refused in one line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use caev2_tests::*;
use caev2_views::{ViewParams, ViewSampler};
use shard_store::Store;
use trainer::loader::{DataSource, FRESH_VIEW_BASE};

/// Two-sample Kolmogorov-Smirnov statistic.
fn ks(a: &[f64], b: &[f64]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The features of a view the tests compare: the three jitter factors, the
/// crop's area fraction, log aspect ratio and centre (as fractions of the
/// image), the flip, and the jitter order as a number 0..6.
fn features(p: &ViewParams) -> [f64; 9] {
    let (w, h) = (f64::from(p.image_width), f64::from(p.image_height));
    let c = p.crop;
    let order = match p.jitter_order().as_str() {
        "bcs" => 0.0,
        "bsc" => 1.0,
        "cbs" => 2.0,
        "csb" => 3.0,
        "sbc" => 4.0,
        _ => 5.0,
    };
    [
        f64::from(p.factor(caev2_views::ColorOp::Brightness)),
        f64::from(p.factor(caev2_views::ColorOp::Contrast)),
        f64::from(p.factor(caev2_views::ColorOp::Saturation)),
        f64::from(c.width) * f64::from(c.height) / (w * h),
        (f64::from(c.width) / f64::from(c.height)).ln(),
        (f64::from(c.left) + f64::from(c.width) / 2.0) / w,
        (f64::from(c.top) + f64::from(c.height) / 2.0) / h,
        f64::from(u8::from(p.flip)),
        order,
    ]
}

const NAMES: [&str; 9] = ["brightness", "contrast", "saturation", "area", "log aspect", "centre x", "centre y", "flip", "order"];

/// For each feature, the two-sample statistic over its critical value at
/// a = 0.001 (above 1: the samples differ): KS for the continuous ones,
/// a two-proportion z for the flip, chi-square (5 degrees of freedom) for
/// the jitter order.
fn differences(a: &[ViewParams], b: &[ViewParams]) -> Vec<(&'static str, f64)> {
    let fa: Vec<[f64; 9]> = a.iter().map(features).collect();
    let fb: Vec<[f64; 9]> = b.iter().map(features).collect();
    let (n, m) = (a.len() as f64, b.len() as f64);
    let col = |f: &[[f64; 9]], k: usize| f.iter().map(|x| x[k]).collect::<Vec<f64>>();
    let mut out = Vec::new();
    let ks_crit = 1.949 * ((n + m) / (n * m)).sqrt();
    for (k, name) in NAMES.iter().enumerate().take(7) {
        out.push((*name, ks(&col(&fa, k), &col(&fb, k)) / ks_crit));
    }
    let (pa, pb) = (col(&fa, 7).iter().sum::<f64>() / n, col(&fb, 7).iter().sum::<f64>() / m);
    let p = (pa * n + pb * m) / (n + m);
    out.push((NAMES[7], ((pa - pb) / (p * (1.0 - p) * (1.0 / n + 1.0 / m)).sqrt()).abs() / 3.291));
    let mut chi = 0.0;
    for cat in 0..6 {
        let (oa, ob) = (
            col(&fa, 8).iter().filter(|&&x| x == cat as f64).count() as f64,
            col(&fb, 8).iter().filter(|&&x| x == cat as f64).count() as f64,
        );
        let total = oa + ob;
        let (ea, eb) = (total * n / (n + m), total * m / (n + m));
        chi += (oa - ea).powi(2) / ea.max(1e-9) + (ob - eb).powi(2) / eb.max(1e-9);
    }
    out.push((NAMES[8], chi / 20.515));
    out
}

fn worst(d: &[(&'static str, f64)]) -> (&'static str, f64) {
    d.iter().copied().fold(("", 0.0), |w, x| if x.1 > w.1 { x } else { w })
}

/// 30 photos of many shapes (ImageNet JPEGs and scikit-image PNGs) x `views`
/// views, extracted by the real binary with the tiny ViT teacher.
/// Students are 112 px (a 7x7 grid; the teacher's 4x4 is resampled to it).
fn store(tmp: &Path, views: &str, seed: &str) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    imagenet_dataset(&data, 20);
    let photos = dep("data/photos");
    let mut files: Vec<(&str, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&photos).expect("ls") {
        files.push(("photos", e.expect("entry").path()));
    }
    make_dataset(&data, &files);
    let out = tmp.join("store");
    run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--views",
        views,
        "--seed",
        seed,
        "--student-size",
        "112",
        "--no-progress",
    ]);
    (data, out)
}

#[test]
fn every_epoch_draws_new_views_distributed_as_the_stored_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let epochs = 60u64;
    let (data, root) = store(tmp.path(), "60", "5");
    let store = Store::open(&root).expect("store");
    let m = store.manifest().clone();
    let stored: Vec<shard_store::IndexRow> = store.index().expect("index");
    let images = stored.iter().map(|r| r.image_id).collect::<std::collections::BTreeSet<_>>().len();
    assert!(images >= 25, "{images} images decoded");

    let source =
        DataSource::open(&root, Some(&data), m.views.settings.student_size, None).expect("open").with_fresh_views().expect("fresh");
    let mut fresh: BTreeMap<(u64, u64), ViewParams> = BTreeMap::new();
    for epoch in 0..epochs {
        let views = source.epoch_views(3, epoch).expect("epoch views");
        assert_eq!(views.len(), images, "epoch {epoch}: one view of every image");
        for (id, view, params) in views {
            assert_eq!(view, FRESH_VIEW_BASE + epoch as u32, "epoch {epoch}: a view number no stored view has");
            fresh.insert((id, epoch), params);
        }
    }
    // the run's seed orders the epoch; the views are the store's (its seed)
    assert_eq!(source.epoch_views(3, 7).expect("again").len(), images);
    let other_seed: BTreeMap<u64, ViewParams> = source.epoch_views(4, 7).expect("seed 4").into_iter().map(|(id, _, p)| (id, p)).collect();
    for (id, p) in &other_seed {
        assert_eq!(&fresh[&(*id, 7)], p, "image {id}: the fresh view of an epoch does not depend on the run's seed");
    }
    // two epochs never show an image the same view, nor a stored one
    let mut same_as_stored = 0;
    for ((id, epoch), p) in &fresh {
        if *epoch > 0 {
            assert_ne!(p, &fresh[&(*id, epoch - 1)], "image {id}: epochs {} and {epoch} drew the same view", epoch - 1);
        }
        same_as_stored += stored.iter().filter(|r| r.image_id == *id && &r.params == p).count();
    }
    assert_eq!(same_as_stored, 0, "a fresh view repeated a stored one");

    // the same distribution as the stored views: two-sample tests at a = 0.001
    let stored_params: Vec<ViewParams> = stored.iter().map(|r| r.params.clone()).collect();
    let fresh_params: Vec<ViewParams> = fresh.values().cloned().collect();
    let d = differences(&stored_params, &fresh_params);
    eprintln!("stored ({}) vs fresh ({}): {d:.2?}", stored_params.len(), fresh_params.len());
    let (name, w) = worst(&d);
    assert!(w < 1.0, "fresh views differ from the stored ones in {name} ({w:.2} x the critical value)");

    // the controls: the same test rejects views drawn slightly off
    let size_of: BTreeMap<u64, (u32, u32)> = stored.iter().map(|r| (r.image_id, (r.params.image_width, r.params.image_height))).collect();
    let mut narrow = m.views.settings.clone();
    narrow.scale = (0.5, 1.0);
    let narrow = ViewSampler::new(m.views.seed, narrow);
    let draw = |f: &dyn Fn(u64, u32, u32, u32) -> ViewParams| -> Vec<ViewParams> {
        fresh.keys().map(|&(id, e)| f(id, FRESH_VIEW_BASE + e as u32, size_of[&id].0, size_of[&id].1)).collect()
    };
    let d = differences(&stored_params, &draw(&|id, v, w, h| narrow.sample(id, v, w, h)));
    eprintln!("control, crop scale 0.5-1 instead of 0.4-1: {d:.2?}");
    assert!(worst(&d).1 > 1.0, "the test must tell a crop scale of 0.5-1 from 0.4-1");
    let sampler = ViewSampler::new(m.views.seed, m.views.settings.clone());
    let swapped: Vec<ViewParams> = draw(&|id, v, w, h| {
        let p = sampler.sample(id, v, h, w);
        ViewParams { image_width: w, image_height: h, ..p }
    });
    let d = differences(&stored_params, &swapped);
    eprintln!("control, width and height swapped: {d:.2?}");
    assert!(worst(&d).1 > 1.0, "the test must tell views drawn for the transposed image size");
}

fn train_args<'a>(store: &'a Path, data: &'a Path, out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--shards",
        s(store),
        "--data",
        s(data),
        "--out",
        s(out),
        "--batch",
        "4",
        "--steps",
        steps,
        "--lr",
        "5e-4",
        "--warmup-steps",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
}

#[test]
fn a_killed_fresh_view_run_resumes_to_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, store) = store(tmp.path(), "2", "0");
    let teacher = tiny_vit();
    let (full, killed, cached) = (tmp.path().join("full"), tmp.path().join("killed"), tmp.path().join("cached"));
    let fresh = |out: &Path| {
        let mut a: Vec<String> = train_args(&store, &data, out, "16").into_iter().map(String::from).collect();
        a.extend(["--fresh-views", "--live-teacher", s(&teacher), "--checkpoint-every", "4"].map(String::from));
        a
    };
    let args = fresh(&full);
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut c: Vec<&str> = train_args(&store, &data, &cached, "16");
    c.extend(["--checkpoint-every", "4"]);
    run_ok(&c);

    let args = fresh(&killed);
    let mut child = Command::new(caev2()).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    wait_for_checkpoint(&killed, "step-00000008");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let before = losses(&killed).len();
    assert!(before < 16, "the kill came too late ({before} steps done)");
    let mut args = args;
    args.push("--resume".into());
    let text = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!text.contains("steps 0.."), "it must continue, not restart: {text}");
    let (a, b, c) = (losses(&full), losses(&killed), losses(&cached));
    assert_eq!((a.len(), b.len()), (16, 16), "metrics cover every step once");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() < 1e-6, "step {}: uninterrupted {} vs resumed {}", x.0, x.1, y.1);
    }
    // same order, masks and initialisation as the cached run: only the views differ
    let differing = a.iter().zip(&c).filter(|(x, y)| (x.1 - y.1).abs() > 1e-4).count();
    assert!(differing >= 14, "fresh and stored views gave the same losses at {} of 16 steps", 16 - differing);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(full.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["fresh_views"], true, "config.json records the regime");
}

fn leak(p: &Path) -> &'static str {
    Box::leak(s(p).to_owned().into_boxed_str())
}

#[test]
fn fresh_views_that_cannot_work_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, store) = store(tmp.path(), "2", "0");
    let out = tmp.path().join("run");
    let one_line = |args: &[&str], want: &str| {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!out.join("checkpoints").exists(), "{args:?} wrote a checkpoint");
    };
    let base = train_args(&store, &data, &out, "2");
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    one_line(&with(&["--fresh-views"]), "--live-teacher");
    let (t, wrong) = (tiny_vit(), dinov2());
    let (t, wrong): (&'static str, &'static str) = (leak(&t), leak(&wrong));
    one_line(&with(&["--fresh-views", "--live-teacher", t, "--train-views", "1"]), "--train-views");
    one_line(&with(&["--fresh-views", "--live-teacher", wrong]), "is not the store's teacher");
    // the live teacher on a GPU needs a student on one (train_args trains on the CPU)
    one_line(&with(&["--live-teacher", t, "--live-teacher-gpu"]), "--live-teacher-gpu: the student trains on the CPU here");

    // a pca store: its own teacher trains on fresh views, another is refused
    let pca = tmp.path().join("pca");
    run_ok(&["inspect", "recode", s(&store), s(&pca), "--codec", "pca"]);
    let base = train_args(&pca, &data, &out, "2");
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    one_line(&with(&["--fresh-views", "--live-teacher", wrong]), "is not the store's teacher");
    run_ok(&with(&["--fresh-views", "--live-teacher", t]));
    assert_eq!(losses(&out).len(), 2);
}
