#!/usr/bin/env bash
# GPU check of data-parallel `caev2 train` (issue 10), on a lent GPU machine
# with torch 2.11.0 (CUDA) and no Rust toolchain; under 8 minutes. Prepare
# as for scripts/gpu-check.sh (.gpu/caev2, .gpu/libonnxruntime.so.1.31.1,
# .gpu/imagenet-mini), then there:
#
#   TORCH_LIB=/path/to/site-packages/torch/lib scripts/gpu-check-dist.sh
#
# Trains ViT-Tiny in fp32 for 20 steps of batch 32 on one GPU three ways:
# one plain process, a group of world size 1 on NCCL (--dist-backend nccl:
# the gradients all-reduced by NCCL on the GPU), and 2 ranks sharing the GPU
# (16 images each; NCCL needs a GPU per rank, so auto falls back to Gloo and
# says so), and prints each loss curve's largest relative difference from
# the plain process's, and each group's backend line.
set -uo pipefail
export LD_LIBRARY_PATH=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}:${LD_LIBRARY_PATH:-}
export ORT_DYLIB_PATH=$PWD/.gpu/libonnxruntime.so.1.31.1
B=.gpu/caev2
W=/tmp/caev2-gpu-dist
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf $W && mkdir -p $W/data
for i in 0 1 2 3; do for d in .gpu/imagenet-mini/*; do
  mkdir -p $W/data/$(basename $d)
  for f in $d/*; do cp $f $W/data/$(basename $d)/r$i-$(basename $f); done
done; done
$B extract --teacher tests/fixtures/tiny_vit.onnx --data $W/data --out $W/store --views 2 --threads 8 --decode-threads 8 --no-progress || exit 1
args() { echo train --shards $W/store --data $W/data --model tiny --out $W/$1 --batch 32 --steps 20 --lr 5e-4 --warmup-steps 2 \
  --device cuda --fp32 --threads 8 --no-progress --dist-timeout 120; }
$B $(args single) > $W/single.out 2>&1; echo "single process rc=$?"
RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 $B $(args world1) --dist-backend nccl > $W/world1.out 2>&1
echo "world size 1, NCCL rc=$?: $(grep -o 'data-parallel.*' $W/world1.out)"
for r in 0 1; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 $B $(args pair) > $W/pair-$r.out 2>&1 &
done
wait; echo "2 ranks sharing the GPU: $(grep -o 'data-parallel.*' $W/pair-0.out) $(grep -m1 error $W/pair-0.out)"
python3 - $W <<'PY'
import json, sys
w = sys.argv[1]
load = lambda r: [json.loads(l) for l in open(f"{w}/{r}/metrics.jsonl")]
ref = load("single")
print(f"single: loss {ref[0]['loss']:.5f} -> {ref[-1]['loss']:.5f}, median {sorted(m['images_per_sec'] for m in ref[2:])[len(ref[2:])//2]:.1f} img/s")
for run in ["world1", "pair"]:
    try:
        got = load(run)
    except OSError as e:
        print(f"{run}: no metrics ({e})"); continue
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, got))
    ips = sorted(m["images_per_sec"] for m in got[2:])[len(got[2:]) // 2]
    print(f"{run}: {len(got)} steps, largest relative loss difference {rel:.2e}, median {ips:.1f} img/s (global)")
PY
