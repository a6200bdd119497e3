#!/usr/bin/env bash
# The views study (issue 20): what K stored views per image cost a student
# against the authors' regime, a fresh view of every image in every epoch
# (K = infinity, the teacher in the loop). One K = 10 store of the semantic
# EfficientNet-Lite0 teacher; ViT-Tiny at 112 px, both losses, the
# reproduction's budget (RESULTS.md), trained on stored views 0..K-1 for K in
# {1, 2, 4, 9} (`--train-views K`) or on fresh views (`--fresh-views
# --live-teacher`); view 9 is never trained on and is held out for alignment.
#
#   scripts/views_study.sh [IMAGES_DIR] [LABELS_TSV]
#     default: ../shared/data/imagenet-sample (1,000 ImageNet photos, 12 coarse labels)
#   env: EPOCHS (60), BATCH (16), LR (1e-3), MAIN_SEEDS ("0 1 2": K = 1, K = 9
#        and fresh), EXTRA_SEEDS ("0 1": K = 2 and K = 4), JOBS (2 runs at a
#        time), THREADS (1 per run), COST_STEPS (40: the step-time
#        measurement of each mode, one run at a time), OUT (runs/views-study)
#
# Every run is evaluated when it ends: k-NN (CLS and mean-pool), alignment
# with the teacher's targets on held-out view 9 and, for K = 9 and fresh, a
# linear probe; its line in OUT/log.jsonl then holds everything the summary
# needs, so the run folders can go. Then the random-init floors, the
# teacher, and the step time of each mode. OUT/results.{md,json} and
# OUT/views-study.png are written by scripts/summarize_views.py.
#
# Killed, it resumes: rerun with the same settings and it keeps the store,
# every run logged as done, and each unfinished run's last checkpoint (every
# 500 steps). A run is redone only when its log line is missing. The log is
# also kept in git (docs/views-study/log.jsonl, copied there after every
# run): on a fresh checkout, where OUT is empty, the study starts from the
# committed log, rebuilds the store (deterministic: the same bytes) and runs
# only what the log lacks. The binary
# is copied into OUT/bin once, so rebuilding the workspace while the study
# runs changes nothing; every log line names the binary's SHA-256.
# On 2 cores: about 8 hours with the defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-../shared/data/imagenet-sample/images}"
LABELS="${2:-../shared/data/imagenet-sample/coarse-labels.tsv}"
EPOCHS="${EPOCHS:-60}"; BATCH="${BATCH:-16}"; LR="${LR:-1e-3}"
MAIN_SEEDS="${MAIN_SEEDS:-0 1 2}"; EXTRA_SEEDS="${EXTRA_SEEDS:-0 1}"
JOBS="${JOBS:-2}"; THREADS="${THREADS:-1}"; COST_STEPS="${COST_STEPS:-40}"
OUT="${OUT:-runs/views-study}"
K=10; MODEL=tiny; STUDENT_SIZE=112
TEACHER=.deps/models/efficientnet-lite0.onnx
PY=.deps/py/bin/python
scripts/setup.sh >/dev/null
mkdir -p "$OUT/bin"
if [ ! -x "$OUT/bin/caev2" ]; then
  cargo build --release -p tools --bin caev2 >/dev/null 2>&1
  cp target/release/caev2 "$OUT/bin/caev2"
fi
C="$OUT/bin/caev2"
BIN_SHA=$(sha256sum "$C" | cut -c1-16)
LOG="$OUT/log.jsonl"
KEPT=docs/views-study/log.jsonl
if [ ! -f "$LOG" ] && [ -f "$KEPT" ]; then
  cp "$KEPT" "$LOG"
  echo "starting from the committed log $KEPT ($(grep -c '"what": "run"' "$LOG") finished runs)"
fi
note() { echo "$1" >> "$LOG"; mkdir -p "$(dirname "$KEPT")"; cp "$LOG" "$KEPT"; }
now() { date +%s.%N; }
logged() { [ -f "$LOG" ] && grep -q "$1" "$LOG"; }
SETTINGS="{\"what\": \"settings\", \"K\": $K, \"epochs\": $EPOCHS, \"batch\": $BATCH, \"lr\": $LR, \"model\": \"$MODEL\", \"student_size\": $STUDENT_SIZE, \"teacher\": \"$TEACHER\", \"data\": \"$DATA\"}"
if ! grep -qF "$SETTINGS" "$LOG" 2>/dev/null; then
  # other settings (or a new study): every run is stale
  : > "$LOG"
  rm -rf "$OUT"/k*-s* "$OUT"/fresh-s* "$OUT"/cost-* "$OUT/store"
  note "$SETTINGS"
fi
if ! logged '"what": "extract"' || ! [ -f "$OUT/store/manifest.json" ]; then
  # the same command as scripts/reproduce.sh: the same bytes (a deterministic store)
  t0=$(now)
  rm -rf "$OUT/store"
  $C extract --teacher "$TEACHER" --data "$DATA" --out "$OUT/store" --views "$K" --batch 32 --student-size "$STUDENT_SIZE" \
    --no-progress --json > "$OUT/extract.json"
  t1=$(now)
  logged '"what": "extract"' || note "{\"what\": \"extract\", \"seconds\": $(echo "$t1 - $t0" | bc), \"bytes\": $(du -sb "$OUT/store" | cut -f1)}"
  echo "extract done in $(echo "$t1 - $t0" | bc) s"
