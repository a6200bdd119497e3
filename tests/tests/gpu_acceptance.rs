//! The GPU acceptance script (scripts/gpu-acceptance.sh, issue 23),
//! rehearsed on the CPU: `prepare` packs what a GPU machine needs, and a dry
//! run goes through every step at toy size, so the script's own mistakes are
//! found here and not in a lent GPU's minutes.

use std::process::Command;

use caev2_tests::*;

#[test]
fn the_gpu_acceptance_script_dry_runs_every_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gpu, out, work) = (tmp.path().join("gpu"), tmp.path().join("out"), tmp.path().join("work"));
    let script = workspace().join("scripts/gpu-acceptance.sh");
    let prepare = Command::new(&script)
        .args(["prepare", "--gpu-dir", s(&gpu), "--binary", s(&caev2()), "--images", s(&dep("data/imagenet-mini")), "--xz-preset", "0"])
        .output()
        .expect("spawn prepare");
    assert!(prepare.status.success(), "prepare failed: {}", String::from_utf8_lossy(&prepare.stderr));
    let said = String::from_utf8_lossy(&prepare.stdout);
    assert!(said.contains("of the 64 MiB a run carries"), "{said}");

    let run =
        Command::new(&script).args(["run", s(&out), "--gpu-dir", s(&gpu), "--work", s(&work), "--dry-run"]).output().expect("spawn run");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "dry run failed:\n{table}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(table.contains("DRY RUN") && table.contains("| step | status |"), "{table}");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json")).expect("json");
    let steps = results["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().map(|st| st["step"].as_str().expect("name")).collect();
    for want in [
        "loader alone",
        "ViT-T",
        "ViT-S",
        "ViT-B CPU",
        "ViT-B fp32",
        "world size 1",
        "2 ranks",
        "teacher on the CPU twice",
        "live vs cached",
    ] {
        assert!(names.iter().any(|n| n.contains(want)), "no step {want:?} in {names:?}");
    }
    for st in steps {
        assert_eq!(st["status"], "ok", "{st}");
    }
    // the data-parallel groups train what the single process trains
    for st in steps.iter().filter(|st| st.get("max_rel_loss_diff").is_some()) {
        assert!(st["max_rel_loss_diff"].as_f64().expect("diff") < 1e-5, "{st}");
    }
}
