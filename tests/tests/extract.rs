//! `caev2 extract` end to end: real images, real ONNX teachers, real
//! processes (killed and resumed, run concurrently), checked against an
//! independent Python computation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caev2_tests::*;
use caev2_views::{decode_image, normalize_chw, render_view};
use shard_store::{Store, resample_grid};

/// PNG photos (lossless: Pillow and caev2 decode the same pixels) and JPEG
/// ImageNet photos (decoders may differ by a level).
fn mixed_dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let photos = dep("data/photos");
    let mut files: Vec<(&str, PathBuf)> =
        vec![("png", photos.join("camera.png")), ("png", photos.join("coffee.png")), ("png", photos.join("logo.png"))];
    let jpegs = imagenet_photos(3);
    files.extend(jpegs.iter().map(|(_, p)| ("jpeg", p.clone())));
    make_dataset(&data, &files);
    data
}

#[test]
fn targets_match_an_independent_python_pipeline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = mixed_dataset(tmp.path());
    let out = tmp.path().join("store");
    run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--views",
        "3",
        "--codec",
        "f32",
        "--batch",
        "4",
        "--no-progress",
    ]);
    let store = Store::open(&out).expect("open");
    assert_eq!((store.manifest().teacher.tokens, store.manifest().teacher.dim), (17, 24));
    let (rows, reference) = python_targets(&store, &data, &tiny_vit());
    assert_eq!(rows.len(), 18);
    let per = 17 * 24;
    for (row, exp) in rows.iter().zip(reference.chunks_exact(per)) {
        let ours = store.targets(row.image_id, row.view).expect("ok").expect("stored").to_vec();
        let worst = ours.chunks(24).zip(exp.chunks(24)).map(|(a, b)| cosine(a, b)).fold(1.0f32, f32::min);
        if row.path.starts_with("png/") {
            let max_err = ours.iter().zip(exp).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!("{} view {}: max abs error {max_err:.2e}, worst token cosine {worst:.6}", row.path, row.view);
            assert!(max_err < 1e-3, "{} view {}: max error {max_err} vs Pillow+onnxruntime", row.path, row.view);
        } else {
            eprintln!("{} view {}: worst token cosine {worst:.6}", row.path, row.view);
            assert!(worst > 0.995, "{} view {}: worst token cosine {worst} vs Pillow+onnxruntime", row.path, row.view);
        }
    }
}

#[test]
fn rebuilt_views_are_bit_identical_to_the_teacher_inputs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = mixed_dataset(tmp.path());
    let out = tmp.path().join("store");
    let dump = tmp.path().join("dump");
    run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--views",
        "4",
        "--no-progress",
        "--debug-dump-inputs",
        s(&dump),
    ]);
    let store = Store::open(&out).expect("open");
    let m = store.manifest();
    let size = m.teacher.input_size;
    let mut checked = 0;
    for row in store.index().expect("index") {
        // rebuild from the parameters read back from the Parquet index
        let img = decode_image(&data.join(&row.path), m.views.settings.apply_exif_orientation).expect("decode").rgb;
        let mut buf = vec![0f32; 3 * (size * size) as usize];
        normalize_chw(&render_view(&img, &row.params, size), m.teacher.mean, m.teacher.std, &mut buf);
        let fed = std::fs::read(dump.join(format!("{}-{}.f32", row.image_id, row.view))).expect("dumped input");
        let rebuilt: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(fed == rebuilt, "{} view {}: rebuilt pixels differ from what the teacher saw", row.path, row.view);
        checked += 1;
    }
    assert_eq!(checked, 24);
}

