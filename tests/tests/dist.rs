//! Data-parallel training with real processes and libtorch's c10d Gloo
//! backend on this CPU machine, launched the way torchrun launches them
//! (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): 2 ranks of
//! half the batch train exactly what 1 rank of the whole batch trains, a
//! killed rank stops the other, a killed 2-rank run resumes to the same
//! losses (on 2 ranks or on 1), and bad launches are refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use caev2_tests::*;

/// 6 photos x 2 views from the tiny teacher, shared by the whole binary.
fn store() -> &'static (PathBuf, PathBuf) {
    static STORE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("tmp"))).path().to_owned();
        let data = dir.join("data");
        two_class_photos(&data);
        let store = dir.join("store");
        run_ok(&["extract", "--teacher", s(&tiny_vit()), "--data", s(&data), "--out", s(&store), "--views", "2", "--no-progress"]);
        (data, store)
    })
}

/// `caev2 train` arguments: global batch 4, drop path on (the tiny preset's 0.1).
fn args(out: &Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let (data, store) = store();
    let mut a: Vec<String> = [
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
        &steps.to_string(),
        "--lr",
        "5e-4",
        "--warmup-steps",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--dist-timeout",
        "60",
    ]
    .iter()
    .map(|x| (*x).to_owned())
    .collect();
    a.extend(extra.iter().map(|x| (*x).to_owned()));
    a
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Start rank `rank` of `world` as torchrun would.
fn spawn_rank(rank: usize, world: usize, port: u16, args: &[String]) -> Child {
    Command::new(caev2())
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caev2")
}

/// Run 2 ranks with per-rank arguments; returns both outputs.
fn two_ranks(args0: &[String], args1: &[String]) -> (Output, Output) {
    let port = free_port();
    let r0 = spawn_rank(0, 2, port, args0);
    let r1 = spawn_rank(1, 2, port, args1);
    (r0.wait_with_output().expect("rank 0"), r1.wait_with_output().expect("rank 1"))
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_same_losses(a: &[(u64, f64, f64, f64)], b: &[(u64, f64, f64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() <= 1e-5 * x.1.abs(), "{what}: step {}: {} vs {}", x.0, x.1, y.1);
    }
}

/// Every parameter of a run's last checkpoint.
fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).expect("latest");
    let bytes = std::fs::read(run.join("checkpoints").join(latest.trim()).join("model.safetensors")).expect("model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut named: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// 1 rank x batch 4 (reference), 2 ranks x 2 from the start, and a 2-rank
/// run killed after its step-4 checkpoint then resumed, once on 2 ranks and
/// once on 1: the same losses and the same final weights within 1e-5.
#[test]
fn two_ranks_of_half_the_batch_train_what_one_rank_of_the_whole_trains() {
    let tmp = tempfile::tempdir().expect("tmp");
    let steps = 8;
    let single = tmp.path().join("single");
    let o = Command::new(caev2()).args(args(&single, steps, &["--checkpoint-every", "4"])).output().expect("spawn");
    ok(&o);

    let pair = tmp.path().join("pair");
    let a = args(&pair, steps, &["--checkpoint-every", "4"]);
    let (o0, o1) = two_ranks(&a, &a);
    let text = ok(&o0);
    assert!(text.contains("data-parallel: 2 ranks (torchrun, Gloo), 2 images per rank"), "{text}");
    assert!(ok(&o1).is_empty(), "only rank 0 prints the summary");
    assert_same_losses(&losses(&single), &losses(&pair), "2 ranks vs 1");
    let (w1, w2) = (weights(&single), weights(&pair));
    assert_eq!(w1.len(), w2.len());
    let (mut d2, mut n2) = (0f64, 0f64);
    for ((name, x), (_, y)) in w1.iter().zip(&w2) {
        // A key's bias cannot change attention (softmax ignores a constant
        // added to every key's score), so its true gradient is zero and
        // AdamW turns float noise into updates of either sign: the key
        // third of `qkv.bias` and the regressor's `norm1_k.bias` are skipped.
        let kept: Vec<(f32, f32)> = if name.ends_with("norm1_k.bias") {
            continue;
        } else if name.ends_with("attn.qkv.bias") {
            let d = x.len() / 3;
            x.iter().zip(y).enumerate().filter(|(i, _)| !(d..2 * d).contains(i)).map(|(_, (a, b))| (*a, *b)).collect()
        } else {
            x.iter().copied().zip(y.iter().copied()).collect()
        };
        let dt: f64 = kept.iter().map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let nt: f64 = kept.iter().map(|(a, _)| f64::from(*a).powi(2)).sum();
        assert!(dt.sqrt() <= 1e-5 * nt.sqrt(), "{name}: relative difference {:.2e}", (dt / nt).sqrt());
        d2 += dt;
        n2 += nt;
    }
    assert!(d2.sqrt() <= 1e-6 * n2.sqrt(), "all weights: relative difference {:.2e}", (d2 / n2).sqrt());

    // kill rank 1 after the step-4 checkpoint: rank 0 stops too, with an error
    let killed = tmp.path().join("killed");
    let a = args(&killed, steps, &["--checkpoint-every", "4"]);
    let port = free_port();
    let r0 = spawn_rank(0, 2, port, &a);
    let mut r1 = spawn_rank(1, 2, port, &a);
    wait_for_checkpoint(&killed, "step-00000004");
    r1.kill().expect("SIGKILL rank 1");
    r1.wait().expect("reap");
    let t = Instant::now();
    let o0 = r0.wait_with_output().expect("rank 0");
    let done = losses(&killed).len();
    if done < steps as usize {
        // (rank 0 may also have finished just before the kill took effect)
        assert!(!o0.status.success(), "rank 0 must fail when rank 1 dies");
        assert!(t.elapsed() < Duration::from_secs(60), "rank 0 exited only after {:?}", t.elapsed());
        let e = String::from_utf8_lossy(&o0.stderr);
        assert!(e.starts_with("error: ") && e.contains("rank 0 of 2"), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    // resume on 2 ranks, and a copy on 1 rank (the same global batch)
    let one = tmp.path().join("killed-on-one");
    copy_dir(&killed, &one);
    let mut a = args(&killed, steps, &["--checkpoint-every", "4"]);
    a.push("--resume".into());
    let (o0, o1) = two_ranks(&a, &a);
    assert!(!ok(&o0).contains("steps 0.."), "it continues, not restarts");
    ok(&o1);
    assert_same_losses(&losses(&single), &losses(&killed), "resumed on 2 ranks vs 1 rank");
    let mut a = args(&one, steps, &["--checkpoint-every", "4"]);
    a.push("--resume".into());
    ok(&Command::new(caev2()).args(&a).output().expect("spawn"));
    assert_same_losses(&losses(&single), &losses(&one), "2-rank run resumed on 1 rank");
}

/// Ranks started with different settings, or a batch the ranks cannot
/// split, are refused by every rank before any step.
#[test]
fn mismatched_settings_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    // the seed, and the steps at which ranks read losses back together
    for other in [&["--seed", "1"][..], &["--metrics-every", "3"][..]] {
        let (o0, o1) = two_ranks(&args(&out, 2, &[]), &args(&out, 2, other));
        for (rank, o) in [(0, &o0), (1, &o1)] {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "rank {rank} must refuse {other:?}");
            assert!(e.contains("the settings of rank(s) 1 differ from rank 0's"), "rank {rank}: {e}");
        }
        assert!(!out.join("metrics.jsonl").exists(), "no step was taken");
    }

    // NCCL asked for on CPU ranks: refused by both, naming why
    let nccl = args(&out, 2, &["--dist-backend", "nccl"]);
    let (o0, o1) = two_ranks(&nccl, &nccl);
    for o in [&o0, &o1] {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("--dist-backend nccl: NCCL not usable here: not on CUDA"), "{e}");
    }

    let mut a = args(&out, 2, &[]);
    let b = a.iter().position(|x| x == "--batch").expect("--batch") + 1;
    a[b] = "3".into();
    let (o0, o1) = two_ranks(&a, &a);
    for o in [&o0, &o1] {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("--batch 3: must be a multiple of the 2 ranks"), "{e}");
    }
}

