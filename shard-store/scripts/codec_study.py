#!/usr/bin/env python3
"""Groundwork for issue 12 (target codecs): how small can a store's targets
get at a given token cosine? Reads an f32 (or f16) store directly from its
shard files (FORMAT.md), fits a PCA on the first half of the views (unit
tokens, as the losses normalise them) and reports, on the second half:

* the Gaussian rate-distortion bound of the PCA spectrum at a relative MSE of
  1 % (token cosine ~0.995), and
* a practical transform coder: PCA, one uniform quantiser step for every
  component, the indices component-major as int8, zstd level 19, plus an f16
  norm per token.

* product quantisation of the unit tokens (`--pq`): subvectors of 4 and 2
  values, 256 k-means centroids each (one byte per subvector), fitted on
  up to 20,000 tokens of the first half.

usage: .deps/py/bin/python shard-store/scripts/codec_study.py STORE [STEP ...]
       .deps/py/bin/python shard-store/scripts/codec_study.py STORE --pq
(numpy and zstandard come with scripts/setup.sh's venv)
"""
import glob
import struct
import sys

import numpy as np


def load(store):
    out = []
    for f in sorted(glob.glob(store + "/shards/shard-*.bin")):
        b = open(f, "rb").read()
        codec, _, _, _, _, t, d = struct.unpack_from("<IIIQIII", b, 12)
        toff, nslots = struct.unpack_from("<QQ", b, len(b) - 32)
        for s in range(nslots):
            off, ln, _ = struct.unpack_from("<QII", b, toff + 16 * s)
            if ln:
                dt = np.float32 if codec == 0 else np.float16
                out.append(np.frombuffer(b, dtype=dt, count=t * d, offset=off).reshape(t, d).astype(np.float32))
    return np.stack(out)


def main(store, steps):
    import zstandard

    x = load(store)
    v, t, d = x.shape
    u = x / np.linalg.norm(x, axis=2, keepdims=True)
    fit, test = u[: v // 2].reshape(-1, d), u[v // 2 :]
    mu = fit.mean(0)
    w, vec = np.linalg.eigh(np.cov((fit - mu).T))
    w, vec = w[::-1], vec[:, ::-1]
    print(f"{store}: {v} views of {t} x {d}; f16 {t * d * 2} bytes/view; "
          f"issue 12's goal scaled to this shape: {25000 * t * d / (197 * 512):.0f} bytes/view")
    lo, hi = 1e-12, w.max()
    for _ in range(100):
        th = (lo * hi) ** 0.5
        lo, hi = (lo, th) if np.minimum(w, th).sum() > 0.01 else (th, hi)
    r = (0.5 * np.log2(np.maximum(w / lo, 1))).sum()
    print(f"  R(D) bound at 1 % relative MSE: {r / d:.2f} bits/value = {r * t / 8:.0f} bytes/view")
    cctx = zstandard.ZstdCompressor(level=19)
    for step in steps:
        sizes, coss = [], []
        for view in test:
            q = np.round(((view - mu) @ vec) / step).astype(np.int32)
            rec = (q * step) @ vec.T + mu
            coss.append((rec * view).sum(1) / np.linalg.norm(rec, axis=1))
            sizes.append(len(cctx.compress(np.clip(q, -128, 127).T.astype(np.int8).tobytes())) + 2 * t)
        c = np.concatenate(coss)
        print(f"  PCA + step {step} + zstd: {np.mean(sizes):7.0f} bytes/view, token cosine mean {c.mean():.5f} "
              f"p1 {np.percentile(c, 1):.5f} min {c.min():.5f}")


def kmeans(x, k, rng, iters=12):
    c = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        a = ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c


def pq(store):
    rng = np.random.default_rng(0)
    x = load(store)
    v, t, d = x.shape
    u = x / np.linalg.norm(x, axis=2, keepdims=True)
    fit, test = u[: v // 2].reshape(-1, d), u[v // 2 :].reshape(-1, d)
    fit = fit[rng.choice(len(fit), min(20000, len(fit)), replace=False)]
    for sub in [4, 2]:
        rec = np.zeros_like(test)
        for s in range(d // sub):
            sl = slice(s * sub, (s + 1) * sub)
            c = kmeans(fit[:, sl].copy(), 256, rng)
            rec[:, sl] = c[((test[:, sl] ** 2).sum(1)[:, None] - 2 * test[:, sl] @ c.T + (c * c).sum(1)[None]).argmin(1)]
        cos = (rec * test).sum(1) / np.linalg.norm(rec, axis=1)
        print(f"  PQ {d // sub} x 8 bits (subvectors of {sub}): {d // sub * t} bytes/view, token cosine mean {cos.mean():.5f} "
              f"p1 {np.percentile(cos, 1):.5f}")


if __name__ == "__main__":
    if sys.argv[2:] == ["--pq"]:
        pq(sys.argv[1])
    else:
        main(sys.argv[1], [float(s) for s in sys.argv[2:]] or [0.015, 0.02, 0.03, 0.05])
