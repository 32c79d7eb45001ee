// Fused integration of a packed drift network (HyperFlow adaptation): every step, every stage,
// every task in one call. Parameter struct, the element bodies shared by the CPU and CUDA
// builds, and the entry points (overloaded on a back-end tag).
//
// Per task, step n, stage s of an explicit Runge-Kutta tableau (a, b):
//   y_s = y + dt * sum_{j<s} a[s][j] k_j
//   k_s = W_out silu(W_mid silu(W_in y_s + task_bias + time_table[n, s]) + b_mid) + b_out
//   inc = dt * sum_s b[s] k_s
// A task stops for good at the first step whose increment has a non-finite entry or an entry
// larger than max_increment in absolute value; it keeps its last good state and steps_done
// counts the accepted steps (hyperflow_ext/flow/solvers.py: odeint is the reference).
#pragma once

#include <math.h>
#include <string.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "hf_common.h"
#include "hf_core.h"  // CpuTag / CudaTag

namespace hf {

// Largest tableau the kernels accept (RK4 has 4 stages); fixes the CUDA argument block size.
constexpr int kDriftMaxStages = 8;

struct DriftParams {
  std::uintptr_t w_in;        // hidden x params, row-major
  std::uintptr_t w_mid;       // hidden x hidden, row-major
  std::uintptr_t b_mid;       // hidden
  std::uintptr_t w_out;       // params x hidden, row-major
  std::uintptr_t b_out;       // params
  std::uintptr_t task_bias;   // tasks x hidden, row-major
  std::uintptr_t time_table;  // steps x stages x hidden, row-major
  std::uintptr_t state;       // tasks x params, row-major; in: delta0, out: final state
  std::uintptr_t steps_done;  // tasks, int64; in: zeros, out: accepted steps per task
  std::int64_t tasks, params, hidden, steps, stages;
  std::vector<double> a;  // stages x stages, row-major; only the strict lower triangle is read
  std::vector<double> b;  // stages
  double dt, max_increment;
  int dtype;
  std::uintptr_t stream;  // cudaStream_t on CUDA, ignored on CPU
};

HF_ISA_BEGIN
// Tableau coefficients scaled by dt, in the compute type: what the element bodies read.
template <typename T>
struct DriftCoefs {
  T a[kDriftMaxStages * kDriftMaxStages];  // dt * a[s][j], zero where j >= s
  T b[kDriftMaxStages];                    // dt * b[s]
  bool has_a[kDriftMaxStages];             // stage s reads an earlier k (else y_s = y)
  T max_increment;
  int stages;
};

template <typename T>
inline DriftCoefs<T> drift_coefs(const DriftParams& p) {
  DriftCoefs<T> c{};
  c.stages = static_cast<int>(p.stages);
  // Same rounding as the reference: (dt * a) in double, then one cast to the compute type.
  for (int s = 0; s < c.stages; ++s) {
    c.has_a[s] = false;
    for (int j = 0; j < c.stages; ++j) {
      const double v = j < s ? p.dt * p.a[static_cast<std::size_t>(s * c.stages + j)] : 0.0;
      c.a[s * c.stages + j] = static_cast<T>(v);
      c.has_a[s] = c.has_a[s] || v != 0.0;
    }
    c.b[s] = static_cast<T>(p.dt * p.b[static_cast<std::size_t>(s)]);
  }
  c.max_increment = static_cast<T>(p.max_increment);
  return c;
}

// exp(x) as a polynomial (Cephes' expf / exp): round-to-nearest range reduction by a magic
// constant, no libm call and no branch, so the CPU loops vectorise and CUDA runs the same
// arithmetic. Agrees with libm to about 2 ulp; overflow gives +inf, deep underflow 2^-126
// (float) / 2^-1022 (double) times a value below 1 -- both absorbed by the 1 + exp(-x) of silu.
HF_HD float drift_pow2i(std::int32_t n) {  // 2^n for n in [-126, 127]
#if defined(__CUDA_ARCH__)
  return __int_as_float((n + 127) << 23);
#else
  const std::int32_t bits = (n + 127) << 23;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

HF_HD double drift_pow2i_d(std::int32_t n) {  // 2^n for n in [-1022, 1023]
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(n + 1023) << 52);
#else
  const std::int64_t bits = static_cast<std::int64_t>(n + 1023) << 52;
  double f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

HF_HD float drift_exp(float x) {
  const float hi = 88.0f, lo = -87.3365478515625f;
  float z = x >= lo ? x : lo;  // NaN becomes lo here; silu's own x keeps it NaN
  z = z <= hi ? z : hi;
  const float magic = 12582912.0f;  // 1.5 * 2^23: (v + magic) - magic rounds v to an integer
  const float n = (z * 1.44269504088896341f + magic) - magic;
  float r = z - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * drift_pow2i(static_cast<std::int32_t>(n));
  return x > hi ? HUGE_VALF : y;
}

HF_HD double drift_exp(double x) {
  const double hi = 709.0, lo = -708.39;
  double z = x >= lo ? x : lo;
  z = z <= hi ? z : hi;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double n = (z * 1.4426950408889634074 + magic) - magic;
  double r = z - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const double qx =
      ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
      2.00000000000000000009e0;
  const double y = (1.0 + 2.0 * (px / (qx - px))) * drift_pow2i_d(static_cast<std::int32_t>(n));
  return x > hi ? HUGE_VAL : y;
}

// silu(x) = x * sigmoid(x), written as torch's CPU kernel writes it: x / (1 + exp(-x)).
// silu(-inf) = NaN and silu(NaN) = NaN, as in torch.
template <typename T>
HF_HD T drift_silu(T x) { return x / (T(1) + drift_exp(-x)); }

// Stage input at parameter p: y[p] + sum_{j<s} (dt a[s][j]) k_j[p], zero coefficients skipped
// (as the reference does). k: stages x P, row-major.
template <typename T>
HF_HD T drift_stage_input(const T* y, const T* k, std::int64_t P, const DriftCoefs<T>& c, int s, std::int64_t p) {
  T v = y[p];
  for (int j = 0; j < s; ++j) {
    const T coef = c.a[s * c.stages + j];
    if (coef != T(0)) v += coef * k[j * P + p];
  }
  return v;
}

// The step's increment at parameter p: sum_s (dt b[s]) k_s[p], summed in stage order.
template <typename T>
HF_HD T drift_increment(const T* k, std::int64_t P, const DriftCoefs<T>& c, std::int64_t p) {
  T v = c.b[0] * k[p];
  for (int s = 1; s < c.stages; ++s) v += c.b[s] * k[s * P + p];
  return v;
}

// The divergence guard for one entry of the increment.
template <typename T>
HF_HD bool drift_increment_ok(T inc, T max_increment) {
  // Non-short-circuit `&`: no branch, so the CPU guard loop vectorises.
#if defined(__CUDA_ARCH__)
  return static_cast<bool>(isfinite(inc) & (fabs(inc) <= max_increment));
#else
  return static_cast<bool>(std::isfinite(inc) & (std::fabs(inc) <= max_increment));
#endif
}

// Partial dot product of one row with x over i = begin, begin + stride, ... < n: one lane's
// share of a row (CUDA: a warp per row, lane-strided; the CPU uses blocked SIMD tiles).
template <typename T>
HF_HD T drift_dot_strided(const T* w, const T* x, std::int64_t begin, std::int64_t n, std::int64_t stride) {
  T acc = T(0);
  for (std::int64_t i = begin; i < n; i += stride) acc += w[i] * x[i];
  return acc;
}

void drift_integrate(CpuTag, const DriftParams& p);
void drift_integrate(CudaTag, const DriftParams& p);

inline void check(const DriftParams& p) {
  const char* op = "drift_integrate";
  require(p.w_in && p.w_mid && p.b_mid && p.w_out && p.b_out && p.task_bias && p.time_table && p.state &&
              p.steps_done,
          std::string(op) + ": null pointer");
  require(p.tasks > 0 && p.params > 0 && p.hidden > 0 && p.steps > 0 && p.stages > 0,
          std::string(op) + ": tasks, params, hidden, steps and stages must be positive, got tasks=" +
              std::to_string(p.tasks) + ", params=" + std::to_string(p.params) + ", hidden=" +
              std::to_string(p.hidden) + ", steps=" + std::to_string(p.steps) + ", stages=" +
              std::to_string(p.stages));
  require(p.stages <= kDriftMaxStages,
          std::string(op) + ": at most " + std::to_string(kDriftMaxStages) + " stages, got " +
              std::to_string(p.stages));
  require(static_cast<std::int64_t>(p.a.size()) == p.stages * p.stages,
          std::string(op) + ": a must hold stages*stages = " + std::to_string(p.stages * p.stages) +
              " coefficients, got " + std::to_string(p.a.size()));
  require(static_cast<std::int64_t>(p.b.size()) == p.stages,
          std::string(op) + ": b must hold stages = " + std::to_string(p.stages) + " coefficients, got " +
              std::to_string(p.b.size()));
  require(std::isfinite(p.dt), std::string(op) + ": dt must be finite");
  require(p.max_increment > 0.0, std::string(op) + ": max_increment must be > 0");
}

HF_ISA_END
}  // namespace hf
