// tch 0.24 can switch CUDA autocast on, but not choose its dtype (it
// defaults to float16). CAE v2 trains in bfloat16; this one-line shim sets
// the CUDA autocast dtype through ATen's public API.
#include <ATen/autocast_mode.h>

extern "C" int caev2_set_cuda_autocast_bf16() {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    return 0;
  } catch (...) {
    return 1;
  }
}
