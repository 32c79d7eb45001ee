// In-place group normalisation (+ optional ReLU) of a channels-last (NHWC) map, for inference.
// Parameter struct, shared arithmetic, and the CPU / CUDA entry points.
#pragma once

#include <cmath>

#include "hf_common.h"
#include "hf_core.h"

namespace hf {

struct GroupNormParams {
  std::uintptr_t x;       // n x hw x c, contiguous (NHWC), normalised in place
  std::uintptr_t weight;  // c, or 0 (no affine)
  std::uintptr_t bias;    // c, or 0 (no affine)
  std::int64_t n, hw, c, groups;
  double eps;
  bool relu;
  int dtype;
  std::uintptr_t stream;
};

HF_ISA_BEGIN
// Per-channel scale and shift from its group's mean and (biased) variance, as GroupNorm folds them.
template <typename T>
HF_HD void group_norm_affine(double mean, double var, double eps, const T* weight, const T* bias, std::int64_t ch,
                             T& scale, T& shift) {
  const double s = (weight ? static_cast<double>(weight[ch]) : 1.0) / sqrt(var + eps);
  scale = static_cast<T>(s);
  shift = static_cast<T>((bias ? static_cast<double>(bias[ch]) : 0.0) - mean * s);
}

template <typename T>
HF_HD T group_norm_apply(T x, T scale, T shift, bool relu) {
  const T y = x * scale + shift;
  return relu && !(y > T(0)) && y == y ? T(0) : y;  // ReLU that keeps NaN, like torch.relu
}

void group_norm_(CpuTag, const GroupNormParams& p);
void group_norm_(CudaTag, const GroupNormParams& p);

inline void check(const GroupNormParams& p) {
  require(p.x != 0, "group_norm_: null pointer");
  require(p.n >= 0 && p.hw > 0 && p.c > 0 && p.groups > 0, "group_norm_: sizes must be positive");
  require(p.c % p.groups == 0, "group_norm_: channels must be divisible by groups");
  require((p.weight == 0) == (p.bias == 0), "group_norm_: weight and bias come together");
  require(p.eps >= 0, "group_norm_: eps must be >= 0");
}

// An empty batch: nothing to normalise (both back-ends return before dispatching).
inline bool nothing_to_do(const GroupNormParams& p) { return p.n == 0; }

HF_ISA_END
}  // namespace hf
