#!/usr/bin/env bash
# The loader per core reading images from a store that carries them
# (format 2, --embed-images) against the same store reading the image
# files from the dataset folder (issue 22), side by side in one run:
# `train --loader-only` (decode, view rebuild, targets, masks; no model)
# with one loader thread, ROUNDS alternating rounds of each, warm page
# cache, then one round of each after dropping the page cache (as root;
# skipped otherwise). Prints a table and writes OUT/results.json.
#
#   scripts/bench_embedded.sh [IMAGES_DIR]
#     default: ../shared/data/imagenet-sample/images (1,000 ImageNet photos)
#   env: ROUNDS (5), STEPS (40 batches of 16), OUT (runs/bench-embedded)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-../shared/data/imagenet-sample/images}"
ROUNDS="${ROUNDS:-5}"; STEPS="${STEPS:-40}"; OUT="${OUT:-runs/bench-embedded}"
scripts/setup.sh >/dev/null
cargo build --release -p tools --bin caev2 >/dev/null 2>&1
C=target/release/caev2
mkdir -p "$OUT"
if [ ! -f "$OUT/plain/manifest.json" ] || ! $C inspect verify "$OUT/plain" >/dev/null 2>&1; then
  rm -rf "$OUT/plain"
  $C extract --teacher .deps/models/efficientnet-lite0.onnx --data "$DATA" --out "$OUT/plain" --views 2 --student-size 112 --no-progress >/dev/null
fi
if [ ! -f "$OUT/embedded/manifest.json" ] || ! $C inspect verify "$OUT/embedded" >/dev/null 2>&1; then
  rm -rf "$OUT/embedded"
  $C inspect recode "$OUT/plain" "$OUT/embedded" --embed-images "$DATA" >/dev/null
fi
speed() {  # store [--data DIR]: images/s of the loader on one thread
  rm -rf "$OUT/run"
  $C train --shards "$1" "${@:2}" --out "$OUT/run" --batch 16 --steps "$STEPS" --loader-only --threads 1 --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])'
}
: > "$OUT/rounds.jsonl"
for r in $(seq "$ROUNDS"); do
  f=$(speed "$OUT/plain" --data "$DATA"); e=$(speed "$OUT/embedded")
  echo "{\"cache\": \"warm\", \"round\": $r, \"files\": $f, \"embedded\": $e}" >> "$OUT/rounds.jsonl"
done
if [ "$(id -u)" = 0 ] && [ -w /proc/sys/vm/drop_caches ]; then
  sync; echo 3 > /proc/sys/vm/drop_caches; f=$(speed "$OUT/plain" --data "$DATA")
  sync; echo 3 > /proc/sys/vm/drop_caches; e=$(speed "$OUT/embedded")
  echo "{\"cache\": \"cold\", \"round\": 1, \"files\": $f, \"embedded\": $e}" >> "$OUT/rounds.jsonl"
fi
python3 - "$OUT" "$(du -sb "$DATA" | cut -f1)" "$(du -sb "$OUT/embedded/images" | cut -f1)" <<'PY'
import json, statistics, sys
out, data_bytes, pack_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(f"{out}/rounds.jsonl")]
res = {"image_bytes": data_bytes, "pack_bytes": pack_bytes}
print(f"images {data_bytes / 1e6:.1f} MB in the folder, {pack_bytes / 1e6:.1f} MB of image packs")
print(f"{'page cache':<11} {'rounds':>6} {'files img/s':>12} {'embedded img/s':>15} {'ratio':>6}")
for cache in ("warm", "cold"):
    rs = [r for r in rows if r["cache"] == cache]
    if not rs:
        continue
    f, e = statistics.median(r["files"] for r in rs), statistics.median(r["embedded"] for r in rs)
    res[cache] = {"rounds": len(rs), "files": f, "embedded": e, "ratio": e / f}
    print(f"{cache:<11} {len(rs):>6} {f:>12.1f} {e:>15.1f} {e / f:>6.3f}")
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
PY
