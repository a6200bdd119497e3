#!/usr/bin/env bash
# Small-scale reproduction of CAE v2's loss ablation (paper Table 2), trained
# from ONE store of targets of the semantic EfficientNet-Lite0 teacher.
#
#   scripts/reproduce.sh [IMAGES_DIR] [LABELS_TSV]
#     default: ../shared/data/imagenet-sample (1,000 ImageNet photos, 12 coarse labels)
#   env: K (views per image, default 10; the last one is held out for
#        `eval align`), EPOCHS (per run, default 60), BATCH (16), LR (1e-3),
#        SEEDS ("0 1 2"), VARIANTS ("both lv_only lz_only"), MODEL (tiny),
#        STUDENT_SIZE (112: a /16 student on the teacher's native 7x7 grid;
#        224 pairs with the 7x7 map resampled to 14x14), JOBS (runs at a
#        time, default 2) and THREADS (per run, default 1), OUT (runs/repro)
#
# Writes OUT/results.json and OUT/results.md (tables) and per-run folders
# with metrics, checkpoints and curves. Every number is measured in the run.
# Killed, it resumes: rerun with the same settings and it keeps the store,
# every finished step of OUT/log.jsonl and each unfinished run's last
# checkpoint (every 500 steps).
# The defaults (60 epochs) take about 3 h on 2 cores; EPOCHS=20 about 75 min.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-../shared/data/imagenet-sample/images}"
LABELS="${2:-../shared/data/imagenet-sample/coarse-labels.tsv}"
K="${K:-10}"; EPOCHS="${EPOCHS:-60}"; BATCH="${BATCH:-16}"; LR="${LR:-1e-3}"; SEEDS="${SEEDS:-0 1 2}"
VARIANTS="${VARIANTS:-both lv_only lz_only}"; MODEL="${MODEL:-tiny}"; STUDENT_SIZE="${STUDENT_SIZE:-112}"
JOBS="${JOBS:-2}"; THREADS="${THREADS:-1}"
OUT="${OUT:-runs/repro}"
TEACHER=.deps/models/efficientnet-lite0.onnx
scripts/setup.sh >/dev/null
cargo build --release -p tools --bin caev2 >/dev/null 2>&1
mkdir -p "$OUT/bin"
# a private copy: rebuilding the workspace while this runs must not swap the binary under it
cp target/release/caev2 "$OUT/bin/caev2"
C="$OUT/bin/caev2"
LOG="$OUT/log.jsonl"
note() { echo "$1" >> "$LOG"; }
now() { date +%s.%N; }
logged() { [ -f "$LOG" ] && grep -q "$1" "$LOG"; }   # a step already done (the script resumes after a kill)
SETTINGS="{\"what\": \"settings\", \"K\": $K, \"epochs\": $EPOCHS, \"batch\": $BATCH, \"lr\": $LR, \"model\": \"$MODEL\", \"student_size\": $STUDENT_SIZE, \"seeds\": \"$SEEDS\", \"teacher\": \"$TEACHER\"}"
if ! logged "\"what\": \"extract\"" || ! grep -qF "$SETTINGS" "$LOG"; then
  : > "$LOG"
  # other settings: every run folder is stale
  for v in $VARIANTS; do for seed in $SEEDS; do rm -rf "$OUT/$v-s$seed"; done; done
  note "$SETTINGS"
  t0=$(now)
  rm -rf "$OUT/store"
  $C extract --teacher "$TEACHER" --data "$DATA" --out "$OUT/store" --views "$K" --batch 32 --student-size "$STUDENT_SIZE" \
    --no-progress --json > "$OUT/extract.json"
  t1=$(now)
  note "{\"what\": \"extract\", \"seconds\": $(echo "$t1 - $t0" | bc), \"bytes\": $(du -sb "$OUT/store" | cut -f1)}"
  echo "extract done in $(echo "$t1 - $t0" | bc) s"