#[test]
fn broken_and_odd_files_are_skipped_or_decoded_and_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("store");
    let json = run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(&fixture("odd-images")),
        "--out",
        s(&out),
        "--views",
        "2",
        "--json",
        "--no-progress",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&json).expect("json summary");
    let skipped: Vec<String> =
        summary["skipped"].as_array().expect("list").iter().map(|x| x["path"].as_str().expect("path").to_owned()).collect();
    assert_eq!(
        skipped,
        ["broken_claims_huge.png", "broken_empty.JPEG", "broken_random.JPEG", "broken_text.JPEG", "broken_truncated.JPEG"],
        "{json}"
    );
    assert!(summary["skipped"].as_array().expect("list").iter().all(|x| !x["reason"].as_str().unwrap_or("").is_empty()));
    assert_eq!(summary["views_stored"], 16);
    let store = Store::open(&out).expect("open");
    let rows = store.index().expect("index");
    let dims = |name: &str| {
        let r = rows.iter().find(|r| r.path == name).unwrap_or_else(|| panic!("{name} stored"));
        (r.params.image_width, r.params.image_height)
    };
    assert_eq!(dims("exif_rotated.JPEG"), (24, 40), "EXIF orientation 6 applied");
    assert_eq!(dims("tiny_1x1.png"), (1, 1));
    assert_eq!(dims("cmyk.JPEG"), (64, 48));
    assert_eq!(dims("gray16.png"), (64, 48));
    let summary = run_ok(&["inspect", "summary", s(&out)]);
    assert!(summary.contains("5 skipped") && summary.contains("broken_truncated.JPEG"), "{summary}");
    // a huge (but valid) photo decodes
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).expect("mkdir");
    let img = caev2_views::RgbImage::from_fn(6000, 4000, image_pixel);
    img.save(big.join("huge.png")).expect("save");
    run_ok(&[
        "extract",
        "--teacher",
        s(&tiny_vit()),
        "--data",
        s(&big),
        "--out",
        s(&tmp.path().join("big-store")),
        "--views",
        "1",
        "--no-progress",
    ]);
}

fn image_pixel(x: u32, y: u32) -> caev2_views::RgbPixel {
    caev2_views::RgbPixel::from([(x / 40 % 256) as u8, (y / 30 % 256) as u8, 128])
}

#[test]
fn flipped_byte_in_a_shard_is_detected() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = mixed_dataset(tmp.path());
    let out = tmp.path().join("store");
    extract_tiny(&data, &out, &["--views", "2", "--images-per-shard", "2"]);
    assert!(run_ok(&["inspect", "verify", s(&out)]).contains("0 problems"));
    let store = Store::open(&out).expect("open");
    let row = store.index().expect("index").into_iter().find(|r| r.shard == 1 && r.view == 1).expect("a row in shard 1");
    drop(store);
    let shard = out.join("shards/shard-00001.bin");
    let mut bytes = std::fs::read(&shard).expect("read");
    bytes[row.offset as usize + 100] ^= 0x04;
    std::fs::write(&shard, bytes).expect("write");
    let res = run(&["inspect", "verify", s(&out)]);
    let text = String::from_utf8_lossy(&res.stdout);
    assert_eq!(res.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("shard 1 @ byte {}", row.offset)) && text.contains("checksum mismatch"), "{text}");
}

fn dinov2_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "extract",
        "--teacher",
        s_static(dinov2()),
        "--data",
        data,
        "--out",
        out,
        "--views",
        "2",
        "--images-per-shard",
        "1",
        "--batch",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]
}

fn s_static(p: PathBuf) -> &'static str {
    Box::leak(p.into_os_string().into_string().expect("utf-8").into_boxed_str())
}

/// An uninterrupted run of the real teacher over 6 photos, 6 shards.
fn reference_store(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    imagenet_dataset(&data, 6);
    let out = tmp.join("reference");
    run_ok(&dinov2_args(s(&data), s(&out)));
    (data, out)
}

