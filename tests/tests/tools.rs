//! `caev2 inspect`, `eval`, `export`, `plot` on a small real store built by
//! the test, each checked against values it can know.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use caev2_tests::*;
use shard_store::Store;

struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    f16: PathBuf,
    f32: PathBuf,
    run: PathBuf,
}

/// 6 photos in 2 classes, 2 views, tiny teacher, stored in f16 and f32; a
/// ViT-Tiny trained for 3 steps on the f16 store.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        two_class_photos(&data);
        let (f16, f32) = (tmp.path().join("f16"), tmp.path().join("f32"));
        for (out, codec) in [(&f16, "f16"), (&f32, "f32")] {
            run_ok(&[
                "extract",
                "--teacher",
                s(&tiny_vit()),
                "--data",
                s(&data),
                "--out",
                s(out),
                "--views",
                "2",
                "--codec",
                codec,
                "--images-per-shard",
                "4",
                "--no-progress",
            ]);
        }
        let run = tmp.path().join("run");
        run_ok(&[
            "train",
            "--shards",
            s(&f16),
            "--data",
            s(&data),
            "--out",
            s(&run),
            "--batch",
            "2",
            "--steps",
            "3",
            "--lr",
            "5e-4",
            "--device",
            "cpu",
            "--no-progress",
        ]);
        Fixture { _tmp: tmp, data, f16, f32, run }
    })
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run_ok(args)).expect("json output")
}

#[test]
fn summary_reports_known_values() {
    let f = fixture();
    let j = json(&["inspect", "summary", s(&f.f16), "--json"]);
    assert_eq!(j["views_stored"], 12);
    assert_eq!(j["images_stored"], 6);
    assert_eq!(j["shards_done"], 2);
    assert_eq!(j["manifest"]["codec"], "f16");
    assert_eq!(j["manifest"]["teacher"]["tokens"], 17);
    // 17 x 24 f16 values = 816 bytes per record, plus alignment and index
    let bpv = j["bytes_per_view"].as_f64().expect("number");
    assert!((816.0..4000.0).contains(&bpv), "{bpv}");
    let text = run_ok(&["inspect", "summary", s(&f.f16)]);
    assert!(text.contains("12 stored, 2 per image") && text.contains("codec f16"), "{text}");
}

#[test]
fn show_matches_the_store() {
    let f = fixture();
    let j = json(&["inspect", "show", s(&f.f32), "--image", "a/coffee.png", "--json"]);
    let store = Store::open(&f.f32).expect("open");
    let id = j["image_id"].as_u64().expect("id");
    assert_eq!(j["views"].as_array().expect("views").len(), 2);
    let t = store.targets(id, 1).expect("ok").expect("stored").to_vec();
    let norms: Vec<f64> = t.chunks(24).map(|c| c.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()).collect();
    let mean = norms.iter().sum::<f64>() / norms.len() as f64;
    let v1 = &j["views"][1];
    assert!((v1["norm_mean"].as_f64().expect("n") - mean).abs() < 1e-6, "{v1}");
    let row = store.index().expect("index").into_iter().find(|r| r.image_id == id && r.view == 1).expect("row");
    assert_eq!(v1["params"]["crop"]["width"], row.params.crop.width);
    let nc = v1["neighbour_cosine"].as_f64().expect("c");
    assert!((-1.0..=1.0).contains(&nc));
    let by_id = json(&["inspect", "show", s(&f.f32), "--image", &id.to_string(), "--view", "0", "--json"]);
    assert_eq!(by_id["views"].as_array().expect("views").len(), 1);
    // every image, in both shards, by full path (binary search over index
    // parts), by file name (scan) and by id
    let mut rows = store.index().expect("index");
    rows.dedup_by_key(|r| r.image_id);
    assert_eq!(rows.len(), 6);
    for r in &rows {
        let name = r.path.rsplit('/').next().expect("name");
        for key in [r.path.as_str(), name, &r.image_id.to_string()] {
            let j = json(&["inspect", "show", s(&f.f32), "--image", key, "--json"]);
            assert_eq!(j["image_id"].as_u64(), Some(r.image_id), "{key}");
            assert_eq!(j["path"].as_str(), Some(r.path.as_str()), "{key}");
        }
    }
    let o = run(&["inspect", "show", s(&f.f32), "--image", "b/nope.JPEG"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no stored image"));
}

#[test]
fn render_writes_a_sheet_of_the_right_size() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("sheet.png");
    run_ok(&["inspect", "render", s(&f.f16), "--image", "b/imagenet_14_129.jpg", "--out", s(&out)]);
    let img = image::open(&out).expect("png").to_rgb8();
    // 2 views of the 32-px teacher input: (2*32 + 8) x 2*(32 + 8)
    assert_eq!(img.dimensions(), (72, 80));
    run_ok(&["inspect", "render", s(&f.f16), "--image", "b/imagenet_14_129.jpg", "--view", "1", "--data", s(&f.data), "--out", s(&out)]);
    assert_eq!(image::open(&out).expect("png").to_rgb8().dimensions(), (72, 40));
}

#[test]
fn compare_f16_with_f32() {
    let f = fixture();
    let j = json(&["inspect", "compare", s(&f.f32), s(&f.f16), "--json"]);
    assert_eq!(j["views"], 12);
    let mean = j["mean_cosine"].as_f64().expect("c");
    let min = j["min_cosine"].as_f64().expect("c");
    assert!(mean > 0.99999 && min > 0.9999, "f16 keeps targets: {j}");
    let err = j["max_abs_error"].as_f64().expect("e");
    assert!(err > 0.0 && err < 1e-3, "{j}");
    let (a, b) = (j["bytes_per_view_a"].as_f64().expect("a"), j["bytes_per_view_b"].as_f64().expect("b"));
    assert!(b < a, "f16 is smaller: {a} vs {b}");
}

/// Every file under `root`, relative path -> bytes.
/// `caev2 train` of `steps` steps of 2 images on the CPU.
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
        "2",
        "--steps",
        steps,
        "--lr",
        "5e-4",
        "--device",
        "cpu",
    ]
}