/// Launcher variables that cannot work, an unreachable store and a port in
/// use: one-line errors that name the problem, within the timeout.
#[test]
fn bad_launches_fail_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    let mut base = args(&out, 1, &[]);
    let t = base.iter().position(|x| x == "--dist-timeout").expect("--dist-timeout") + 1;
    base[t] = "5".into();
    let with_env = |vars: &[(&str, &str)]| {
        let mut c = Command::new(caev2());
        c.args(&base);
        for (k, v) in vars {
            c.env(k, v);
        }
        let o = c.output().expect("spawn");
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        e
    };
    let e = with_env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")]);
    assert!(e.contains("RANK=2: must be below WORLD_SIZE=2"), "{e}");
    let e = with_env(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("MASTER_ADDR=: unset"), "{e}");
    let e = with_env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "two")]);
    assert!(e.contains("SLURM_NTASKS=two: expected a non-negative integer"), "{e}");
    // nobody serves the store: rank 1 gives up after --dist-timeout
    let port = free_port().to_string();
    let t = Instant::now();
    let e = with_env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)]);
    assert!(e.contains("rendezvous at 127.0.0.1:") && e.contains("failed"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(60), "gave up only after {:?}", t.elapsed());
    // the port is taken: rank 0 cannot serve the store
    let busy = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let e = with_env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)]);
    assert!(e.contains("rendezvous at 127.0.0.1:") && e.contains("check MASTER_ADDR/MASTER_PORT, that the port is free"), "{e}");
    assert!(!out.join("config.json").exists(), "nothing written");
}