fn wait_for_done(dir: &Path, n: usize, deadline: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < deadline {
        if std::fs::read_dir(dir.join("done")).map(|d| d.count()).unwrap_or(0) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn killed_runs_resume_to_an_identical_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, reference) = reference_store(tmp.path());
    let out = tmp.path().join("killed");
    for kill_after in [1, 3] {
        let mut child =
            Command::new(caev2()).args(dinov2_args(s(&data), s(&out))).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        assert!(wait_for_done(&out, kill_after, Duration::from_secs(120)), "no progress before kill");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    let done = std::fs::read_dir(out.join("done")).expect("ls").count();
    assert!(done < 6, "the kills came too late to test anything ({done} shards done)");
    let second = run_ok(&dinov2_args(s(&data), s(&out)));
    assert!(second.contains("already complete"), "{second}");
    assert!(store_contents(&out) == store_contents(&reference), "resumed store differs from an uninterrupted run");
    assert!(run_ok(&["inspect", "verify", s(&out)]).contains("0 problems"));
}

#[test]
fn concurrent_runs_and_worker_splits_build_the_same_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, reference) = reference_store(tmp.path());
    // two identical runs at once on one folder
    let both = tmp.path().join("both");
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(caev2())
                .args(dinov2_args(s(&data), s(&both)))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(store_contents(&both) == store_contents(&reference), "concurrent runs corrupted or changed the store");
    // two workers splitting the shards
    let split = tmp.path().join("split");
    for i in ["0", "1"] {
        let mut args = dinov2_args(s(&data), s(&split));
        args.extend(["--num-workers", "2", "--worker-index", i]);
        let text = run_ok(&args);
        assert!(text.contains("3 written now"), "{text}");
    }
    assert!(store_contents(&split) == store_contents(&reference));
    // the same split from a Slurm job array's variables (--array=1-2)
    let array = tmp.path().join("array");
    for id in ["1", "2"] {
        let o = Command::new(caev2())
            .args(dinov2_args(s(&data), s(&array)))
            .envs([("SLURM_ARRAY_TASK_ID", id), ("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "1")])
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains("3 written now"), "{text} {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(store_contents(&array) == store_contents(&reference), "a job array's split differs");
    // flags that disagree with the launcher: one line, nothing written
    let refused = tmp.path().join("refused");
    let o = Command::new(caev2())
        .args(dinov2_args(s(&data), s(&refused)))
        .args(["--worker-index", "0"])
        .envs([("RANK", "1"), ("WORLD_SIZE", "2")])
        .output()
        .expect("run");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.trim().lines().count() == 1 && e.contains("worker 1 of 2 from torchrun"), "{e}");
    assert!(!refused.exists());
}

#[test]
fn real_teacher_targets_are_semantic_and_match_python() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 3);
    let out = tmp.path().join("store");
    run_ok(&["extract", "--teacher", s(&dinov2()), "--data", s(&data), "--out", s(&out), "--views", "2", "--no-progress"]);
    let store = Store::open(&out).expect("open");
    let t = &store.manifest().teacher;
    assert_eq!((t.tokens, t.dim, t.grid, t.input_size), (197, 384, [14, 14], 196), "DINOv2 ViT-S/14 at 196 px: CLS + 14x14");
    let cls = |img: u64, v: u32| store.targets(img, v).expect("ok").expect("stored").to_vec()[..384].to_vec();
    let same: f32 = (0..3).map(|i| cosine(&cls(i, 0), &cls(i, 1))).sum::<f32>() / 3.0;
    let diff: f32 = [(0, 1), (0, 2), (1, 2)].iter().map(|&(a, b)| cosine(&cls(a, 0), &cls(b, 0))).sum::<f32>() / 3.0;
    eprintln!("CLS cosine: same photo {same:.4}, different photos {diff:.4}");
    assert!(same > diff + 0.1, "CLS of two views of one photo ({same}) should be closer than across photos ({diff})");
    let (rows, reference) = python_targets(&store, &data, &dinov2());
    for (row, exp) in rows.iter().zip(reference.chunks_exact(197 * 384)) {
        let ours = store.targets(row.image_id, row.view).expect("ok").expect("stored").to_vec();
        let mean: f32 = ours.chunks(384).zip(exp.chunks(384)).map(|(a, b)| cosine(a, b)).sum::<f32>() / 197.0;
        eprintln!("{} view {}: mean token cosine {mean:.6} vs Python", row.path, row.view);
        assert!(mean > 0.999, "{} view {}: mean token cosine {mean} vs Pillow+onnxruntime", row.path, row.view);
    }
}

