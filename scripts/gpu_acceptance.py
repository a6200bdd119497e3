#!/usr/bin/env python3
"""caev2's GPU acceptance run (issue 23): what caev2 claims for GPUs, in one
run of at most 9 minutes, on a GPU node that has torch (for libtorch and
torchrun) and no Rust toolchain. Called by scripts/gpu-acceptance.sh.

  prepare [--gpu-dir .gpu] [--images DIR] [--image-mb 38] [--binary PATH]
      here, where the project builds: the stripped binary and ONNX Runtime
      (xz), ImageNet photos (at most --image-mb MB, spread over the classes;
      default the 1,000 sample photos of ../shared when present, else
      setup's imagenet-mini) and a CLIP-B/16-shaped teacher whose weights
      are computed in the graph (a few kB) into --gpu-dir, under the 64 MiB
      a lent machine's run brings with it.
  run OUT [--gpu-dir .gpu] [--dry-run] [--budget 510]
      there: the steps below, each bounded by what is left of --budget
      seconds; prints one table and writes OUT/results.json. With --dry-run
      (or CAEV2_GPU_DRY_RUN=1) every step runs on the CPU at toy size, so
      the script's own mistakes show here and not in GPU minutes.

Steps: the loader alone on all cores; ViT-T/S/B training in bf16 (images/s,
model TFLOP/s, MFU, which side bounds it) and ViT-B in fp32; data-parallel
launched by torchrun (world size 1 over NCCL, and 2 ranks sharing the GPU
over Gloo) against the single process, loss for loss; and, only where ONNX
Runtime has its CUDA provider, the teacher on the GPU against the CPU and
the live CLIP-B/16-sized teacher against the cached store for ViT-T and
ViT-B.
"""
import argparse
import glob
import json
import lzma
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORT_LIB = "libonnxruntime.so.1.31.1"
CARRY_LIMIT = 64 * 2**20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prepare


def prepare(a):
    gpu = Path(a.gpu_dir)
    shutil.rmtree(gpu, ignore_errors=True)
    (gpu / "data").mkdir(parents=True)
    binary = Path(a.binary) if a.binary else None
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "-p", "tools", "--bin", "caev2"], cwd=ROOT, check=True)
        binary = ROOT / "target/release/caev2"
    stripped = gpu / "caev2.stripped"
    subprocess.run(["strip", "-o", str(stripped), str(binary)], check=True)
    for src, dst in [(stripped, gpu / "caev2.xz"), (ROOT / ".deps/onnxruntime" / ORT_LIB, gpu / (ORT_LIB + ".xz"))]:
        with open(src, "rb") as f, lzma.open(dst, "wb", preset=a.xz_preset) as g:
            shutil.copyfileobj(f, g, 1 << 20)
    stripped.unlink()
    images = Path(a.images) if a.images else None
    if images is None:
        sample = ROOT.parent / "shared/data/imagenet-sample/images"
        images = sample if sample.is_dir() else ROOT / ".deps/data/imagenet-mini"
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    # round robin over the classes, so the subset keeps all of them
    by_class = {}
    for f in files:
        by_class.setdefault(f.parent.relative_to(images), []).append(f)
    order = [f for group in zip_longest_lists(list(by_class.values())) for f in group]
    budget, used, taken = a.image_mb * 1e6, 0, 0
    for f in order:
        n = f.stat().st_size
        if used + n > budget:
            continue
        d = gpu / "data" / f.parent.relative_to(images)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.name)
        used, taken = used + n, taken + 1
    py = ROOT / ".deps/py/bin/python"
    subprocess.run([str(py), str(ROOT / "tests/fixtures/make_tiny_vit.py"), "--clip-b16", "--synthetic", str(gpu / "clip-b16-synthetic.onnx")],
                   check=True, stdout=subprocess.DEVNULL)
    total = sum(p.stat().st_size for p in gpu.rglob("*") if p.is_file())
    tracked = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split() if (ROOT / f).is_file())
    print(f"prepared {gpu}: {total / 2**20:.1f} MiB ({taken} photos, {used / 1e6:.1f} MB, from {images}); "
          f"with the tracked files {(total + tracked) / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB a run carries")
    if total + tracked > CARRY_LIMIT:
        sys.exit(f"error: {gpu} is too large to carry: lower --image-mb")


