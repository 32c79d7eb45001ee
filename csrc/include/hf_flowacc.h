// Fused flow accumulation for pruning by flow: one pass over a layer that produces the masked
// weight gradient, the flow EMA over pruned weights, the score gradient with pressure, the Adam
// step on the scores and the new mask. The element body is shared by the CPU and CUDA builds.
#pragma once

#include <math.h>

#include "hf_common.h"
#include "hf_core.h"  // CpuTag / CudaTag

namespace hf {

struct FlowStepParams {
  std::uintptr_t weight;      // n, contiguous, read
  std::uintptr_t grad_eff;    // n, contiguous, read: dL/d(W ⊙ m)
  std::uintptr_t scores;      // n, contiguous, updated in place (Adam)
  std::uintptr_t flow;        // n, contiguous, updated in place (EMA on pruned entries)
  std::uintptr_t exp_avg;     // n, contiguous, updated in place
  std::uintptr_t exp_avg_sq;  // n, contiguous, updated in place
  std::uintptr_t grad_weight; // n, contiguous, written: grad_eff ⊙ m
  std::uintptr_t new_mask;    // n bytes (bool), written: scores_new >= 0
  std::int64_t n;
  // Scalars, precomputed on the host in double: step_size = lr / (1 - beta1^step),
  // bc2_sqrt = sqrt(1 - beta2^step).
  double flow_decay, ste_scale, pressure, beta1, beta2, step_size, bc2_sqrt, eps;
  bool check_finite;  // CPU: scan weight and grad_eff for NaN/Inf before touching any state
  int dtype;
  std::uintptr_t stream;
};

HF_ISA_BEGIN
// The per-element scalars in the compute type.
template <typename T>
struct FlowScalars {
  T decay, one_minus_decay, ste, pressure, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

template <typename T>
inline FlowScalars<T> flow_scalars(const FlowStepParams& p) {
  return FlowScalars<T>{static_cast<T>(p.flow_decay), static_cast<T>(1.0 - p.flow_decay), static_cast<T>(p.ste_scale),
                        static_cast<T>(p.pressure), static_cast<T>(1.0 - p.beta1), static_cast<T>(p.beta2),
                        static_cast<T>(1.0 - p.beta2), static_cast<T>(p.step_size), static_cast<T>(p.bc2_sqrt),
                        static_cast<T>(p.eps)};
}

HF_HD float hf_sqrt(float v) { return sqrtf(v); }
HF_HD double hf_sqrt(double v) { return sqrt(v); }
template <typename T>
HF_HD T hf_select(bool c, T a, T b) { return c ? a : b; }

// One element of the fused step. Same operation order as the eager torch sequence
// (flow_step_reference): lerp for exp_avg, mul + addcmul for exp_avg_sq, addcdiv for scores.
//
// V is the scalar type T on CUDA (and for the CPU tail), or a SIMD register type on the CPU
// (csrc/cpu/flowacc.cpp) that provides the same operators, comparisons, hf_select and hf_sqrt
// — so both back-ends run this exact arithmetic. Returns the new mask (t >= 0).
template <typename V, typename T>
HF_HD auto flow_step_elem(V w, V g, V& t, V& flow, V& m, V& v, V& grad_w, const FlowScalars<T>& s) {
  const V zero = V(T(0));
  const auto active = t >= zero;
  grad_w = hf_select(active, g, zero);
  const V wg = w * g;
  flow = hf_select(active, flow, V(s.decay) * flow + V(s.one_minus_decay) * wg);
  const V gt = V(s.ste) * wg + V(s.pressure);
  m = m + V(s.one_minus_beta1) * (gt - m);
  v = v * V(s.beta2) + V(s.one_minus_beta2) * gt * gt;
  const V denom = hf_sqrt(v) / V(s.bc2_sqrt) + V(s.eps);
  t = t - V(s.step_size) * (m / denom);
  return t >= zero;
}

// Element i of the step, read from and written back to the layer's arrays: the CUDA kernel's body
// and the CPU's scalar loop (its tail, and all of it without AVX-512).
template <typename T>
HF_HD void flow_step_at(const T* w, const T* g, T* t, T* flow, T* m, T* v, T* gw, std::uint8_t* mask, std::int64_t i,
                        const FlowScalars<T>& s) {
  T ti = t[i], fi = flow[i], mi = m[i], vi = v[i], gwi;
  const bool keep = flow_step_elem(w[i], g[i], ti, fi, mi, vi, gwi, s);
  t[i] = ti;
  flow[i] = fi;
  m[i] = mi;
  v[i] = vi;
  gw[i] = gwi;
  mask[i] = keep ? 1 : 0;
}

void flow_step(CpuTag, const FlowStepParams& p);
void flow_step(CudaTag, const FlowStepParams& p);

inline bool nothing_to_do(const FlowStepParams& p) { return p.n == 0; }

inline void check(const FlowStepParams& p) {
  require(p.n >= 0, "flow_step: negative size");
  require(p.n == 0 || (p.weight && p.grad_eff && p.scores && p.flow && p.exp_avg && p.exp_avg_sq && p.grad_weight &&
                       p.new_mask), "flow_step: null pointer");
  require(p.bc2_sqrt > 0.0 && p.eps >= 0.0, "flow_step: invalid Adam scalars (step must be >= 1, eps >= 0)");
}

HF_ISA_END
}  // namespace hf