#[test]
fn efficientnet_conversion_equals_numpy_and_classifies_imagenet_photos() {
    // Convert the registry's weights again (with the classifier head) and run
    // the converter's independent numpy forward pass next to the ONNX graph.
    let tmp = tempfile::tempdir().expect("tmp");
    let onnx = tmp.path().join("effnet-logits.onnx");
    let photos = imagenet_photos(20);
    let labels = std::fs::read_to_string(dep("data/imagenet-mini-labels.tsv")).expect("labels");
    let class_of = |wnid: &str| -> i64 {
        labels
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{wnid}\t")))
            .and_then(|r| r.split('\t').next())
            .expect("wnid")
            .parse()
            .expect("index")
    };
    let mut cmd = Command::new(python());
    cmd.arg(workspace().join("target-extractor/scripts/prepare_efficientnet_teacher.py"))
        .arg(dep("weights/efficientnet-lite0-57934424.pth"))
        .arg(&onnx)
        .arg("--check");
    for (_, p) in &photos {
        cmd.arg(p);
    }
    let out = cmd.output().expect("run converter");
    assert!(out.status.success(), "converter failed: {}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["tokens_shape"], serde_json::json!([20, 50, 320]), "CLS + 7x7 tokens of 320 channels at 224 px");
    let (err, scale) = (j["max_token_err"].as_f64().expect("f64"), j["max_token_abs"].as_f64().expect("f64"));
    eprintln!("ONNX vs numpy: max token error {err:.2e} (largest token value {scale:.1}), max logit error {}", j["max_logit_err"]);
    assert!(err < 1e-4 * scale.max(1.0), "folded-BN ONNX tokens differ from the numpy forward by {err}");
    assert!(j["max_logit_err"].as_f64().expect("f64") < 1e-3);
    let top1: Vec<i64> = j["top5"].as_array().expect("rows").iter().map(|r| r[0].as_i64().expect("class")).collect();
    let numpy_top1: Vec<i64> = j["top1_numpy"].as_array().expect("rows").iter().map(|v| v.as_i64().expect("class")).collect();
    assert_eq!(top1, numpy_top1);
    let correct = photos.iter().zip(&top1).filter(|((wnid, _), t)| class_of(wnid) == **t).count();
    eprintln!("EfficientNet-Lite0 top-1 on the 20 foolbox ImageNet photos: {correct}/20");
    assert!(correct >= 16, "top-1 {correct}/20: the converted classifier should recognise these ImageNet photos");
    // the production teacher has the same tokens and the caev2 metadata
    let tmp_store = tmp.path().join("store");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 2);
    run_ok(&["extract", "--teacher", s(&effnet()), "--data", s(&data), "--out", s(&tmp_store), "--views", "1", "--no-progress"]);
    let t = Store::open(&tmp_store).expect("open").manifest().teacher.clone();
    assert_eq!((t.tokens, t.dim, t.grid, t.input_size, t.patch_size, t.has_cls), (50, 320, [7, 7], 224, 32, true));
    assert_eq!((t.mean, t.std), ([0.498; 3], [0.502; 3]));
}

