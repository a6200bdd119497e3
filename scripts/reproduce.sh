#!/usr/bin/env bash
# Small-scale reproduction of CAE v2's loss ablation (paper Table 2) plus a
# mask-ratio ablation, all trained from ONE store of teacher targets.
#
#   scripts/reproduce.sh [IMAGES_DIR] [LABELS_TSV]
#     default: ../shared/data/imagenet-sample (1,000 ImageNet photos, 12 coarse labels)
#   env: K (views, default 3; the last one is held out), STEPS (default 60),
#        BATCH (32), SEEDS ("0 1 2"), MODEL (tiny), OUT (runs/repro)
#
# Writes OUT/results.json and OUT/results.md (tables) and per-run folders
# with metrics, checkpoints and curves. Every number is measured in the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-../shared/data/imagenet-sample/images}"
LABELS="${2:-../shared/data/imagenet-sample/coarse-labels.tsv}"
K="${K:-3}"; STEPS="${STEPS:-60}"; BATCH="${BATCH:-32}"; SEEDS="${SEEDS:-0 1 2}"; MODEL="${MODEL:-tiny}"
OUT="${OUT:-runs/repro}"
TEACHER=.deps/models/dinov2-vits14.onnx
scripts/setup.sh >/dev/null
cargo build --release -p tools --bin caev2 >/dev/null 2>&1
C=target/release/caev2
mkdir -p "$OUT"
LOG="$OUT/log.jsonl"; : > "$LOG"
note() { echo "$1" >> "$LOG"; }

t0=$(date +%s.%N)
$C extract --teacher "$TEACHER" --data "$DATA" --out "$OUT/store" --views "$K" --batch 16 --no-progress --json > "$OUT/extract.json"
t1=$(date +%s.%N)
note "{\"what\": \"extract\", \"seconds\": $(echo "$t1 - $t0" | bc), \"bytes\": $(du -sb "$OUT/store" | cut -f1)}"

HOLD="$((K-1))..$K"
declare -A FLAGS=( [both]="" [lv_only]="--no-lz" [lz_only]="--no-lv" [mask50]="--mask-ratio 0.5" )
for variant in both lv_only lz_only mask50; do
  for seed in $SEEDS; do
    run="$OUT/$variant-s$seed"
    rm -rf "$run"
    t0=$(date +%s.%N)
    $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$run" --batch "$BATCH" --steps "$STEPS" \
      --lr 1e-3 --warmup-steps 5 --seed "$seed" --train-views "$((K-1))" --checkpoint-every 1000000 --no-progress ${FLAGS[$variant]} > /dev/null
    t1=$(date +%s.%N)
    align=$($C eval align --checkpoint "$run" --views "$HOLD" --json | tr -d "\n")
    knn=$($C eval knn --data "$DATA" --labels "$LABELS" --checkpoint "$run" --no-random --json | tr -d "\n")
    $C plot "$run" > /dev/null
    note "{\"what\": \"run\", \"variant\": \"$variant\", \"seed\": $seed, \"train_seconds\": $(echo "$t1 - $t0" | bc), \"align\": $align, \"knn\": $knn}"
    echo "done $variant seed $seed"
  done
done
# what the live teacher would have cost: the same run, 10 steps each way
for mode in cached live; do
  extra=""; [ $mode = live ] && extra="--live-teacher $TEACHER"
  rm -rf "$OUT/cost-$mode"
  $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$OUT/cost-$mode" --batch "$BATCH" --steps 10 \
    --lr 1e-3 --warmup-steps 5 --train-views "$((K-1))" --checkpoint-every 1000000 --no-progress $extra > /dev/null
done
note "{\"what\": \"cost\", \"cached\": \"$OUT/cost-cached\", \"live\": \"$OUT/cost-live\"}"
for seed in $SEEDS; do
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --random "$MODEL" --seed "$seed" --json | tr -d "\n")
  note "{\"what\": \"floor\", \"seed\": $seed, \"knn\": $knn}"
done
knn=$($C eval knn --data "$DATA" --labels "$LABELS" --teacher "$TEACHER" --no-random --json | tr -d "\n")
note "{\"what\": \"teacher\", \"knn\": $knn}"
.deps/py/bin/python scripts/summarize_repro.py "$OUT"