def zip_longest_lists(groups):
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]."""
    out, i = [], 0
    while True:
        row = [g[i] for g in groups if i < len(g)]
        if not row:
            return out
        out.append(row)
        i += 1


# ---------------------------------------------------------------- run


class Runner:
    def __init__(self, a):
        self.dry = a.dry_run or os.environ.get("CAEV2_GPU_DRY_RUN") == "1"
        self.deadline = time.monotonic() + a.budget
        self.gpu = Path(a.gpu_dir).resolve()
        self.out = Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.w = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="caev2-acceptance-"))
        shutil.rmtree(self.w, ignore_errors=True)
        (self.w / "bin").mkdir(parents=True)
        self.cores = os.cpu_count() or 1
        self.device = "cpu" if self.dry else "cuda"
        self.steps = []
        self.env = dict(os.environ)
        self.unpack()

    def unpack(self):
        for name in ["caev2", ORT_LIB]:
            with lzma.open(self.gpu / (name + ".xz")) as f, open(self.w / "bin" / name, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
        (self.w / "bin/caev2").chmod(0o755)
        self.bin = str(self.w / "bin/caev2")
        self.env["ORT_DYLIB_PATH"] = str(self.w / "bin" / ORT_LIB)
        torch_lib = os.environ.get("TORCH_LIB") or python_out("import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
        if torch_lib:
            self.env["LD_LIBRARY_PATH"] = torch_lib + ":" + self.env.get("LD_LIBRARY_PATH", "")
        self.torch_lib = torch_lib

    def left(self):
        return self.deadline - time.monotonic()

    def caev2(self, args, timeout, env=None):
        """Run caev2; (returncode, stdout, stderr), rc 124 on timeout."""
        t = min(timeout, self.left())
        if t < 5:
            return 124, "", "skipped: the run's time budget is spent"
        try:
            p = subprocess.run([self.bin] + args, capture_output=True, text=True, timeout=t, env=env or self.env)
            return p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            return 124, e.stdout or "", f"timed out after {t:.0f} s"

    def step(self, name, fn):
        """Run one step; a failure is recorded and the run goes on."""
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            result = fn()
            rec = {"step": name, "status": "ok", **(result or {})}
        except StepSkipped as e:
            rec = {"step": name, "status": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure goes into the table
            rec = {"step": name, "status": "failed", "why": str(e).strip().splitlines()[-1][:300] if str(e).strip() else repr(e)}
        rec["seconds"] = round(time.monotonic() - t0, 1)
        log(f"   {rec['status']} in {rec['seconds']} s: {short(rec)}")
        self.steps.append(rec)
        return rec

    def ok(self, args, timeout, env=None):
        rc, out, err = self.caev2(args, timeout, env)
        if rc != 0:
            raise RuntimeError(f"caev2 {args[0]} rc={rc}: {last_line(err)}")
        return out


class StepSkipped(Exception):
    pass


def python_out(code):
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def last_line(s):
    lines = [l for l in s.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def short(rec):
    return ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("step", "status", "seconds"))[:240]


def metrics(run_dir, skip_frac=0.25):
    rows = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    return rows, rows[int(len(rows) * skip_frac):] or rows


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(a):
    r = Runner(a)
    dry, w, dev = r.dry, r.w, r.device
    machine = {"date": time.strftime("%Y-%m-%d"), "cores": r.cores, "dry_run": dry}
    smi = shutil.which("nvidia-smi")
    if smi and not dry:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        machine["gpu"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else f"nvidia-smi failed: {q.stderr.strip()}"
    else:
        machine["gpu"] = "none (dry run on the CPU)" if dry else "no nvidia-smi"
    machine["torch"] = python_out("import torch; print(torch.__version__, torch.version.cuda)") or "not importable by python3"
    machine["torch_lib"] = r.torch_lib or "(LD_LIBRARY_PATH as given)"
    log(f"caev2 GPU acceptance {'DRY RUN on the CPU' if dry else 'on ' + machine['gpu']}; work folder {w}")

    # toy sizes for the dry run
    student = 112 if dry else 224
    big_batch, steps, every = (2, 2, 1) if dry else (256, 60, 10)
    data = r.gpu / "data"
    store = w / "store"
    tiny_teacher = str(ROOT / "tests/fixtures/tiny_vit.onnx")

    def extract_store():
        out = r.ok(["extract", "--teacher", tiny_teacher, "--data", str(data), "--out", str(store), "--views", "2", "--student-size", str(student),
                    "--embed-images", "--device", "cpu", "--threads", str(r.cores), "--decode-threads", str(r.cores), "--no-progress", "--json"], 180)
        j = json.loads(out)
        return {"images": j["images"], "views": j["views_stored"], "views_per_s": round(j["views_per_second"], 1)}

    if r.step("extract the store (tiny teacher, CPU)", extract_store)["status"] != "ok":
        return finish(r, machine)

    loader = {}

    def loader_alone():
        out = r.ok(["train", "--shards", str(store), "--out", str(w / "loader"), "--batch", str(big_batch), "--steps", str(steps // 2 + 1),
                    "--loader-only", "--threads", str(r.cores), "--json"], 120)
        loader["ips"] = json.loads(out)["images_per_second"]
        return {"images_per_s": round(loader["ips"], 1), "threads": r.cores}

    r.step("loader alone, all cores", loader_alone)

    def train(model, fp32=False, batch=None, n=steps, extra=()):
        run_dir = w / f"run-{model}{'-fp32' if fp32 else ''}"
        args = ["train", "--shards", str(store), "--out", str(run_dir), "--model", model, "--batch", str(batch or big_batch), "--steps", str(n),
                "--lr", "5e-4", "--warmup-steps", "2", "--device", dev, "--threads", str(r.cores), "--metrics-every", str(every), "--no-progress"]
        r.ok(args + (["--fp32"] if fp32 else []) + list(extra), 150)
        _, rows = metrics(run_dir)
        ips = median(x["images_per_sec"] for x in rows)
        res = {"images_per_s": round(ips, 1), "model_tflops": round(median(x.get("tflops") for x in rows) or 0, 2)}
        mfu = median(x.get("mfu") for x in rows)
        res["mfu_pct"] = round(100 * mfu, 1) if mfu is not None else None
        if loader.get("ips"):
            res["bound"] = "loader" if ips >= 0.9 * loader["ips"] else "device"
        return res

    for model in ["tiny", "small", "base"]:
        r.step(f"ViT-{model[0].upper()} {'bf16' if not dry else 'CPU'} training", lambda m=model: train(m, batch=(128 if m == "base" and not dry else None)))
    r.step("ViT-B fp32 training", lambda: train("base", fp32=True, batch=(128 if not dry else None), n=max(2, steps // 2)))

    # data-parallel: the single process against torchrun-launched groups
    dp_batch, dp_steps = (2, 2) if dry else (32, 20)

    def dp_args(name):
        return ["train", "--shards", str(store), "--out", str(w / name), "--model", "tiny", "--batch", str(dp_batch), "--steps", str(dp_steps),
                "--lr", "5e-4", "--warmup-steps", "2", "--device", dev, "--fp32", "--threads", str(max(1, r.cores // 2)), "--no-progress",
                "--metrics-every", "1", "--dist-timeout", "120"]

    def single():
        r.ok(dp_args("dp-single"), 120)
        rows, _ = metrics(w / "dp-single", 0)
        return {"steps": len(rows), "loss_first": round(rows[0]["loss"], 5), "loss_last": round(rows[-1]["loss"], 5)}

    have_torchrun = bool(python_out("import torch.distributed.run; print('yes')"))

    def group(name, nproc, backend):
        if have_torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--no-python",
                   r.bin] + dp_args(name) + ["--dist-backend", backend]
            t = min(180, r.left())
            if t < 5:
                raise StepSkipped("the run's time budget is spent")
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=t, env=r.env)
            rc, out, err = p.returncode, p.stdout, p.stderr
            launcher = "torchrun"
        else:
            # no torch here (a dry run, or a node set up by scripts/setup.sh): set what torchrun sets, and say so
            port, procs = free_port(), []
            for rank in range(nproc):
                env = dict(r.env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                procs.append(subprocess.Popen([r.bin] + dp_args(name) + ["--dist-backend", backend], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
            outs = [p.communicate(timeout=180) for p in procs]
            rc = max(p.returncode for p in procs)
            out, err = "".join(o for o, _ in outs), "".join(e for _, e in outs)
            launcher = "torchrun's variables (python3 has no torchrun here)"
        if rc != 0:
            raise RuntimeError(f"{launcher} rc={rc}: {last_line(err)}")
        ref, _ = metrics(w / "dp-single", 0)
        got, _ = metrics(w / name, 0)
        if len(got) != len(ref):
            raise RuntimeError(f"{len(got)} steps logged, the single process {len(ref)}")
        rel = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(got, ref))
        said = [l for l in (out + err).splitlines() if "data-parallel" in l]
        return {"launcher": launcher, "max_rel_loss_diff": float(f"{rel:.2e}"), "backend_line": said[0].strip()[:160] if said else None,
                "images_per_s": round(median(x["images_per_sec"] for x in got[1:]) or 0, 1)}

    if r.step("single process, fp32 (reference for data-parallel)", single)["status"] == "ok":
        r.step(f"world size 1 over {'Gloo (dry run)' if dry else 'NCCL'}", lambda: group("dp-world1", 1, "gloo" if dry else "nccl"))
        r.step("2 ranks sharing the device over Gloo", lambda: group("dp-pair", 2, "auto"))

    # the teacher on the GPU: only with ONNX Runtime's CUDA provider
    # onnxruntime-gpu: named, or the one setup installs on a GPU node (.deps/env.sh
    # points ORT_DYLIB_PATH at it, its CUDA provider beside it), or python3's
    given = os.environ.get("ORT_DYLIB_PATH", "")
    setup_gpu = given if given and (Path(given).resolve().parent / "libonnxruntime_providers_cuda.so").exists() else ""
    ort_gpu = os.environ.get("ORT_GPU_LIB") or setup_gpu or python_out(
        "import glob, os, onnxruntime as o\n"
        "if 'CUDAExecutionProvider' in o.get_available_providers():\n"
        "    print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), 'capi', 'libonnxruntime.so*')))[-1])")
    if not ort_gpu and not dry:
        def no_cuda_provider():
            raise StepSkipped("ONNX Runtime here has no CUDA provider (set ORT_GPU_LIB to an onnxruntime-gpu library)")

        for name in ["teacher on the GPU vs the CPU", "live CLIP-B/16-sized teacher (on the GPU) vs the cached store"]:
            r.step(name, no_cuda_provider)
        return finish(r, machine)
    tenv = dict(r.env, ORT_DYLIB_PATH=ort_gpu) if ort_gpu else r.env
    tdev = "cpu" if dry else "cuda"

    def teacher_devices():
        res = {}
        for d in ["cpu", tdev]:
            out = r.ok(["extract", "--teacher", tiny_teacher, "--data", str(data), "--out", str(w / f"x-{d}-{len(res)}"), "--views", "2",
                        "--student-size", str(student), "--device", d, "--threads", str(r.cores), "--no-progress", "--json"], 180, tenv)
            res[f"views_per_s_{d}_{len(res)}"] = round(json.loads(out)["views_per_second"], 1)
        c = json.loads(r.ok(["inspect", "compare", str(w / "x-cpu-0"), str(w / f"x-{tdev}-1"), "--json"], 120, tenv))
        res["mean_cosine"], res["min_cosine"] = round(c["mean_cosine"], 6), round(c["min_cosine"], 6)
        return res

    r.step("teacher on the GPU vs the CPU" if not dry else "teacher on the CPU twice (dry run)", teacher_devices)

    def live_vs_cached():
        b16 = str(r.gpu / "clip-b16-synthetic.onnx")
        res = {}
        if dry:
            # prove the CLIP-B/16-shaped model loads and runs, on 4 images; the toy teacher plays its part below
            few = w / "few"
            for f in sorted(data.rglob("*.*"))[:2]:
                few.mkdir(exist_ok=True)
                shutil.copy(f, few / f.name)
            r.ok(["extract", "--teacher", b16, "--data", str(few), "--out", str(w / "b16-check"), "--views", "1", "--device", "cpu",
                  "--threads", str(r.cores), "--no-progress"], 180, tenv)
            teacher, tstore = tiny_teacher, store
        else:
            teacher, tstore = b16, w / "store-b16"
            r.ok(["extract", "--teacher", b16, "--data", str(data), "--out", str(tstore), "--views", "2", "--embed-images", "--device", tdev,
                  "--threads", str(r.cores), "--no-progress"], 240, tenv)
        n = 2 if dry else 30
        for model in ["tiny", "base"]:
            for mode in ["cached", "live"]:
                run_dir = w / f"tv-{model}-{mode}"
                args = ["train", "--shards", str(tstore), "--out", str(run_dir), "--model", model, "--batch", str(2 if dry else 128), "--steps", str(n),
                        "--lr", "5e-4", "--warmup-steps", "2", "--device", dev, "--threads", str(r.cores), "--metrics-every", str(every), "--no-progress"]
                live = ["--live-teacher", teacher] + ([] if dry else ["--live-teacher-gpu"])
                r.ok(args + (live if mode == "live" else []), 200, tenv)
                _, rows = metrics(run_dir)
                res[f"{model}_{mode}_images_per_s"] = round(median(x["images_per_sec"] for x in rows), 1)
            res[f"{model}_cached_over_live"] = round(res[f"{model}_cached_images_per_s"] / max(res[f"{model}_live_images_per_s"], 1e-9), 2)
        return res

    r.step("live CLIP-B/16-sized teacher (on the GPU) vs the cached store" if not dry else "live vs cached teacher (dry run: toy teacher, CPU)", live_vs_cached)
    return finish(r, machine)


def finish(r, machine):
    res = {"machine": machine, "steps": r.steps}
    (r.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"caev2 GPU acceptance: {machine['gpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['date']}"
          f"{' (DRY RUN: CPU, toy sizes; no number here says anything about a GPU)' if machine['dry_run'] else ''}")
    print("| step | status | s | result |")
    print("|---|---|---:|---|")
    for s in r.steps:
        print(f"| {s['step']} | {s['status']} | {s['seconds']} | {short(s) or '-'} |")
    failed = [s for s in r.steps if s["status"] == "failed"]
    print(f"{len(r.steps)} steps: {len(r.steps) - len(failed)} ok or skipped, {len(failed)} failed; {r.out / 'results.json'}")
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--gpu-dir", default=str(ROOT / ".gpu"))
    pp.add_argument("--images")
    pp.add_argument("--image-mb", type=float, default=38.0)
    pp.add_argument("--binary")
    pp.add_argument("--xz-preset", type=int, default=6)
    pr = sub.add_parser("run")
    pr.add_argument("out")
    pr.add_argument("--gpu-dir", default=str(ROOT / ".gpu"))
    pr.add_argument("--work")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--budget", type=float, default=510.0)
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