#[test]
fn semantic_teacher_targets_match_python() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 3);
    let out = tmp.path().join("store");
    run_ok(&[
        "extract",
        "--teacher",
        s(&effnet()),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--views",
        "2",
        "--student-size",
        "112",
        "--no-progress",
    ]);
    let store = Store::open(&out).expect("open");
    let (rows, reference) = python_targets(&store, &data, &effnet());
    let dim = 320;
    for (row, exp) in rows.iter().zip(reference.chunks_exact(50 * dim)) {
        let ours = store.targets(row.image_id, row.view).expect("ok").expect("stored").to_vec();
        let mean: f32 = ours.chunks(dim).zip(exp.chunks(dim)).map(|(a, b)| cosine(a, b)).sum::<f32>() / 50.0;
        eprintln!("{} view {}: mean token cosine {mean:.6} vs Python", row.path, row.view);
        assert!(mean > 0.999, "{} view {}: mean token cosine {mean} vs Pillow+onnxruntime", row.path, row.view);
    }
}

#[test]
fn teacher_grid_larger_than_the_student_grid_is_recorded_and_resampled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 2);
    let at196 = tmp.path().join("s196");
    let at224 = tmp.path().join("s224");
    run_ok(&["extract", "--teacher", s(&dinov2()), "--data", s(&data), "--out", s(&at196), "--views", "2", "--no-progress"]);
    run_ok(&[
        "extract",
        "--teacher",
        s(&dinov2()),
        "--teacher-size",
        "224",
        "--data",
        s(&data),
        "--out",
        s(&at224),
        "--views",
        "2",
        "--no-progress",
    ]);
    let (a, b) = (Store::open(&at196).expect("open"), Store::open(&at224).expect("open"));
    assert_eq!((b.manifest().teacher.grid, b.manifest().teacher.tokens), ([16, 16], 257));
    assert_eq!(a.index().expect("index")[1].params, b.index().expect("index")[1].params, "views do not depend on the teacher size");
    let mut total = 0.0;
    for img in 0..2 {
        for v in 0..2 {
            let t196 = a.targets(img, v).expect("ok").expect("stored").to_vec();
            let t224 = b.targets(img, v).expect("ok").expect("stored").to_vec();
            let mapped = resample_grid(&t224, 384, true, (16, 16), (14, 14));
            assert_eq!(mapped.len(), t196.len());
            let mean: f32 = mapped.chunks(384).zip(t196.chunks(384)).skip(1).map(|(x, y)| cosine(x, y)).sum::<f32>() / 196.0;
            total += mean / 4.0;
        }
    }
    eprintln!("16x16 -> 14x14 resampled vs 14x14 targets: mean patch cosine {total:.4}");
    assert!(total > 0.9, "16x16 targets resampled to 14x14 should match the 14x14 targets of the same views (mean cosine {total})");
}

#[test]
fn bad_input_gives_clear_errors_and_no_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = mixed_dataset(tmp.path());
    let out = tmp.path().join("store");
    let err = |args: &[&str]| {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&["extract", "--teacher", s(&tiny_vit()), "--data", s(&tmp.path().join("nope")), "--out", s(&out)]);
    assert!(e.contains("nope"), "{e}");
    let e = err(&["extract", "--teacher", s(&tmp.path().join("missing.onnx")), "--data", s(&data), "--out", s(&out)]);
    assert!(e.contains("missing.onnx") && e.contains("not found"), "{e}");
    let e = err(&["extract", "--teacher", s(&tiny_vit()), "--teacher-patch", "16", "--data", s(&data), "--out", s(&out)]);
    assert!(e.contains("17 tokens") && e.contains("expected 5"), "{e}");
    let e = err(&["extract", "--clip", "base16", "--models", s(tmp.path()), "--data", s(&data), "--out", s(&out)]);
    assert!(e.contains("export_clip.py"), "{e}");
    assert!(!out.exists(), "failed runs must not leave a store behind");
    run_ok(&["extract", "--teacher", s(&tiny_vit()), "--data", s(&data), "--out", s(&out), "--views", "1", "--no-progress"]);
    let e = err(&["extract", "--teacher", s(&tiny_vit()), "--data", s(&data), "--out", s(&out), "--views", "1", "--seed", "5"]);
    assert!(e.contains("views.seed") && e.contains("differs"), "{e}");
}
