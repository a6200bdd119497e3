//! What a damaged store, an odd dataset or a bad argument can do: each case
//! is reproduced on real files and processes, and must end in a clear
//! one-line error (or a reported skip), never a panic, a silent success or a
//! half-written store.

use std::path::{Path, PathBuf};
use std::process::Output;

use caev2_tests::*;
use shard_store::{IndexRow, ShardReport, Store};

/// 6 photos in 2 classes, 2 views each, tiny teacher, 2 shards of 4 and 2 images.
fn small_store(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    two_class_photos(&data);
    let store = tmp.join("store");
    extract_tiny(&data, &store, &["--views", "2", "--images-per-shard", "4"]);
    (data, store)
}

fn train(store: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--shards",
        s(store),
        "--data",
        s(data),
        "--out",
        s(out),
        "--batch",
        "2",
        "--min-lr",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: non-zero, one line of error on stderr, no panic.
fn failed(o: &Output) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "should fail; stdout:\n{}\nstderr:\n{e}", String::from_utf8_lossy(&o.stdout));
    assert!(!e.contains("panicked") && !e.contains("stack backtrace"), "a clean error, not a panic:\n{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line of error:\n{e}");
    assert!(e.starts_with("error: "), "{e}");
    e
}

fn verify(store: &Path) -> (bool, String) {
    let o = run(&["inspect", "verify", s(store)]);
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).expect("read");
    b[at] ^= 0x5a;
    std::fs::write(path, b).expect("write");
}

/// Rewrite shard 0's index part with `edit` applied to its rows, and record
/// the new part's size and checksum in the report, as a careful forger would:
/// only the seeded sampler and the file-list hash can tell.
fn rewrite_index(store: &Path, edit: impl Fn(&mut Vec<IndexRow>)) {
    let st = Store::open(store).expect("open");
    let mut rows = st.index_of(0).expect("index");
    edit(&mut rows);
    let path = store.join("index/shard-00000.parquet");
    let bytes = shard_store::encode_index(&path, &rows).expect("encode index");
    std::fs::write(&path, &bytes).expect("write index");
    let done = store.join("done/shard-00000.json");
    let mut report: ShardReport = serde_json::from_slice(&std::fs::read(&done).expect("report")).expect("json");
    report.index_bytes = bytes.len() as u64;
    report.index_crc32c = Some(crc32c::crc32c(&bytes));
    std::fs::write(&done, serde_json::to_vec_pretty(&report).expect("json")).expect("write report");
}

#[test]
fn a_damaged_index_is_caught_by_verify_and_refused_by_train() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, clean) = small_store(tmp.path());
    assert!(verify(&clean).0, "a fresh store verifies");
    let case = |name: &str| {
        let dir = tmp.path().join(name);
        copy_dir(&clean, &dir);
        dir
    };

    // one byte anywhere in the Parquet file: the report's checksum
    let st = case("flipped");
    let len = std::fs::metadata(st.join("index/shard-00000.parquet")).expect("stat").len() as usize;
    flip_byte(&st.join("index/shard-00000.parquet"), len / 2);
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("shard-00000.parquet") && out.contains("checksum"), "{out}");
    let e = failed(&train(&st, &data, &tmp.path().join("run-flipped"), &["--steps", "2"]));
    assert!(e.contains("shard-00000.parquet"), "{e}");

    // a crop moved inside the image, report checksum updated: the sampler
    let st = case("moved-crop");
    rewrite_index(&st, |rows| {
        let p = &mut rows[0].params;
        p.crop.top = if p.crop.top > 0 { p.crop.top - 1 } else { p.crop.top + 1 };
    });
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("seeded sampler"), "{out}");

    // a jitter factor changed
    let st = case("jitter");
    rewrite_index(&st, |rows| rows[1].params.jitter[0].1 += 0.01);
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("seeded sampler"), "{out}");

    // a crop box outside the image: refused by every reader, no panic
    let st = case("outside");
    rewrite_index(&st, |rows| rows[0].params.crop.top = rows[0].params.image_height);
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("does not fit"), "{out}");
    let e = failed(&train(&st, &data, &tmp.path().join("run-outside"), &["--steps", "2"]));
    assert!(e.contains("does not fit"), "{e}");

    // a path changed (to another image of the dataset): the file-list hash
    let st = case("path");
    rewrite_index(&st, |rows| {
        let other = rows.iter().find(|r| r.image_id != rows[0].image_id).expect("two images").path.clone();
        let id = rows[0].image_id;
        rows.iter_mut().filter(|r| r.image_id == id).for_each(|r| r.path = other.clone());
    });
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("file_list_sha256"), "{out}");
}

