#!/usr/bin/env python3
"""Summarise scripts/views_study.sh's OUT/log.jsonl (issue 20).

    summarize_views.py OUT               # OUT/results.md, OUT/results.json, OUT/views-study.png
    summarize_views.py --run-stats RUN   # one run's numbers from its metrics.jsonl, as JSON

Everything comes from the log, whose run lines carry their own statistics,
so the summary needs no run folder.
"""
import json
import math
import os
import statistics as st
import sys

# ImageNet-1K's training set and the paper's budget (REFERENCE.md)
IMAGENET_IMAGES = 1_281_167
PAPER_EPOCHS = 300
DEFAULT_K = 10
# bytes per stored view of a CLIP ViT-B/16 teacher (197 tokens x 512), as
# BENCHMARKS.md measures them: f16 (record header included) and pca v2
BYTES_PER_VIEW = {"f16": 202_075, "pca": 19_183}


def run_stats(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    batch = json.load(open(os.path.join(run, "config.json")))["batch"]
    secs = [batch / r["images_per_sec"] for r in rows if r["images_per_sec"] > 0]
    last = rows[-min(100, len(rows)):]
    return {
        "steps": rows[-1]["step"],
        "final_loss": st.mean(r["loss"] for r in last),
        "final_loss_v": st.mean(r["loss_v"] for r in last),
        "final_loss_z": st.mean(r["loss_z"] for r in last),
        # median over the metrics windows (robust to other work on the machine)
        "median_step_seconds": st.median(secs),
        "train_seconds": sum(secs),
    }


def read_log(out):
    text, log, dec, i = open(os.path.join(out, "log.jsonl")).read(), [], json.JSONDecoder(), 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        log.append(obj)
    return log


def ms(xs):
    xs = list(xs)
    return (st.mean(xs), st.stdev(xs) if len(xs) > 1 else 0.0)


def score(result, feature, key):
    return next(r[key] for r in result["rows"] if r["feature"] == feature)


def main(out):
    log = read_log(out)
    settings = next(e for e in log if e["what"] == "settings")
    epochs = settings["epochs"]
    runs = [e for e in log if e["what"] == "run"]
    floors = [e for e in log if e["what"] == "floor"]
    teacher = next((e for e in log if e["what"] == "teacher"), None)
    lin_floor = next((e for e in log if e["what"] == "linear-floor"), None)
    costs = {e["mode"]: e for e in log if e["what"] == "cost"}
    extract = next(e for e in log if e["what"] == "extract")
    if not floors or teacher is None:
        sys.exit("the floors and the teacher are not measured yet: let scripts/views_study.sh finish")
    floor = {f: ms(score(e["knn"], f, "knn") for e in floors) for f in ("cls", "mean")}
    ceil = {f: score(teacher["knn"], f, "knn") for f in ("cls", "mean")}

    def gap(acc, f):
        return (acc - floor[f][0]) / (ceil[f] - floor[f][0])

    order = ["k1", "k2", "k4", "k9", "fresh"]
    modes = {}
    for mode in order:
        rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])
        if not rs:
            continue
        k = None if mode == "fresh" else int(mode[1:])
        m = {"K": k, "seeds": [r["seed"] for r in rs], "repeats": (epochs / k) if k else 0.0}
        for f in ("cls", "mean"):
            accs = [score(r["knn"], f, "knn") for r in rs]
            m[f"knn_{f}"] = ms(accs)
            m[f"gap_{f}"] = ms(gap(a, f) for a in accs)
            m[f"gap_{f}_seeds"] = [gap(a, f) for a in accs]
        m["align_visible"] = ms(r["align"]["align_visible"] for r in rs)
        m["align_masked"] = ms(r["align"]["align_masked"] for r in rs)
        m["final_loss"] = ms(r["stats"]["final_loss"] for r in rs)
        m["median_step_seconds"] = ms(r["stats"]["median_step_seconds"] for r in rs)
        lins = [r["linear"] for r in rs if r.get("linear")]
        if lins:
            m["linear_cls"] = ms(score(x, "cls", "linear") for x in lins)
            m["linear_mean"] = ms(score(x, "mean", "linear") for x in lins)
        modes[mode] = m

    pct = lambda m: f"{100*m[0]:.1f} ± {100*m[1]:.1f}"
    gp = lambda m: f"{100*m[0]:.0f} ± {100*m[1]:.0f} %"
    f4 = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"
    lines = [
        f"| views | epochs per stored view | seeds | k-NN CLS (%) | k-NN mean-pool (%) | gap closed CLS | gap closed mean | "
        "align visible (view 9) | align masked (view 9) | final loss | step s (2 runs share 2 cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, m in modes.items():
        name = "fresh (K = ∞, live teacher)" if mode == "fresh" else f"K = {m['K']} stored"
        rep = "1 (new each epoch)" if mode == "fresh" else f"{m['repeats']:.1f}"
        lines.append(
            f"| {name} | {rep} | {len(m['seeds'])} | {pct(m['knn_cls'])} | {pct(m['knn_mean'])} | {gp(m['gap_cls'])} | "
            f"{gp(m['gap_mean'])} | {f4(m['align_visible'])} | {f4(m['align_masked'])} | {f4(m['final_loss'])} | "
            f"{m['median_step_seconds'][0]:.3f} |"
        )
    lines.append(f"| random-init floor | | {len(floors)} | {pct(floor['cls'])} | {pct(floor['mean'])} | 0 % | 0 % | | | | |")
    lines.append(f"| teacher (ceiling) | | | {100*ceil['cls']:.1f} | {100*ceil['mean']:.1f} | 100 % | 100 % | | | | |")

    res = {"settings": settings, "extract": extract, "floor": floor, "teacher": ceil, "modes": modes}
    probe = [(mode, m) for mode, m in modes.items() if "linear_cls" in m]
    if probe:
        lines += ["", "Linear probe (BN without affine + linear, 5-fold cross-validation):", "",
                  "| encoder | seeds | CLS (%) | mean-pool (%) |", "|---|---:|---:|---:|"]
        for mode, m in probe:
            name = "fresh views" if mode == "fresh" else f"K = {m['K']} stored views"
            lines.append(f"| {name} | {len(m['seeds'])} | {pct(m['linear_cls'])} | {pct(m['linear_mean'])} |")
        if lin_floor:
            for r in lin_floor["result"]["rows"]:
                if r["feature"] == "cls":
                    enc = r["encoder"]
                    mean = next(x["linear"] for x in lin_floor["result"]["rows"] if x["encoder"] == enc and x["feature"] == "mean")
                    lines.append(f"| {enc} | 1 | {100*r['linear']:.1f} | {100*mean:.1f} |")
                    res.setdefault("linear_floor", {})[enc] = {"cls": r["linear"], "mean": mean}

    if costs:
        lines += ["", "Step time, one run at a time, the same 1 thread each (median of the metrics windows):", ""]
        for mode, c in costs.items():
            lines.append(f"- {mode}: {c['stats']['median_step_seconds']:.3f} s per step of {settings['batch']}")
        if "k9" in costs and "fresh" in costs:
            ratio = costs["fresh"]["stats"]["median_step_seconds"] / costs["k9"]["stats"]["median_step_seconds"]
            lines.append(f"- fresh / cached = {ratio:.2f}x (EfficientNet-Lite0, ~0.4 GFLOP a 224-px view, is a cheap teacher)")
            res["step_ratio_fresh_over_cached"] = ratio

    # what a user picks K from: ImageNet-1K at the paper's 300 epochs, each K
    # matched to the cached run here with the same epochs per stored view
    lines += ["", "Choosing K for ImageNet-1K at 300 epochs (CLIP ViT-B/16 targets, 197 x 512): each K is matched to the run above "
              "with the same number of epochs per stored view (300 / K here = epochs / K there).", "",
              "| K | epochs per view at 300 | matched run here | gap closed here (CLS / mean) | fresh-view gap reached | "
              "teacher passes | store f16 | store pca |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    fresh = modes.get("fresh")
    choose = []
    for k_in in [2, 5, 10, 20, 34, 45, 100]:
        reps = PAPER_EPOCHS / k_in
        match = min((m for m in modes.values() if m["K"]), key=lambda m: abs(math.log(m["repeats"] / reps)), default=None)
        exact = match is not None and abs(match["repeats"] - reps) / reps < 0.15
        views = IMAGENET_IMAGES * k_in
        row = {"K": k_in, "repeats": reps, "teacher_passes": views,
               "store_f16_tb": views * BYTES_PER_VIEW["f16"] / 1e12, "store_pca_tb": views * BYTES_PER_VIEW["pca"] / 1e12}
        here, reached = "(none within 15 %)", ""
        if exact:
            here = f"K = {match['K']} ({match['repeats']:.1f} epochs per view)"
            row.update(gap_cls=match["gap_cls"][0], gap_mean=match["gap_mean"][0])
            if fresh:
                reached = f"{100*match['gap_cls'][0]/fresh['gap_cls'][0]:.0f} % / {100*match['gap_mean'][0]/fresh['gap_mean'][0]:.0f} %"
                row.update(fraction_of_fresh_cls=match["gap_cls"][0] / fresh["gap_cls"][0],
                           fraction_of_fresh_mean=match["gap_mean"][0] / fresh["gap_mean"][0])
        choose.append(row)
        gaps = f"{100*row['gap_cls']:.0f} % / {100*row['gap_mean']:.0f} %" if exact else ""
        lines.append(f"| {k_in} | {reps:.1f} | {here} | {gaps} | {reached} | {views/1e6:.1f} M | "
                     f"{row['store_f16_tb']:.2f} TB | {row['store_pca_tb']:.3f} TB |")
    res["choose_k"] = choose
    plot(out, modes, epochs)
    open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=2)
    print("\n".join(lines))


def plot(out, modes, epochs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cached = [m for m in modes.values() if m["K"]]
    cached.sort(key=lambda m: m["repeats"])
    fresh = modes.get("fresh")
    for ax, f, title in zip(axes, ("cls", "mean"), ("k-NN on CLS", "k-NN on mean-pooled tokens")):
        xs = [m["repeats"] for m in cached]
        ax.errorbar(xs, [100 * m[f"gap_{f}"][0] for m in cached], yerr=[100 * m[f"gap_{f}"][1] for m in cached],
                    marker="o", capsize=3, color="tab:blue", label="K stored views (mean ± sd)")
        for m in cached:
            ax.scatter([m["repeats"]] * len(m[f"gap_{f}_seeds"]), [100 * g for g in m[f"gap_{f}_seeds"]], s=10, color="tab:blue", alpha=0.4)
            ax.annotate(f"K={m['K']}", (m["repeats"], 100 * m[f"gap_{f}"][0]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        if fresh:
            g, sd = 100 * fresh[f"gap_{f}"][0], 100 * fresh[f"gap_{f}"][1]
            ax.axhline(g, color="tab:green", label="fresh view every epoch (K = ∞)")
            ax.axhspan(g - sd, g + sd, color="tab:green", alpha=0.15)
        reps = PAPER_EPOCHS / DEFAULT_K
        ax.axvline(reps, color="tab:red", linestyle="--", label=f"ImageNet, {PAPER_EPOCHS} epochs, K = {DEFAULT_K} ({reps:.0f} per view)")
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 30, 60])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"epochs per stored view (epochs / K; {epochs} epochs here)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap closed, random init -> teacher (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("What K stored views cost: ViT-Tiny, 1,000 ImageNet photos, EfficientNet-Lite0 targets")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "views-study.png"), dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-stats":
        print(json.dumps(run_stats(sys.argv[2])))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
