#!/usr/bin/env bash
# GPU check of `caev2 train` on a machine with torch 2.11.0 (CUDA) and no
# Rust toolchain. Prepare here, run there from the repo root:
#
#   here:  cargo build --release -p tools && mkdir -p .gpu && strip -o .gpu/caev2 target/release/caev2 \
#          && cp .deps/onnxruntime/libonnxruntime.so.1.31.1 .gpu/ && cp -r .deps/data/imagenet-mini .gpu/
#   there: TORCH_LIB=/path/to/site-packages/torch/lib scripts/gpu-check.sh
#
# Extracts targets with the tiny test teacher (the real one is too large to
# carry) for 160 images x 4 views, then trains ViT-Tiny and ViT-Base on CUDA
# and on the CPU and prints losses and images/s.
set -uo pipefail
export LD_LIBRARY_PATH=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}:${LD_LIBRARY_PATH:-}
export ORT_DYLIB_PATH=$PWD/.gpu/libonnxruntime.so.1.31.1
B=.gpu/caev2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf /tmp/caev2-gpu && mkdir -p /tmp/caev2-gpu/data
for i in 0 1 2 3 4 5 6 7; do for d in .gpu/imagenet-mini/*; do
  mkdir -p /tmp/caev2-gpu/data/$(basename $d)
  for f in $d/*; do cp $f /tmp/caev2-gpu/data/$(basename $d)/r$i-$(basename $f); done
done; done
$B extract --teacher tests/fixtures/tiny_vit.onnx --data /tmp/caev2-gpu/data --out /tmp/caev2-gpu/store --views 4 --threads 8 --decode-threads 8 --no-progress || exit 1
for m in tiny base; do for dev in cuda cpu; do for batch in 32 128; do
  steps=20; [ $dev = cpu ] && steps=6
  [ $dev = cpu ] && [ $batch = 128 ] && continue
  run=/tmp/caev2-gpu/run-$m-$dev-$batch
  $B train --shards /tmp/caev2-gpu/store --data /tmp/caev2-gpu/data --model $m --out $run --batch $batch --steps $steps \
    --lr 5e-4 --warmup-steps 2 --device $dev --threads 16 --no-progress > /dev/null 2>$run.err
  echo "== $m $dev batch $batch rc=$?"
  python3 - $run/metrics.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ips = sorted(r["images_per_sec"] for r in rows[2:])
print(f"steps {len(rows)} loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, median images/s {ips[len(ips)//2]:.1f}")
PY
done; done; done