#[test]
fn damaged_records_stop_training_naming_the_shard_and_offset() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, st) = small_store(tmp.path());
    // one byte in every record of shard 1 (images 4 and 5, 2 views each)
    let rows = Store::open(&st).expect("open").index_of(1).expect("index");
    for r in &rows {
        flip_byte(&st.join("shards/shard-00001.bin"), r.offset as usize + 100);
    }
    let (ok, out) = verify(&st);
    assert!(!ok && out.matches("checksum").count() == rows.len(), "{out}");
    // every image is read in one epoch of 3 steps of 2
    let e = failed(&train(&st, &data, &tmp.path().join("run"), &["--steps", "3"]));
    assert!(e.contains("shard-00001.bin") && e.contains("checksum"), "{e}");
    assert!(rows.iter().any(|r| e.contains(&format!("byte {}:", r.offset))), "names the record's offset: {e}");
}

#[test]
fn edited_reports_are_caught_and_do_not_steer_training() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, clean) = small_store(tmp.path());
    let case = |name: &str| {
        let dir = tmp.path().join(name);
        copy_dir(&clean, &dir);
        dir
    };
    let edit = |st: &Path, shard: u32, f: &dyn Fn(&mut serde_json::Value)| {
        let p = st.join(format!("done/shard-{shard:05}.json"));
        let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
        f(&mut j);
        std::fs::write(&p, serde_json::to_vec_pretty(&j).expect("json")).expect("write");
    };

    let st = case("counter");
    edit(&st, 0, &|j| j["views_stored"] = 999.into());
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("999 views"), "{out}");
    // steps per epoch come from the index: 6 images / batch 2 = 3
    let o = train(&st, &data, &tmp.path().join("run"), &["--epochs", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["steps"], 3, "{j}");

    let st = case("swapped");
    let (a, b) = (st.join("done/shard-00000.json"), st.join("done/shard-00001.json"));
    let (ja, jb) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
    std::fs::write(&a, jb).expect("write");
    std::fs::write(&b, ja).expect("write");
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("shard report"), "{out}");

    // more skipped files than images: no wrap-around in the summary
    let st = case("skipped");
    edit(&st, 1, &|j| {
        j["num_images"] = 0.into();
        j["skipped"] = serde_json::json!([{"image_id": 4, "path": "b/x.JPEG", "reason": "edited"}]);
    });
    let o = run(&["inspect", "summary", s(&st), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ok, out) = verify(&st);
    assert!(!ok && out.contains("report"), "{out}");
}

