#!/usr/bin/env bash
# A store in object storage (issue 22), on loopback: an S3-compatible server
# (s3s-fs, from setup) on 127.0.0.1 serving a folder of this machine.
#   1. extraction into the bucket (each shard staged, uploaded, checked,
#      then marked done) against extraction into a local folder: what
#      publishing costs;
#   2. the first epoch of training from the bucket with a cold cache (the
#      store is fetched and checked first), with a warm cache, and from the
#      local folder, ROUNDS alternating rounds.
# Loopback has no network latency and the disk is shared by server and
# client: this measures caev2's own overhead (requests, checks, copies),
# not a cloud's bandwidth. Prints a table and writes OUT/results.json.
#
#   scripts/bench_remote.sh [IMAGES_DIR]
#     default: ../shared/data/imagenet-sample/images (1,000 ImageNet photos)
#   env: ROUNDS (2), VIEWS (10), THREADS (all cores), OUT (runs/bench-remote)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-../shared/data/imagenet-sample/images}"
ROUNDS="${ROUNDS:-2}"; VIEWS="${VIEWS:-10}"; THREADS="${THREADS:-$(nproc)}"; OUT="${OUT:-runs/bench-remote}"
scripts/setup.sh --tests >/dev/null  # the S3 server
source .deps/env.sh
cargo build --release -p tools --bin caev2 >/dev/null 2>&1
C="$ROOT/target/release/caev2"
rm -rf "$OUT"; mkdir -p "$OUT/s3/bench"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.deps/s3s-fs/bin/s3s-fs --host 127.0.0.1 --port "$PORT" --access-key bench --secret-key bench-secret "$OUT/s3" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ALLOW_HTTP=true
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
URL=s3://bench/sample
now() { date +%s.%N; }
EXTRACT=(--teacher .deps/models/efficientnet-lite0.onnx --data "$DATA" --views "$VIEWS" --student-size 112 --embed-images
  --threads "$THREADS" --no-progress)

t0=$(now); $C extract "${EXTRACT[@]}" --out "$OUT/local" >/dev/null; t1=$(now)
$C extract "${EXTRACT[@]}" --out "$URL" --cache "$OUT/stage" >/dev/null; t2=$(now)
echo "{\"what\": \"extract\", \"local_s\": $(echo "$t1 - $t0" | bc), \"bucket_s\": $(echo "$t2 - $t1" | bc), \"store_bytes\": $(du -sb "$OUT/local" | cut -f1)}" > "$OUT/rounds.jsonl"

epoch() {  # STORE CACHE: seconds for one epoch (fetch included)
  rm -rf "$OUT/run"
  local a; a=$(now)
  $C train --shards "$1" --cache "$2" --out "$OUT/run" --epochs 1 --batch 16 --lr 1e-3 --warmup-steps 5 \
    --threads "$THREADS" --device cpu --no-progress >/dev/null
  echo "$(now) - $a" | bc
}
for r in $(seq "$ROUNDS"); do
  rm -rf "$OUT/cache"
  cold=$(epoch "$URL" "$OUT/cache")
  warm=$(epoch "$URL" "$OUT/cache")
  local_s=$(epoch "$OUT/local" "$OUT/cache")
  echo "{\"what\": \"epoch\", \"round\": $r, \"cold\": $cold, \"warm\": $warm, \"local\": $local_s, \"fetched_bytes\": $(du -sb "$OUT/cache/stores" | cut -f1)}" >> "$OUT/rounds.jsonl"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/rounds.jsonl")]
ex = rows[0]
ep = [r for r in rows if r["what"] == "epoch"]
med = lambda k: statistics.median(r[k] for r in ep)
res = {
    "store_bytes": ex["store_bytes"], "extract_local_s": ex["local_s"], "extract_bucket_s": ex["bucket_s"],
    "publish_overhead": ex["bucket_s"] / ex["local_s"],
    "epoch_cold_s": med("cold"), "epoch_warm_s": med("warm"), "epoch_local_s": med("local"),
    "fetch_s": med("cold") - med("warm"), "fetched_bytes": ep[-1]["fetched_bytes"], "rounds": len(ep),
}
res["fetch_mb_per_s"] = res["fetched_bytes"] / 1e6 / max(res["fetch_s"], 1e-9)
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
print(f"store: {res['store_bytes'] / 1e6:.0f} MB (targets + image packs)")
print("| step | seconds | ratio |")
print("|---|---:|---:|")
print(f"| extract into a local folder | {res['extract_local_s']:.1f} | 1.00x |")
print(f"| extract into the bucket (staged, uploaded, checked) | {res['extract_bucket_s']:.1f} | {res['publish_overhead']:.2f}x |")
print(f"| first epoch, local folder | {res['epoch_local_s']:.1f} | 1.00x |")
print(f"| first epoch, bucket, warm cache | {res['epoch_warm_s']:.1f} | {res['epoch_warm_s'] / res['epoch_local_s']:.2f}x |")
print(f"| first epoch, bucket, cold cache | {res['epoch_cold_s']:.1f} | {res['epoch_cold_s'] / res['epoch_local_s']:.2f}x |")
print(f"fetch and check: {res['fetch_s']:.1f} s for {res['fetched_bytes'] / 1e6:.0f} MB ({res['fetch_mb_per_s']:.0f} MB/s on loopback)")
PY
