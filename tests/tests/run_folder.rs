//! A run folder has one owner: of two trainings started together into one
//! `--out`, one trains and the other is refused in one line naming the
//! holder, changing nothing; a holder killed with SIGKILL leaves no stale
//! lock, and `--resume` takes over, from the store at another path (not
//! from another store). The folder records how the run ran
//! (`run.json`), and evaluations and exports carry it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use caev2_tests::*;

/// 30 photos x 2 views of the tiny ViT teacher, for a 112 px student.
fn store(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    imagenet_dataset(&data, 20);
    let out = tmp.join("store");
    extract_tiny(&data, &out, &["--views", "2", "--student-size", "112"]);
    (data, out)
}

fn train(store: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(caev2());
    c.args(["train", "--shards", s(store), "--data", s(data), "--out", s(out), "--batch", "4", "--steps", steps, "--lr", "5e-4"])
        .args(["--warmup-steps", "2", "--threads", "1", "--device", "cpu", "--no-progress"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

#[test]
fn of_two_trainings_into_one_folder_one_trains_and_the_other_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, store) = store(tmp.path());
    for trial in 0..6 {
        let out = tmp.path().join(format!("run{trial}"));
        let a = train(&store, &data, &out, "10", &[]).spawn().expect("spawn a");
        let b = train(&store, &data, &out, "10", &[]).spawn().expect("spawn b");
        let pids = [a.id(), b.id()];
        let outs = [a.wait_with_output().expect("wait a"), b.wait_with_output().expect("wait b")];
        let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(won.len(), 1, "trial {trial}: exactly one of two trainings into one folder runs ({:?})", outs.map(|o| o.status));
        let (winner, loser) = (won[0], 1 - won[0]);
        let err = String::from_utf8_lossy(&outs[loser].stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "trial {trial}: one line: {err}");
        assert!(err.contains(s(&out)) && err.contains("in use by another training"), "trial {trial}: {err}");
        assert!(err.contains(&format!("pid {}", pids[winner])), "trial {trial}: the holder's pid {}: {err}", pids[winner]);
        // the winner's run is whole: every step once, one invocation, its pid
        let steps: Vec<u64> = losses(&out).iter().map(|l| l.0).collect();
        assert_eq!(steps, (1..=10).collect::<Vec<u64>>(), "trial {trial}");
        let run = json(&out.join("run.json"));
        let inv = run["invocations"].as_array().expect("invocations");
        assert_eq!(inv.len(), 1, "trial {trial}: {run}");
        assert_eq!(inv[0]["ranks"][0]["pid"], pids[winner], "trial {trial}");
        assert_eq!(inv[0]["end_step"], 10, "trial {trial}");
    }
}

#[test]
fn a_killed_holder_leaves_no_stale_lock_and_resume_takes_over() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, store) = store(tmp.path());
    let out = tmp.path().join("run");
    let mut holder =
        train(&store, &data, &out, "40", &["--checkpoint-every", "4"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    wait_for_checkpoint(&out, "step-00000004");
    // while it runs, a resume is refused and changes nothing
    let before = std::fs::read(out.join("config.json")).expect("config");
    let o = train(&store, &data, &out, "40", &["--checkpoint-every", "4", "--resume"]).output().expect("resume");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains(&format!("pid {}", holder.id())), "{err}");
    assert_eq!(std::fs::read(out.join("config.json")).expect("config"), before);
    holder.kill().expect("SIGKILL");
    holder.wait().expect("reap");
    let done = losses(&out).len();
    assert!(done < 40, "the kill came too late ({done} steps)");
    // the store moved meanwhile (another node's copy, another cache folder): its identity, not its path, must match
    let moved = tmp.path().join("store-moved");
    std::fs::rename(&store, &moved).expect("move the store");
    let o = train(&moved, &data, &out, "40", &["--checkpoint-every", "4", "--resume"]).output().expect("resume");
    assert!(o.status.success(), "resume after SIGKILL: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&out).len(), 40);
    assert_eq!(json(&out.join("config.json"))["store"], s(&moved), "config.json follows the store");
    let other = tmp.path().join("other-store");
    extract_tiny(&data, &other, &["--views", "2", "--student-size", "112", "--seed", "3"]);
    let o = train(&other, &data, &out, "40", &["--checkpoint-every", "4", "--resume"]).output().expect("resume");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("--resume: the run trained on store"), "{err}");
    // run.json: the killed invocation (no end) and the one that resumed it
    let run = json(&out.join("run.json"));
    let inv = run["invocations"].as_array().expect("invocations");
    assert_eq!(inv.len(), 2, "{run}");
    assert!(inv[0]["end_step"].is_null(), "the killed invocation has no end: {run}");
    assert!(inv[1]["start_step"].as_u64().expect("start") >= 4);
    assert_eq!(inv[1]["end_step"], 40);
    for i in inv {
        assert_eq!((i["world_size"].as_u64(), i["launcher"].as_str(), i["backend"].as_str()), (Some(1), Some("single"), Some("none")));
        assert_eq!(i["ranks"][0]["device"], "cpu");
        assert!(i["libtorch"].as_str().is_some_and(|v| v.starts_with("2.")), "{i}");
        assert!(i["onnxruntime"].as_str().is_some_and(|v| v.starts_with("1.")), "{i}");
        assert!(i["program"]["version"].as_str().is_some_and(|v| v.starts_with("caev2 ")), "{i}");
        assert!(i["program"]["args"].as_array().is_some_and(|a| a.iter().any(|x| x == "--resume") == (i == &inv[1])), "{i}");
        assert!(i["store_id"].as_str().is_some_and(|v| !v.is_empty()));
    }

    // evaluations and exports carry the run's provenance
    let align: serde_json::Value =
        serde_json::from_str(&run_ok(&["eval", "align", "--checkpoint", s(&out), "--views", "1..2", "--json", "--no-random"]))
            .expect("json");
    assert_eq!(align["provenance"], run);
    let knn: serde_json::Value =
        serde_json::from_str(&run_ok(&["eval", "knn", "--data", s(&data), "--checkpoint", s(&out), "--no-random", "--k", "3", "--json"]))
            .expect("json");
    assert_eq!(knn["provenance"][s(&out)], run);
    let enc = tmp.path().join("encoder.safetensors");
    run_ok(&["export", "--checkpoint", s(&out), "--out", s(&enc)]);
    assert_eq!(json(&enc.with_extension("json"))["provenance"], run);
}
