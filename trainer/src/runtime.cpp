// What tch does not expose of libtorch: the CUDA autocast dtype (tch 0.24
// can switch autocast on, but it defaults to float16; CAE v2 trains in
// bfloat16) and the library's version (for a run's provenance).
#include <ATen/autocast_mode.h>
#include <torch/version.h>

extern "C" int caev2_set_cuda_autocast_bf16() {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    return 0;
  } catch (...) {
    return 1;
  }
}

extern "C" const char* caev2_torch_version() { return TORCH_VERSION; }