#[test]
fn huge_or_odd_arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    make_dataset(&data, &[("a", dep("data/photos/coffee.png")), ("a", dep("data/photos/chelsea.png"))]);
    let out = tmp.path().join("store");
    let teacher = tiny_vit();
    let extract = |extra: &[&str]| {
        let mut args = vec!["extract", "--teacher", s(&teacher), "--data", s(&data), "--out", s(&out), "--no-progress"];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (flag, value, says) in [
        ("--views", "4294967295", "--views 4294967295"),
        ("--views", "100000000", "--views 100000000"),
        ("--views", "0", "--views 0"),
        ("--batch", "1000000000", "--batch 1000000000"),
        ("--student-size", "0", "--student-size 0"),
        ("--images-per-shard", "0", "--images-per-shard 0"),
        ("--decode-threads", "100000", "--decode-threads 100000"),
        ("--threads", "100000", "--threads 100000"),
    ] {
        let e = failed(&extract(&[flag, value]));
        assert!(e.contains(says), "{e}");
        assert!(!out.exists(), "{flag} {value}: nothing may be written");
    }
    // a GPU teacher where there is no GPU (or no GPU build of ONNX Runtime)
    if !Path::new("/proc/driver/nvidia/version").exists() {
        let e = failed(&extract(&["--device", "cuda"]));
        assert!(e.contains("no NVIDIA driver"), "{e}");
        assert!(!out.exists(), "--device cuda: nothing may be written");
    }
    let e = failed(&extract(&["--device", "cpu", "--tensorrt"]));
    assert!(e.contains("--tensorrt needs a GPU"), "{e}");
    // the corrected retry works
    let o = extract(&["--views", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let run_dir = tmp.path().join("run");
    for batch in ["18446744073709551615", "1000000000", "0"] {
        let e = failed(&run(&["train", "--shards", s(&out), "--data", s(&data), "--out", s(&run_dir), "--batch", batch, "--steps", "1"]));
        assert!(e.contains(&format!("--batch {batch}")), "{e}");
        assert!(!run_dir.exists());
    }
    for (flag, value) in [
        ("--lr", "-1"),
        ("--lr", "NaN"),
        ("--drop-path", "1.5"),
        ("--beta2", "1"),
        ("--threads", "100000"),
        ("--loader-threads", "0"),
        ("--peak-tflops", "-5"),
        ("--peak-tflops", "inf"),
    ] {
        let arg = format!("{flag}={value}");
        let e = failed(&run(&[
            "train",
            "--shards",
            s(&out),
            "--data",
            s(&data),
            "--out",
            s(&run_dir),
            "--batch",
            "1",
            "--steps",
            "1",
            "--min-lr=0",
            &arg,
        ]));
        assert!(e.contains(flag), "{e}");
        assert!(!run_dir.exists());
    }

    // URLs where only a local path works (image folders, run folders) and
    // schemes without an object store are refused, not turned into local
    // folders named "s3:" (stores in buckets: tests/tests/remote.rs)
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).expect("mkdir");
    for (args, says) in [
        (vec!["extract", "--teacher", s(&tiny_vit()), "--data", "gs://bucket/images", "--out", "store"], "not a local path"),
        (
            vec!["train", "--shards", s(&out), "--data", s(&data), "--out", "s3://bucket/run", "--steps", "1", "--batch", "1"],
            "not a local path",
        ),
        (vec!["inspect", "verify", "https://example.com/store"], "https:// is not supported"),
        (vec!["extract", "--teacher", s(&tiny_vit()), "--data", s(&data), "--out", "ftp://host/x"], "ftp:// is not supported"),
    ] {
        let o = std::process::Command::new(caev2())
            .args(&args)
            .current_dir(&cwd)
            .env("CAEV2_CACHE", tmp.path().join("cache"))
            .output()
            .expect("spawn");
        let e = failed(&o);
        assert!(e.contains(says), "{e}");
    }
    assert_eq!(std::fs::read_dir(&cwd).expect("list").count(), 0, "nothing written in the working folder");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_can_be_restarted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, st) = small_store(tmp.path());
    let run_dir = tmp.path().join("run");
    // a run folder as a kill before the first checkpoint leaves it
    let o = train(&st, &data, &run_dir, &["--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(run_dir.join("checkpoints")).expect("rm");
    std::fs::write(
        run_dir.join("metrics.jsonl"),
        "{\"step\":1,\"epoch\":0,\"loss\":1.0,\"loss_v\":1.0,\"loss_z\":1.0,\"lr\":0.0,\"grad_norm\":1.0,\"images_per_sec\":1.0}\n",
    )
    .expect("write");
    let o = train(&st, &data, &run_dir, &["--steps", "2", "--resume", "--json"]);
    assert!(o.status.success(), "--resume restarts a run with no checkpoint: {}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!((j["start_step"].as_u64(), j["steps"].as_u64()), (Some(0), Some(2)), "{j}");
    std::fs::remove_dir_all(run_dir.join("checkpoints")).expect("rm");
    let o = train(&st, &data, &run_dir, &["--steps", "3"]);
    assert!(o.status.success(), "a plain rerun (other settings) restarts it too: {}", stderr(&o));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    // a run with a checkpoint is never overwritten
    let e = failed(&train(&st, &data, &run_dir, &["--steps", "3"]));
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn a_teacher_that_outputs_nan_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let nan = tmp.path().join("nan.onnx");
    let script = r#"
import sys, onnx, numpy as np
from onnx import helper, numpy_helper
m = onnx.load(sys.argv[1])
g = m.graph
out = g.output[0].name
for n in g.node:
    n.output[:] = [o + "_raw" if o == out else o for o in n.output]
g.initializer.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan_const"))
g.node.append(helper.make_node("Mul", [out + "_raw", "nan_const"], [out]))
onnx.save(m, sys.argv[2])
"#;
    let o = std::process::Command::new(python()).args(["-c", script, s(&tiny_vit()), s(&nan)]).output().expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = tmp.path().join("data");
    make_dataset(&data, &[("a", dep("data/photos/coffee.png"))]);
    let out = tmp.path().join("store");
    let e = failed(&run(&["extract", "--teacher", s(&nan), "--data", s(&data), "--out", s(&out), "--views", "1", "--no-progress"]));
    assert!(e.contains("finite") && e.contains("coffee.png"), "{e}");
    assert!(!out.join("done/shard-00000.json").exists(), "no shard may be committed");
}

#[test]
fn dangling_links_and_non_utf8_names_are_skipped_into_the_report() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    make_dataset(&data, &[("a", dep("data/photos/coffee.png")), ("a", dep("data/photos/chelsea.png"))]);
    std::os::unix::fs::symlink(tmp.path().join("gone.png"), data.join("a/dangling.png")).expect("link");
    std::fs::copy(dep("data/photos/coffee.png"), data.join("a").join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"))).expect("copy");
    let out = tmp.path().join("store");
    let json =
        run_ok(&["extract", "--teacher", s(&tiny_vit()), "--data", s(&data), "--out", s(&out), "--views", "1", "--json", "--no-progress"]);
    let j: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(j["store_complete"], true, "{json}");
    assert_eq!(j["views_stored"], 2, "{json}");
    let skipped: Vec<(String, String)> = j["skipped"]
        .as_array()
        .expect("list")
        .iter()
        .map(|x| (x["path"].as_str().unwrap_or("").to_owned(), x["reason"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(skipped.len(), 2, "{json}");
    assert!(skipped.iter().any(|(p, r)| p == "a/dangling.png" && r.contains("dangling")), "{skipped:?}");
    assert!(skipped.iter().any(|(p, r)| p.starts_with("a/caf") && r.contains("UTF-8")), "{skipped:?}");
    assert!(verify(&out).0, "the store verifies");
}

#[test]
fn errors_are_one_line_even_with_rust_backtrace_set() {
    let tmp = tempfile::tempdir().expect("tmp");
    let o = std::process::Command::new(caev2())
        .args(["train", "--shards", s(&tmp.path().join("missing")), "--data", s(tmp.path()), "--out", s(&tmp.path().join("run"))])
        .env("RUST_BACKTRACE", "full")
        .output()
        .expect("spawn");
    let e = failed(&o);
    assert!(e.contains("missing") && e.contains("manifest.json"), "{e}");
    // each cause once
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    // `caev2 --help` lists every command with its own text
    let help = run_ok(&["--help"]);
    let line = |cmd: &str| help.lines().find(|l| l.trim_start().starts_with(cmd)).unwrap_or("").to_owned();
    assert!(line("export").contains("safetensors"), "{help}");
    assert!(line("plot").contains("curves"), "{help}");
}