fn files(root: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("list") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().and_then(|d| d.file_name()).is_none_or(|d| d != "locks") {
                out.insert(p.strip_prefix(root).expect("inside").to_path_buf(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// `inspect recode` writes what `extract --codec` would have written: from
/// the f32 store, an f16 store byte-identical to the extracted one. An int8
/// recode verifies, keeps the targets (cosine > 0.9999 at under half the
/// bytes of f16), trains, and resumes after a lost shard to the same bytes.
/// Bad destinations are refused.
#[test]
fn recode_writes_what_extract_would_have_written() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    let r16 = tmp.path().join("r16");
    run_ok(&["inspect", "recode", s(&f.f32), s(&r16), "--codec", "f16"]);
    assert_eq!(files(&r16), files(&f.f16), "recoded f16 differs from extracted f16");

    let r8 = tmp.path().join("r8");
    let j = json(&["inspect", "recode", s(&f.f32), s(&r8), "--codec", "int8", "--json"]);
    assert_eq!(j["recoded"]["views"], 12);
    run_ok(&["inspect", "verify", s(&r8)]);
    let c = json(&["inspect", "compare", s(&f.f32), s(&r8), "--json"]);
    assert_eq!(c["codec_b"], "int8");
    assert!(c["mean_cosine"].as_f64().expect("c") > 0.9999 && c["p1_cosine"].as_f64().expect("c") > 0.9999, "{c}");
    let c16 = json(&["inspect", "compare", s(&f.f32), s(&f.f16), "--json"]);
    assert!(c["bytes_per_view_b"].as_f64().expect("b") < c16["bytes_per_view_b"].as_f64().expect("b"), "{c} {c16}");
    let run8 = tmp.path().join("run8");
    run_ok(&train_args(&r8, &f.data, &run8, "2"));
    assert_eq!(losses(&run8).len(), 2);

    // a lost shard is rewritten, the rest kept
    let before = files(&r8);
    std::fs::remove_file(r8.join("done/shard-00001.json")).expect("rm");
    std::fs::remove_file(r8.join("shards/shard-00001.bin")).expect("rm");
    let j = json(&["inspect", "recode", s(&f.f32), s(&r8), "--codec", "int8", "--json"]);
    assert_eq!((j["recoded"]["shards_written"].as_u64(), j["recoded"]["shards_already_done"].as_u64()), (Some(1), Some(1)));
    assert_eq!(files(&r8), before);

    // refused: onto itself, onto a store of another codec
    let e = String::from_utf8_lossy(&run(&["inspect", "recode", s(&f.f32), s(&f.f32), "--codec", "f16"]).stderr).into_owned();
    assert!(e.contains("the destination is the source store"), "{e}");
    let out = run(&["inspect", "recode", s(&f.f32), s(&r8), "--codec", "f16"]);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && e.contains("codec"), "{e}");
}

#[test]
fn verify_catches_a_missing_shard_and_a_truncated_index() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    for (damage, expect) in [("missing shard", "shard-00001.bin"), ("truncated index", "parquet")] {
        let copy = tmp.path().join(damage.replace(' ', "-"));
        copy_dir(&f.f16, &copy);
        match damage {
            "missing shard" => std::fs::remove_file(copy.join("shards/shard-00001.bin")).expect("rm"),
            _ => {
                let p = copy.join("index/shard-00000.parquet");
                let b = std::fs::read(&p).expect("read");
                std::fs::write(&p, &b[..b.len() / 2]).expect("truncate");
            }
        }
        let o = run(&["inspect", "verify", s(&copy)]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{damage}: {text}");
        assert!(text.contains(expect), "{damage}: {text}");
    }
    assert!(run_ok(&["inspect", "verify", s(&f.f16), "--json"]).contains("\"problems\": []"));
}

#[test]
fn eval_knn_and_linear_rate_checkpoint_floor_and_teacher() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("eval.json");
    let teacher = tiny_vit();
    let j = json(&[
        "eval",
        "knn",
        "--data",
        s(&f.data),
        "--checkpoint",
        s(&f.run),
        "--teacher",
        s(&teacher),
        "--k",
        "3",
        "--folds",
        "3",
        "--out",
        s(&out),
        "--json",
    ]);
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 6, "checkpoint, random floor, teacher x (cls, mean): {j}");
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r["knn"].as_f64().unwrap_or(-1.0))), "{j}");
    assert!(rows[2]["encoder"].as_str().expect("name").starts_with("random-init vit_tiny"));
    assert_eq!(rows[4]["dim"], 24, "teacher features are its 24-dim tokens");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&out).expect("file")).expect("json")["rows"], j["rows"]);
    let lin = json(&["eval", "linear", "--data", s(&f.data), "--teacher", s(&teacher), "--folds", "3", "--epochs", "5", "--json"]);
    assert!(lin["rows"][0]["linear"].as_f64().is_some());
    // a label file maps folders to labels
    let tsv = tmp.path().join("labels.tsv");
    std::fs::write(&tsv, "wnid\tcoarse\na\tone\nb\ttwo\n").expect("write");
    let l =
        json(&["eval", "knn", "--data", s(&f.data), "--labels", s(&tsv), "--teacher", s(&teacher), "--folds", "2", "--k", "2", "--json"]);
    assert_eq!(l["classes"], serde_json::json!(["one", "two"]));
}

