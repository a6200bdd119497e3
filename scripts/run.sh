#!/usr/bin/env bash
# Set up everything (idempotent, offline after the first run) and run the
# main job on the offline default: extract K views of the registry-shipped
# ImageNet photos with the real DINOv2-style ViT-S/14 teacher, show and
# verify what the store holds, then train a ViT-Tiny student from it on the
# CPU for a minute.
#
#   scripts/run.sh [OUT_DIR]      (default: runs/demo; rerunning resumes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/demo}"
scripts/setup.sh
source .deps/env.sh
cargo build --release -p tools --bin caev2
CAEV2=target/release/caev2

echo "== extract: 20 ImageNet photos x 4 views, DINOv2-style ViT-S/14 teacher at 196 px (14x14 grid)"
$CAEV2 extract --teacher .deps/models/dinov2-vits14.onnx \
  --data "$CAEV2_SAMPLE_DATA/imagenet-mini" --out "$OUT/store" \
  --views 4 --batch 16 --images-per-shard 8
echo
echo "== inspect summary"
$CAEV2 inspect summary "$OUT/store"
echo
echo "== inspect verify"
$CAEV2 inspect verify "$OUT/store"
echo
echo "== train: ViT-Tiny student, 80 steps of 8 images from the cached targets (CPU)"
rm -rf "$OUT/train"
$CAEV2 train --shards "$OUT/store" --data "$CAEV2_SAMPLE_DATA/imagenet-mini" --out "$OUT/train" \
  --model tiny --batch 8 --steps 80 --lr 5e-4 --warmup-steps 5 --checkpoint-every 40
echo "metrics: $OUT/train/metrics.jsonl, checkpoints: $OUT/train/checkpoints/"
