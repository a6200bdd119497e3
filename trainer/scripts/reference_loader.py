#!/usr/bin/env python3
"""The Python data loader a user would otherwise write for cached targets:
PIL decode, torchvision-style transforms on PIL images, targets from a numpy
memmap. Used by caev2's training benchmark as the loader baseline.

usage: reference_loader.py SPEC.json TARGETS.f16
SPEC = {"tokens": T, "dim": D, "size": 224, "samples": [{"image": path,
        "order": "cbs", "brightness": f, "contrast": f, "saturation": f,
        "flip": b, "top": i, "left": j, "height": h, "width": w}, ...]}
TARGETS.f16 holds the samples' targets back to back (float16).
Prints {"samples": n, "seconds": s, "samples_per_second": r} for one thread.
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "target-extractor", "scripts"))
from reference_pipeline import load, render, to_input  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main(spec_path, targets_path):
    spec = json.load(open(spec_path))
    t, d = spec["tokens"], spec["dim"]
    mm = np.memmap(targets_path, dtype=np.float16, mode="r").reshape(-1, t, d)
    t0 = time.perf_counter()
    for i, s in enumerate(spec["samples"]):
        x = to_input(render(load(s["image"]), s, spec["size"]), MEAN, STD)
        y = np.asarray(mm[i], dtype=np.float32)
        assert x.shape == (3, spec["size"], spec["size"]) and y.shape == (t, d)
    dt = time.perf_counter() - t0
    n = len(spec["samples"])
    print(json.dumps({"samples": n, "seconds": dt, "samples_per_second": n / dt}))


if __name__ == "__main__":
    main(*sys.argv[1:])
