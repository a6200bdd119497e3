#!/usr/bin/env python3
"""Decode the records of a `pca` store with nothing but FORMAT.md: an
independent reader of the model file and of the rANS records, used by the
tests to check that the format document says what the Rust code does.

usage: pca_decode.py STORE SHARD SLOT [SLOT ...]
prints, per slot, the quantised coefficients q (T x D integers) as one JSON
list per line.
"""
import glob
import json
import struct
import sys

import numpy as np

L = 1 << 23


def load_model(store):
    manifest = json.load(open(f"{store}/manifest.json"))
    b = open(f"{store}/{manifest['codec_fit']['file']}", "rb").read()
    assert b[:8] == b"CAEV2PCA" and struct.unpack_from("<I", b, 8)[0] == 1
    t, d, cls, rows, cols = struct.unpack_from("<5I", b, 12)
    off = 48 + 4 * d * (d + 2)
    freqs = np.frombuffer(b, dtype="<u2", count=257 * d, offset=off).reshape(d, 257).astype(np.int64)
    return t, d, cls, cols, freqs


def decode(rec, t, d, cls, cols, freqs):
    state = list(struct.unpack_from("<4I", rec, 0))
    data, pos, j = rec[16:], 0, 0
    q = np.zeros((t, d), dtype=np.int64)

    def symbol(starts, fr):
        nonlocal pos, j
        x = state[j % 4]
        slot = x & 4095
        s = max(i for i in range(len(starts)) if fr[i] > 0 and starts[i] <= slot)
        x = fr[s] * (x >> 12) + slot - starts[s]
        while x < L:
            x = (x << 8) | data[pos]
            pos += 1
        state[j % 4] = x
        j += 1
        return s

    uniform = ([16 * i for i in range(256)], [16] * 256)
    for k in range(d):
        fr = list(freqs[k])
        starts = list(np.concatenate([[0], np.cumsum(fr)[:-1]]))
        for tok in range(t):
            s = symbol(starts, fr)
            r = symbol(*uniform) if s == 256 else s
            if tok < cls:
                pred = 0
            else:
                p = tok - cls
                y, x = divmod(p, cols)
                a = q[tok - 1, k] if x > 0 else 0
                bb = q[tok - cols, k] if y > 0 else 0
                c = q[tok - cols - 1, k] if x > 0 and y > 0 else 0
                if y == 0 and x == 0:
                    pred = 0
                elif y == 0:
                    pred = a
                elif x == 0:
                    pred = bb
                elif c >= max(a, bb):
                    pred = min(a, bb)
                elif c <= min(a, bb):
                    pred = max(a, bb)
                else:
                    pred = a + bb - c
            v = (pred + r) % 256
            q[tok, k] = v - 256 if v >= 128 else v
    assert pos == len(data) and state == [L] * 4, "record does not end where it should"
    return q


def main(store, shard, slots):
    t, d, cls, cols, freqs = load_model(store)
    b = open(sorted(glob.glob(f"{store}/shards/shard-{int(shard):05d}.bin"))[0], "rb").read()
    toff, _ = struct.unpack_from("<QQ", b, len(b) - 32)
    for slot in slots:
        off, ln, _ = struct.unpack_from("<QII", b, toff + 16 * int(slot))
        print(json.dumps(decode(b[off:off + ln], t, d, cls, cols, freqs).tolist()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
