#!/usr/bin/env python3
"""Summarise scripts/reproduce.sh's OUT/log.jsonl into OUT/results.md and
OUT/results.json: per variant mean and spread over seeds of k-NN accuracy
(CLS and mean-pooled features), held-out alignment, final loss and time,
next to the random-init floor and the teacher; the fraction of the
floor-to-teacher gap closed; the linear probe of the best variant; and what
caching saved.

    summarize_repro.py OUT           # write the tables
    summarize_repro.py OUT --best    # print the variant with the best mean k-NN (mean of CLS and mean-pool)
"""
import json
import os
import statistics as st
import sys


def ms(xs):
    return (st.mean(xs), st.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(m, pct=True):
    mean, sd = m
    return f"{100*mean:.1f} ± {100*sd:.1f}" if pct else f"{mean:.4f} ± {sd:.4f}"


def knn_of(knn_json, feature):
    return next(r["knn"] for r in knn_json["rows"] if r["feature"] == feature)


def step_seconds(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    ips = [r["images_per_sec"] for r in rows[1:]]
    batch = json.load(open(os.path.join(run, "config.json")))["batch"]
    return st.mean(batch / x for x in ips)


def run_seconds(run):
    """Training time of a run from its metrics (sum of step times): unlike the
    log's train_seconds, it covers every invocation of a resumed run."""
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    batch = json.load(open(os.path.join(run, "config.json")))["batch"]
    return sum(batch / r["images_per_sec"] for r in rows)


def read_log(out):
    text, log, dec, i = open(os.path.join(out, "log.jsonl")).read(), [], json.JSONDecoder(), 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        log.append(obj)
    return log


def best_variant(log):
    runs = [e for e in log if e["what"] == "run"]
    score = {}
    for r in runs:
        score.setdefault(r["variant"], []).append((knn_of(r["knn"], "cls") + knn_of(r["knn"], "mean")) / 2)
    return max(score, key=lambda v: st.mean(score[v]))


def main(out):
    log = read_log(out)
    extract = next(e for e in log if e["what"] == "extract")
    runs = [e for e in log if e["what"] == "run"]
    floor = [e for e in log if e["what"] == "floor"]
    teacher = next(e for e in log if e["what"] == "teacher")
    cost = next((e for e in log if e["what"] == "cost"), None)
    res = {"extract": extract, "variants": {}}
    t_cls, t_mean = knn_of(teacher["knn"], "cls"), knn_of(teacher["knn"], "mean")
    f_cls = ms([knn_of(e["knn"], "cls") for e in floor])
    f_mean = ms([knn_of(e["knn"], "mean") for e in floor])
    lines = ["| variant | k-NN CLS (%) | k-NN mean-pool (%) | gap closed (CLS / mean) | align visible | align masked | final loss | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant in ["both", "lv_only", "lz_only", "mask50"]:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        kc = ms([knn_of(r["knn"], "cls") for r in rs])
        km = ms([knn_of(r["knn"], "mean") for r in rs])
        av = ms([r["align"]["align_visible"] for r in rs])
        az = ms([r["align"]["align_masked"] for r in rs])
        losses = []
        for r in rs:
            rows = [json.loads(l) for l in open(os.path.join(out, f"{variant}-s{r['seed']}", "metrics.jsonl"))]
            losses.append(st.mean(x["loss"] for x in rows[-5:]))
        lo = ms(losses)
        ts = ms([run_seconds(os.path.join(out, f"{variant}-s{r['seed']}")) for r in rs])
        gap_c = (kc[0] - f_cls[0]) / max(t_cls - f_cls[0], 1e-9)
        gap_m = (km[0] - f_mean[0]) / max(t_mean - f_mean[0], 1e-9)
        res["variants"][variant] = dict(knn_cls=kc, knn_mean=km, align_visible=av, align_masked=az, loss=lo, train_seconds=ts, gap_cls=gap_c, gap_mean=gap_m, seeds=len(rs))
        lines.append(f"| {variant} | {fmt(kc)} | {fmt(km)} | {100*gap_c:.0f}% / {100*gap_m:.0f}% | {fmt(av, False)} | {fmt(az, False)} | {fmt(lo, False)} | {ts[0]:.0f} |")
    lines.append(f"| random-init floor | {fmt(f_cls)} | {fmt(f_mean)} | 0% | | | | |")
    lines.append(f"| teacher (ceiling) | {100*t_cls:.1f} | {100*t_mean:.1f} | 100% | | | | |")
    res.update(floor_cls=f_cls, floor_mean=f_mean, teacher_cls=t_cls, teacher_mean=t_mean)
    lin = next((e for e in log if e["what"] == "linear"), None)
    if lin:
        rows = lin["result"]["rows"]
        lines += ["", f"Linear probe (BN without affine + linear, {lin['result']['folds']}-fold cross-validation), best variant by k-NN: {lin['variant']}",
                  "", "| encoder | CLS (%) | mean-pool (%) |", "|---|---:|---:|"]
        groups = {}
        for r in rows:
            kind = "checkpoint" if r["encoder"].startswith("checkpoint") else r["encoder"]
            groups.setdefault(kind, {}).setdefault(r["feature"], []).append(r["linear"])
        res["linear"] = {"variant": lin["variant"]}
        for kind, feats in groups.items():
            c, m = ms(feats["cls"]), ms(feats["mean"])
            label = f"{lin['variant']} ({len(feats['cls'])} seeds)" if kind == "checkpoint" else kind
            lines.append(f"| {label} | {fmt(c)} | {fmt(m)} |")
            res["linear"][label] = dict(cls=c, mean=m)
    if cost:
        cached, live = step_seconds(cost["cached"]), step_seconds(cost["live"])
        ratio = live / cached
        total_train = sum(run_seconds(os.path.join(out, f"{r['variant']}-s{r['seed']}")) for r in runs)
        res["cost"] = dict(step_cached=cached, step_live=live, ratio=ratio, train_seconds_all_runs=total_train,
                           live_estimate_seconds=total_train * ratio)
        lines += ["", f"Extraction once: {extract['seconds']:.0f} s, {extract['bytes']/1e6:.1f} MB on disk.",
                  f"Step time cached {cached:.3f} s vs live teacher {live:.3f} s = {ratio:.2f}x.",
                  f"All {len(runs)} runs: {total_train:.0f} s of training with the store; with the live teacher about "
                  f"{total_train*ratio:.0f} s; store + runs = {extract['seconds'] + total_train:.0f} s."]
    open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--best":
        print(best_variant(read_log(sys.argv[1])))
    else:
        main(sys.argv[1])