else
  echo "resuming: store and $(grep -c '"what": "run"' "$LOG") finished runs kept (same settings)"
fi

HOLD="$((K-1))..$K"
mode_flags() {  # the training flags of a mode: kN (stored views 0..N-1) or fresh
  case $1 in
    fresh) echo "--fresh-views --live-teacher $TEACHER" ;;
    k*) echo "--train-views ${1#k}" ;;
  esac
}
one_run() {  # mode seed: train, evaluate, log one line
  local mode=$1 seed=$2 run="$OUT/$1-s$2" t0 t1 align knn linear="null" stats
  t0=$(now)
  # --resume continues a run killed mid-way from its last checkpoint (and starts one that has none)
  # shellcheck disable=SC2046
  $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$run" --batch "$BATCH" --epochs "$EPOCHS" \
    --lr "$LR" --seed "$seed" $(mode_flags "$mode") --checkpoint-every 500 --threads "$THREADS" --no-progress --resume > /dev/null
  t1=$(now)
  align=$($C eval align --checkpoint "$run" --views "$HOLD" --threads "$THREADS" --json | tr -d "\n")
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --checkpoint "$run" --no-random --threads "$THREADS" --json | tr -d "\n")
  if [ "$mode" = k9 ] || [ "$mode" = fresh ]; then
    linear=$($C eval linear --data "$DATA" --labels "$LABELS" --checkpoint "$run" --no-random --threads "$THREADS" --json | tr -d "\n")
  fi
  stats=$($PY scripts/summarize_views.py --run-stats "$run")
  $C plot "$run" > /dev/null
  note "{\"what\": \"run\", \"mode\": \"$mode\", \"seed\": $seed, \"bin\": \"$BIN_SHA\", \"wall_seconds\": $(echo "$t1 - $t0" | bc), \"stats\": $stats, \"align\": $align, \"knn\": $knn, \"linear\": $linear}"
  echo "done $mode seed $seed ($(echo "$t1 - $t0" | bc) s)"
}
# the most informative runs first: seed 0 of every mode, then seed 1, then
# the third seed of K = 1, K = 9 and fresh
PLAN=()
for seed in $MAIN_SEEDS $EXTRA_SEEDS; do
  for mode in k1 k9 fresh k2 k4; do
    case $mode in k2|k4) list=$EXTRA_SEEDS ;; *) list=$MAIN_SEEDS ;; esac
    [[ " $list " == *" $seed "* ]] || continue
    [[ " ${PLAN[*]:-} " == *" $mode:$seed "* ]] && continue
    PLAN+=("$mode:$seed")
  done
done
for item in "${PLAN[@]}"; do
  mode=${item%%:*}; seed=${item##*:}
  logged "\"mode\": \"$mode\", \"seed\": $seed," && continue
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  one_run "$mode" "$seed" &
done
wait
for seed in $MAIN_SEEDS; do
  logged "\"what\": \"floor\", \"seed\": $seed," && continue
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --random "$MODEL" --random-size "$STUDENT_SIZE" --seed "$seed" --json | tr -d "\n")
  note "{\"what\": \"floor\", \"seed\": $seed, \"knn\": $knn}"
done
if ! logged '"what": "teacher"'; then
  knn=$($C eval knn --data "$DATA" --labels "$LABELS" --teacher "$TEACHER" --no-random --json | tr -d "\n")
  note "{\"what\": \"teacher\", \"knn\": $knn}"
fi
if ! logged '"what": "linear-floor"'; then
  # the probe's floor (random init, seed 0) and ceiling (the teacher)
  lin=$($C eval linear --data "$DATA" --labels "$LABELS" --random "$MODEL" --random-size "$STUDENT_SIZE" --teacher "$TEACHER" --json | tr -d "\n")
  note "{\"what\": \"linear-floor\", \"result\": $lin}"
fi
# step time of each mode, one run at a time on the same machine (the study's
# own runs share the cores two at a time, and with other work)
for mode in k9 fresh; do
  logged "\"what\": \"cost\", \"mode\": \"$mode\"" && continue
  rm -rf "$OUT/cost-$mode"
  # shellcheck disable=SC2046
  $C train --shards "$OUT/store" --data "$DATA" --model "$MODEL" --out "$OUT/cost-$mode" --batch "$BATCH" --steps "$COST_STEPS" \
    --lr "$LR" --warmup-steps 5 $(mode_flags "$mode") --checkpoint-every 1000000 --threads "$THREADS" --no-progress > /dev/null
  note "{\"what\": \"cost\", \"mode\": \"$mode\", \"threads\": $THREADS, \"stats\": $($PY scripts/summarize_views.py --run-stats "$OUT/cost-$mode")}"
done
$PY scripts/summarize_views.py "$OUT"