#[test]
fn export_and_plot() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("encoder.safetensors");
    let text = run_ok(&["export", "--checkpoint", s(&f.run), "--out", s(&out)]);
    assert!(text.contains("174 tensors"), "ViT-Tiny: cls, pos, patch (2), 12 x 14 block tensors, norm (2): {text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("encoder.json")).expect("json")).expect("json");
    assert_eq!(cfg["architecture"], "vit_tiny_patch16_224");
    assert_eq!(cfg["timm_kwargs"]["num_heads"], 12);
    let png = run_ok(&["plot", s(&f.run), "--out", s(&tmp.path().join("c.png"))]);
    assert!(png.contains("3 steps"), "{png}");
    assert_eq!(image::open(tmp.path().join("c.png")).expect("png").to_rgb8().dimensions(), (1000, 760));
}

/// The pca codec end to end. `extract --codec pca` fits once, before its
/// first shard; a second run (a resumed or split worker) reuses the model
/// and the manifest. The store verifies, keeps the targets at the fitted
/// cosine in fewer bytes than int8, trains, and equals a recode of the f32
/// store (the same fit views). Other fit settings are refused; a damaged
/// model is named by `verify` and refused by `train`.
#[test]
fn pca_codec_fits_once_and_is_checked() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("pca");
    let teacher = tiny_vit();
    let extract = |more: &[&str]| {
        let mut args = vec![
            "extract",
            "--teacher",
            s(&teacher),
            "--data",
            s(&f.data),
            "--out",
            s(&p),
            "--views",
            "2",
            "--codec",
            "pca",
            "--fit-views",
            "12",
            "--images-per-shard",
            "4",
            "--no-progress",
        ];
        args.extend_from_slice(more);
        run(&args)
    };
    let models = |root: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("codec-pca-"))
            .collect();
        v.sort();
        v
    };
    assert!(extract(&["--shards", "0..1"]).status.success());
    let manifest = std::fs::read(p.join("manifest.json")).expect("manifest");
    let first = models(&p);
    assert_eq!(first.len(), 1, "one model file: {first:?}");
    assert!(!p.join("done/shard-00001.json").exists());
    assert!(extract(&[]).status.success());
    assert_eq!(std::fs::read(p.join("manifest.json")).expect("manifest"), manifest, "the second run kept the manifest");
    assert_eq!(models(&p), first, "the second run reused the model");
    run_ok(&["inspect", "verify", s(&p)]);

    let c = json(&["inspect", "compare", s(&f.f32), s(&p), "--json"]);
    assert_eq!((c["codec_b"].as_str(), c["views"].as_u64()), (Some("pca"), Some(12)));
    assert!(c["mean_cosine"].as_f64().expect("c") > 0.995, "fitted to 0.996 on these very views: {c}");
    let tmp2 = tempfile::tempdir().expect("tmp");
    let r8 = tmp2.path().join("r8");
    run_ok(&["inspect", "recode", s(&f.f32), s(&r8), "--codec", "int8"]);
    let c8 = json(&["inspect", "compare", s(&f.f32), s(&r8), "--json"]);
    assert!(c["bytes_per_view_b"].as_f64() < c8["bytes_per_view_b"].as_f64(), "{c} {c8}");

    let rp = tmp2.path().join("rp");
    run_ok(&["inspect", "recode", s(&f.f32), s(&rp), "--codec", "pca", "--fit-views", "12"]);
    assert_eq!(files(&rp), files(&p), "recoded pca differs from extracted pca");

    let runp = tmp2.path().join("runp");
    run_ok(&train_args(&p, &f.data, &runp, "2"));
    let l = losses(&runp);
    assert!(l.len() == 2 && l.iter().all(|x| x.1.is_finite() && x.1 > 0.0), "{l:?}");

    let out = extract(&["--fit-cosine", "0.99"]);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && e.contains("codec_fit.cosine"), "{e}");

    // FORMAT.md is enough to read the records: an independent Python
    // decoder written from it gives the coefficients the Rust reader gives
    let store = Store::open(&p).expect("open");
    let step = store.codec_model().expect("model").step();
    let script = workspace().join("shard-store/scripts/pca_decode.py");
    let out = std::process::Command::new(python()).arg(&script).arg(&p).args(["0", "0", "3"]).output().expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (line, (image, view)) in String::from_utf8_lossy(&out.stdout).lines().zip([(0, 0), (1, 1)]) {
        let q: Vec<Vec<i64>> = serde_json::from_str(line).expect("json");
        let t = store.targets(image, view).expect("read").expect("stored");
        let mut c = vec![0f32; t.tokens * t.dim];
        assert!(t.decode_for_training(&mut c));
        let flat: Vec<i64> = q.into_iter().flatten().collect();
        assert_eq!(flat, c.iter().map(|x| (x / step).round() as i64).collect::<Vec<_>>(), "image {image} view {view}");
        assert!(flat.iter().any(|&v| v != 0));
    }
    // and escapes (residuals the fit never saw): a model fitted on two views
    // leaves them in the others' records, which both readers decode alike
    let r2 = tmp2.path().join("r2");
    run_ok(&["inspect", "recode", s(&f.f32), s(&r2), "--codec", "pca", "--fit-views", "2"]);
    let store2 = Store::open(&r2).expect("open");
    let step2 = store2.codec_model().expect("model").step();
    let slots: Vec<(u64, u32)> = store2.index().expect("index").iter().map(|r| (r.image_id, r.view)).filter(|&(i, _)| i > 0).collect();
    let mut escapes = 0;
    for &(image, view) in &slots {
        let t = store2.targets(image, view).expect("read").expect("stored");
        escapes += u32::from_le_bytes(t.bytes[..4].try_into().expect("4 bytes"));
        let m2 = store2.manifest();
        let (shard, slot) = m2.layout.slot(image, view, m2.views.views_per_image);
        let out = std::process::Command::new(python())
            .arg(&script)
            .arg(&r2)
            .arg(shard.to_string())
            .arg(slot.to_string())
            .output()
            .expect("python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let q: Vec<Vec<i64>> = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("json");
        let mut c = vec![0f32; t.tokens * t.dim];
        assert!(t.decode_for_training(&mut c));
        assert_eq!(q.into_iter().flatten().collect::<Vec<_>>(), c.iter().map(|x| (x / step2).round() as i64).collect::<Vec<_>>());
        if escapes > 0 {
            break;
        }
    }
    assert!(escapes > 0, "no escapes in {} records: the test does not reach them", slots.len());

    let model = p.join(&first[0]);
    let mut bytes = std::fs::read(&model).expect("model");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&model, &bytes).expect("damage");
    for args in [vec!["inspect", "verify", s(&p)], train_args(&p, &f.data, &runp, "4")] {
        let out = run(&args);
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && e.contains(&first[0]) && e.contains("damaged codec model"), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
}
