// The optimiser's two multi-tensor kernels, which tch 0.24 does not wrap:
// ATen's fused AdamW (`_fused_adamw_`, one kernel over every parameter of a
// group, on CPU and CUDA) and gradient-norm clipping with `_foreach_norm` /
// `_foreach_mul_` that never reads a value back to the host. Tensors come
// from tch as `at::Tensor*`; every C++ exception becomes an error message.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

void fail(const char* what, char* err, size_t len) {
  if (len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

}  // namespace

// One AdamW step over `n` parameters with their gradients and moments; the
// step count (a float tensor on the parameters' device, already advanced)
// is shared by all of them.
extern "C" int caev2_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** m, at::Tensor** v, size_t n,
                                 at::Tensor* step, double lr, double beta1, double beta2, double weight_decay, double eps,
                                 char* err, size_t len) {
  try {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(list(params, n), list(grads, n), list(m, n), list(v, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    fail(e.what(), err, len);
    return 1;
  }
}

// timm's clip_grad_norm_ without a host sync: the global L2 norm of `n`
// gradients (written to *norm as a new float tensor on their device), then
// every gradient times min(1, max / (norm + 1e-6)).
extern "C" int caev2_clip_grad_norm(at::Tensor** grads, size_t n, double max, at::Tensor** norm, char* err, size_t len) {
  try {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> g = list(grads, n);
    std::vector<at::Tensor> norms = at::_foreach_norm(g, 2);
    at::Tensor total = at::stack(norms).to(at::kFloat).norm();
    at::Tensor coef = (max / (total + 1e-6)).clamp_max(1.0);
    at::_foreach_mul_(g, coef);
    *norm = new at::Tensor(total);
    return 0;
  } catch (const std::exception& e) {
    fail(e.what(), err, len);
    return 1;
  }
}