else
  echo "resuming: store and $(grep -c '"what": "run"' "$LOG") finished runs kept (same settings)"
fi

HOLD="$((K-1))..$K"
declare -A FLAGS=( [both]="" [lv_only]="--no-lz" [lz_only]="--no-lv" [mask50]="--mask-ratio 0.5" )
one_run() {  # variant seed: train, evaluate, log one line
  local variant=$1 seed=$2 run="$OUT/$1-s$2" t0 t1 align knn
  t0=$(now)
  # --resume continues a run killed mid-way from its last checkpoint (and
  # starts one that has none), so a killed reproduction loses at most 500 steps
  $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$run" --batch "$BATCH" --epochs "$EPOCHS" \
    --lr "$LR" --seed "$seed" --train-views "$((K-1))" --checkpoint-every 500 --threads "$THREADS" --no-progress \
    --resume ${FLAGS[$variant]} > /dev/null
  t1=$(now)
  align=$($C eval align --checkpoint "$run" --views "$HOLD" --threads "$THREADS" --json | tr -d "\n")
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --checkpoint "$run" --no-random --threads "$THREADS" --json | tr -d "\n")
  $C plot "$run" > /dev/null
  note "{\"what\": \"run\", \"variant\": \"$variant\", \"seed\": $seed, \"train_seconds\": $(echo "$t1 - $t0" | bc), \"align\": $align, \"knn\": $knn}"
  echo "done $variant seed $seed ($(echo "$t1 - $t0" | bc) s of training)"
}
# JOBS runs at a time with THREADS libtorch threads each: on 2 cores, two
# single-threaded runs train ~35 % more images/s in all than one run on both.
# Seed-major order, so an interrupted reproduction has every variant.
for seed in $SEEDS; do
  for variant in $VARIANTS; do
    logged "\"variant\": \"$variant\", \"seed\": $seed," && continue
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    one_run "$variant" "$seed" &
  done
done
wait
for seed in $SEEDS; do
  logged "\"what\": \"floor\", \"seed\": $seed," && continue
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --random "$MODEL" --random-size "$STUDENT_SIZE" --seed "$seed" --json | tr -d "\n")
  note "{\"what\": \"floor\", \"seed\": $seed, \"knn\": $knn}"
done
if ! logged '"what": "teacher"'; then
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --teacher "$TEACHER" --no-random --json | tr -d "\n")
  note "{\"what\": \"teacher\", \"knn\": $knn}"
fi
# linear probe (BN without affine + linear, cross-validated) for the best
# variant by mean k-NN, next to its random-init floor and the teacher
if ! logged '"what": "linear"'; then
  best=$(.deps/py/bin/python scripts/summarize_repro.py "$OUT" --best)
  ckpts=(); for seed in $SEEDS; do ckpts+=(--checkpoint "$OUT/$best-s$seed"); done
  lin=$($C eval linear --data "$DATA" --labels "$LABELS" "${ckpts[@]}" --random-size "$STUDENT_SIZE" --teacher "$TEACHER" --json | tr -d "\n")
  note "{\"what\": \"linear\", \"variant\": \"$best\", \"result\": $lin}"
fi
# what the live teacher would have cost: the same run, 10 steps each way
if ! logged '"what": "cost"'; then
  for mode in cached live; do
    extra=""; [ $mode = live ] && extra="--live-teacher $TEACHER"
    rm -rf "$OUT/cost-$mode"
    $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$OUT/cost-$mode" --batch "$BATCH" --steps 10 \
      --lr "$LR" --warmup-steps 5 --train-views "$((K-1))" --checkpoint-every 1000000 --no-progress $extra > /dev/null
  done
  note "{\"what\": \"cost\", \"cached\": \"$OUT/cost-cached\", \"live\": \"$OUT/cost-live\"}"
fi
.deps/py/bin/python scripts/summarize_repro.py "$OUT"
