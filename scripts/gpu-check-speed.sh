#!/usr/bin/env bash
# GPU speed check of issue 11, on a lent GPU machine with torch 2.11.0 (CUDA)
# and no Rust toolchain; about 5 minutes. Prepare here, run there:
#
#   here:  cargo build --release -p tools && mkdir -p .gpu && strip -o .gpu/caev2 target/release/caev2 \
#          && cp .deps/onnxruntime/libonnxruntime.so.1.31.1 .gpu/ && cp -r .deps/data/imagenet-mini .gpu/
#   there: TORCH_LIB=/path/to/site-packages/torch/lib scripts/gpu-check-speed.sh
#
# 1. the loader alone on all cores (224 px, batch 256): the most images/s it
#    can feed the GPU;
# 2. ViT-T/S/B training steps in bf16, images/s, TFLOP/s and MFU read from
#    metrics.jsonl (steps after the first window), and which side is the
#    bound (the loader when training reaches >= 90 % of the loader's rate);
# 3. the teacher on the GPU (extract --device cuda) against the CPU, when an
#    onnxruntime-gpu build is found (ORT_GPU_LIB, or a Python package).
set -uo pipefail
export LD_LIBRARY_PATH=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}:${LD_LIBRARY_PATH:-}
export ORT_DYLIB_PATH=$PWD/.gpu/libonnxruntime.so.1.31.1
B=.gpu/caev2
W=/tmp/caev2-gpu-speed
CORES=$(nproc)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rm -rf $W && mkdir -p $W/data
for i in $(seq 0 15); do for d in .gpu/imagenet-mini/*; do
  mkdir -p $W/data/$(basename $d)
  for f in $d/*; do cp $f $W/data/$(basename $d)/r$i-$(basename $f); done
done; done
$B extract --teacher tests/fixtures/tiny_vit.onnx --data $W/data --out $W/store --views 2 --device cpu \
  --threads $CORES --decode-threads $CORES --no-progress || exit 1

echo "== loader alone, $CORES threads"
$B train --shards $W/store --data $W/data --out $W/loader --batch 256 --steps 12 --loader-only --threads $CORES \
  | tee $W/loader.txt
LOADER=$(grep -Eo '= [0-9.]+ images/s' $W/loader.txt | grep -Eo '[0-9.]+')

for m in tiny small base; do
  batch=256; [ $m = base ] && batch=128
  run=$W/run-$m
  $B train --shards $W/store --data $W/data --model $m --out $run --batch $batch --steps 40 --lr 5e-4 --warmup-steps 2 \
    --device cuda --threads $CORES --metrics-every 10 --no-progress > $run.out 2>&1
  echo "== ViT-$m bf16 batch $batch rc=$? ($(head -1 $run.out))"
  python3 - $run/metrics.jsonl "$LOADER" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][10:]
loader = float(sys.argv[2] or 0)
ips = sorted(r["images_per_sec"] for r in rows); med = ips[len(ips) // 2]
tf = sorted(r["tflops"] for r in rows)[len(rows) // 2]
mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
mfu = f"{100 * sorted(mfu)[len(mfu) // 2]:.1f} %" if mfu else "n/a (unknown peak)"
bound = "loader" if loader and med >= 0.9 * loader else "GPU/host"
print(f"images/s {med:.0f}, model TFLOP/s {tf:.1f}, MFU {mfu}; loader alone {loader:.0f} images/s -> bound: {bound}")
PY
done

echo "== teacher on the GPU"
LIB=${ORT_GPU_LIB:-$(python3 - <<'PY' 2>/dev/null
import glob, os, onnxruntime as o
if "CUDAExecutionProvider" in o.get_available_providers():
    print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), "capi", "libonnxruntime.so.*")))[-1])
PY
)}
if [ -z "$LIB" ]; then
  echo "skipped: no onnxruntime-gpu here (set ORT_GPU_LIB to its libonnxruntime.so)"
else
  for dev in cpu cuda; do
    rm -rf $W/x-$dev
    ORT_DYLIB_PATH=$LIB $B extract --teacher tests/fixtures/tiny_vit.onnx --data $W/data --out $W/x-$dev --views 4 --device $dev \
      --threads $CORES --no-progress 2>&1 | head -1
  done
  $B inspect compare $W/x-cpu $W/x-cuda 2>&1 | tail -4
fi
