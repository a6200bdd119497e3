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

L = 1 << 16
LANES = 64


def load_model(store):
    manifest = json.load(open(f"{store}/manifest.json"))
    b = open(f"{store}/{manifest['codec_fit']['file']}", "rb").read()
    assert b[:8] == b"CAEV2PCA" and struct.unpack_from("<I", b, 8)[0] == 2
    t, d, cls, rows, cols = struct.unpack_from("<5I", b, 12)
    off = 48 + 4 * d * (d + 2)
    freqs = np.frombuffer(b, dtype="<u2", count=257 * d, offset=off).reshape(d, 257).astype(np.int64)
    return t, d, cls, cols, freqs


def decode(rec, t, d, cls, cols, freqs):
    n_esc = struct.unpack_from("<I", rec, 0)[0]
    state = list(struct.unpack_from(f"<{LANES}I", rec, 4))
    at = 4 + 4 * LANES
    escapes = list(rec[at:at + n_esc])
    words = struct.unpack_from(f"<{(len(rec) - at - n_esc) // 2}H", rec, at + n_esc)
    pos, j = 0, 0
    q = np.zeros((t, d), dtype=np.int64)
    for k in range(d):
        fr = list(freqs[k])
        starts = list(np.concatenate([[0], np.cumsum(fr)[:-1]]))
        for tok in range(t):
            x = state[j % LANES]
            slot = x & 4095
            s = max(i for i in range(257) if fr[i] > 0 and starts[i] <= slot)
            x = fr[s] * (x >> 12) + slot - starts[s]
            if x < L:
                x = (x << 16) | words[pos]
                pos += 1
            state[j % LANES] = x
            j += 1
            r = escapes.pop(0) if s == 256 else s
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
    assert pos == len(words) and not escapes and state == [L] * LANES, "record does not end where it should"
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
