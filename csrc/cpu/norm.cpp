// CPU kernel for the in-place group norm: OpenMP over samples; per sample three passes over its
// NHWC map (channel sums, centred sums of squares, scale + shift + ReLU), each with the channel
// loop innermost and contiguous. Accumulation is in double.
#include "hf_norm.h"

#include <vector>

namespace hf {
HF_ISA_BEGIN

void group_norm_(CpuTag, const GroupNormParams& p) {
  checked_dispatch(p, "group_norm_", [&](auto zero) {
    using T = decltype(zero);
    T* x = ptr<T>(p.x);
    const T* weight = ptr<const T>(p.weight);
    const T* bias = ptr<const T>(p.bias);
    const std::int64_t hw = p.hw, c = p.c, k = p.c / p.groups;
    const double count = static_cast<double>(hw * k);
#pragma omp parallel for schedule(static)
    for (std::int64_t s = 0; s < p.n; ++s) {
      T* xs = x + s * hw * c;
      std::vector<double> acc(c, 0.0), mean(p.groups, 0.0), var(p.groups, 0.0);
      std::vector<T> centre(c), scale(c), shift(c);
      for (std::int64_t i = 0; i < hw; ++i)
        for (std::int64_t ch = 0; ch < c; ++ch) acc[ch] += xs[i * c + ch];
      for (std::int64_t ch = 0; ch < c; ++ch) mean[ch / k] += acc[ch];
      for (std::int64_t g = 0; g < p.groups; ++g) mean[g] /= count;
      for (std::int64_t ch = 0; ch < c; ++ch) {
        centre[ch] = static_cast<T>(mean[ch / k]);
        acc[ch] = 0.0;
      }
      for (std::int64_t i = 0; i < hw; ++i)
        for (std::int64_t ch = 0; ch < c; ++ch) {
          const double d = static_cast<double>(xs[i * c + ch] - centre[ch]);
          acc[ch] += d * d;
        }
      for (std::int64_t ch = 0; ch < c; ++ch) var[ch / k] += acc[ch];
      for (std::int64_t ch = 0; ch < c; ++ch)
        group_norm_affine<T>(mean[ch / k], var[ch / k] / count, p.eps, weight, bias, ch, scale[ch], shift[ch]);
      for (std::int64_t i = 0; i < hw; ++i)
#pragma omp simd
        for (std::int64_t ch = 0; ch < c; ++ch)
          xs[i * c + ch] = group_norm_apply(xs[i * c + ch], scale[ch], shift[ch], p.relu);
    }
  });
}

HF_ISA_END
}  // namespace hf
