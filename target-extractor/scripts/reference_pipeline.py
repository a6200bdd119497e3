#!/usr/bin/env python3
"""The Python reference pipeline a user would otherwise write: PIL decode,
torchvision-style transforms on PIL images, onnxruntime.

Two uses:

  bench   time the whole pipeline on a folder, as caev2's extract benchmark's
          baseline (same model, views, batch and thread count):
          reference_pipeline.py bench --data DIR --model M.onnx --views K
              --batch B --threads T [--size S] [--out targets.f16]
  views   compute the teacher targets of given views, as an independent check
          of a caev2 store: reference_pipeline.py views SPEC.json OUT.f32
          SPEC = {"model": path, "size": S, "mean": [..], "std": [..],
                  "views": [{"image": path, "order": "cbs", "brightness": f,
                  "contrast": f, "saturation": f, "flip": b, "top": i,
                  "left": j, "height": h, "width": w}, ...]}
          Writes the tokens of every view as float32, in order.

The transforms are what torchvision does on PIL images: ColorJitter's
adjust_* call ImageEnhance (in a random order), hflip is
transpose(FLIP_LEFT_RIGHT), RandomResizedCrop.get_params then crop + resize
BICUBIC, ToTensor + Normalize. (torchvision itself needs torch, which the
project does not install; these are the same PIL calls.)
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageEnhance, ImageOps

OPS = {"b": ImageEnhance.Brightness, "c": ImageEnhance.Contrast, "s": ImageEnhance.Color}
NAMES = {"b": "brightness", "c": "contrast", "s": "saturation"}
EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load(path):
    img = Image.open(path)
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def render(img, v, size):
    for code in v["order"]:
        img = OPS[code](img).enhance(v[NAMES[code]])
    if v["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.crop((v["left"], v["top"], v["left"] + v["width"], v["top"] + v["height"]))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def to_input(img, mean, std):
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return x.transpose(2, 0, 1)


def sample_view(rng, w, h):
    """torchvision ColorJitter(0.4,0.4,0.4) + flip(0.5) + RandomResizedCrop(0.4-1, 3/4-4/3) parameters."""
    v = {NAMES[c]: rng.uniform(0.6, 1.4) for c in "bcs"}
    order = list("bcs")
    rng.shuffle(order)
    v["order"] = "".join(order)
    v["flip"] = rng.random() < 0.5
    area = w * h
    for _ in range(10):
        ta = area * rng.uniform(0.4, 1.0)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            v.update(top=rng.randint(0, h - ch), left=rng.randint(0, w - cw), height=ch, width=cw)
            return v
    v.update(top=0, left=0, height=h, width=w)
    return v


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def meta(sess, key, default=None):
    return sess.get_modelmeta().custom_metadata_map.get("caev2." + key, default)


def cmd_bench(a):
    sess = session(a.model, a.threads)
    size = a.size or int(meta(sess, "default_input_size"))
    mean = [float(x) for x in meta(sess, "mean").split(",")]
    std = [float(x) for x in meta(sess, "std").split(",")]
    iname = sess.get_inputs()[0].name
    files = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(a.data) for f in fs if os.path.splitext(f)[1].lower() in EXTS
    )
    rng = random.Random(a.seed)
    out = open(a.out, "wb") if a.out else None
    batch, n, t0 = [], 0, time.perf_counter()

    def flush():
        if a.no_inference:  # decode + transforms only
            np.stack(batch)
            batch.clear()
            return
        y = sess.run(None, {iname: np.stack(batch)})[0]
        if out:
            out.write(y.astype(np.float16).tobytes())
        batch.clear()

    for path in files:
        try:
            img = load(path)
        except Exception as e:  # noqa: BLE001 - skip undecodable files like caev2 does
            print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        for _ in range(a.views):
            v = sample_view(rng, img.width, img.height)
            batch.append(to_input(render(img, v, size), mean, std))
            n += 1
            if len(batch) == a.batch:
                flush()
    if batch:
        flush()
    dt = time.perf_counter() - t0
    print(json.dumps({"views": n, "seconds": dt, "views_per_second": n / dt}))


def cmd_views(a):
    spec = json.load(open(a.spec))
    sess = session(spec["model"], int(spec.get("threads", 1)))
    iname = sess.get_inputs()[0].name
    cache = {}
    with open(a.out, "wb") as out:
        for v in spec["views"]:
            if v["image"] not in cache:
                cache = {v["image"]: load(v["image"])}
            x = to_input(render(cache[v["image"]], v, spec["size"]), spec["mean"], spec["std"])
            y = sess.run(None, {iname: x[None]})[0][0]
            out.write(y.astype(np.float32).tobytes())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--data", required=True)
    b.add_argument("--model", required=True)
    b.add_argument("--views", type=int, default=10)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--size", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out")
    b.add_argument("--no-inference", action="store_true", help="time decode + transforms only")
    v = sub.add_parser("views")
    v.add_argument("spec")
    v.add_argument("out")
    a = p.parse_args()
    cmd_bench(a) if a.cmd == "bench" else cmd_views(a)


if __name__ == "__main__":
    main()
