#!/usr/bin/env bash
# caev2's GPU acceptance run (issue 23): one prepared run of at most 9
# minutes that checks what caev2 claims for GPUs, on a lent GPU machine or
# on your own GPU node before a long job. Details: scripts/gpu_acceptance.py.
#
#   here (where the project builds):  scripts/gpu-acceptance.sh prepare
#       fills .gpu/ (ignored; ~60 MiB: stripped binary and ONNX Runtime as
#       xz, ImageNet photos, a CLIP-B/16-shaped teacher of a few kB)
#   there (repo root, .gpu/ carried):  scripts/gpu-acceptance.sh run OUT
#       needs python3 with torch (libtorch for the binary, torchrun); prints
#       one table and writes OUT/results.json
#   a rehearsal on a CPU machine:     scripts/gpu-acceptance.sh run OUT --dry-run
#       every step at toy size on the CPU (tests/tests/gpu_acceptance.rs)
#
# On your own node without torch: run `scripts/setup.sh` there (its CUDA
# libraries come with it) and `source .deps/env.sh` before `run`; the binary
# then finds libtorch through LD_LIBRARY_PATH (TORCH_LIB overrides).
set -euo pipefail
exec python3 "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gpu_acceptance.py" "$@"
