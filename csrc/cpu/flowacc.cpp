// CPU kernel for the fused flow step: one OpenMP + SIMD pass over the layer (plus, when asked,
// a read-only NaN/Inf scan of weight and grad_eff first, so bad input changes no state).
//
// The loop runs the shared element body flow_step_elem on AVX-512 registers through a thin
// operator wrapper (GCC will not vectorise a scalar sqrtf call without -fno-math-errno), and on
// scalars for the tail and on machines without AVX-512.
#include "hf_flowacc.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HF_FLOW_AVX512 1
#include "hf_simd_avx512.h"
#endif

namespace hf {
HF_ISA_BEGIN

#if HF_FLOW_AVX512
// An AVX-512 register of T with the operators flow_step_elem uses, over the Simd<T> traits.
template <typename T>
struct Vec {
  using S = cpu::Simd<T>;
  using Mask = typename S::M;
  static constexpr int W = S::W;
  typename S::R r;
  Vec(T s) : r(S::set1(s)) {}  // NOLINT: broadcast, implicit on purpose
  explicit Vec(typename S::R v) : r(v) {}
  static Vec load(const T* p) { return Vec(S::load(p)); }
  void store(T* p) const { S::store(p, r); }
  friend Vec operator+(Vec a, Vec b) { return Vec(S::add(a.r, b.r)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(S::sub(a.r, b.r)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(S::mul(a.r, b.r)); }
  friend Vec operator/(Vec a, Vec b) { return Vec(S::div(a.r, b.r)); }
  friend Mask operator>=(Vec a, Vec b) { return S::ge(a.r, b.r); }
  friend Vec hf_select(Mask c, Vec a, Vec b) { return Vec(S::select(c, a.r, b.r)); }
  friend Vec hf_sqrt(Vec a) { return Vec(S::sqrt(a.r)); }
};

inline void store_mask_bytes(std::uint8_t* p, __mmask16 k) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_maskz_set1_epi8(k, 1)); }
inline void store_mask_bytes(std::uint8_t* p, __mmask8 k) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_maskz_set1_epi8(static_cast<__mmask16>(k), 1));
}
#endif

namespace {

// Elements [i0, i1) with the scalar element body (the CUDA kernel's, one element a thread there).
template <typename T>
inline void flow_step_scalar(const T* w, const T* g, T* t, T* flow, T* m, T* v, T* gw, std::uint8_t* mask,
                             std::int64_t i0, std::int64_t i1, const FlowScalars<T>& s) {
  for (std::int64_t i = i0; i < i1; ++i) flow_step_at(w, g, t, flow, m, v, gw, mask, i, s);
}

constexpr std::int64_t kParallelMin = 1 << 15;

// 0 when a and b are all finite; bit 0 set for a non-finite entry of a, bit 1 for b.
template <typename T>
int nonfinite_bits(const T* a, const T* b, std::int64_t n) {
  const T big = std::numeric_limits<T>::max();
  int bad_a = 0, bad_b = 0;
#pragma omp parallel for simd schedule(static) reduction(| : bad_a, bad_b) if (n > kParallelMin)
  for (std::int64_t i = 0; i < n; ++i) {
    bad_a |= !(std::fabs(a[i]) <= big);
    bad_b |= !(std::fabs(b[i]) <= big);
  }
  return (bad_a ? 1 : 0) | (bad_b ? 2 : 0);
}

}  // namespace

void flow_step(CpuTag, const FlowStepParams& p) {
  checked_dispatch(p, "flow_step", [&](auto zero) {
    using T = decltype(zero);
    const T* w = ptr<const T>(p.weight);
    const T* g = ptr<const T>(p.grad_eff);
    if (p.check_finite) {
      const int bad = nonfinite_bits(w, g, p.n);
      require(!(bad & 1), "flow_step: weight contains NaN or Inf");
      require(!(bad & 2), "flow_step: grad_eff contains NaN or Inf");
    }
    T* t = ptr<T>(p.scores);
    T* flow = ptr<T>(p.flow);
    T* m = ptr<T>(p.exp_avg);
    T* v = ptr<T>(p.exp_avg_sq);
    T* gw = ptr<T>(p.grad_weight);
    std::uint8_t* mask = ptr<std::uint8_t>(p.new_mask);
    const FlowScalars<T> s = flow_scalars<T>(p);
    const std::int64_t n = p.n;
#if HF_FLOW_AVX512
    using VT = Vec<T>;
    constexpr std::int64_t W = VT::W;
    const std::int64_t nv = n / W;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t b = 0; b < nv; ++b) {
      const std::int64_t i = b * W;
      VT ti = VT::load(t + i), fi = VT::load(flow + i), mi = VT::load(m + i), vi = VT::load(v + i), gwi(T(0));
      const auto keep = flow_step_elem(VT::load(w + i), VT::load(g + i), ti, fi, mi, vi, gwi, s);
      ti.store(t + i);
      fi.store(flow + i);
      mi.store(m + i);
      vi.store(v + i);
      gwi.store(gw + i);
      store_mask_bytes(mask + i, keep);
    }
    flow_step_scalar(w, g, t, flow, m, v, gw, mask, nv * W, n, s);
#else
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t b = 0; b < (n + 1023) / 1024; ++b)
      flow_step_scalar(w, g, t, flow, m, v, gw, mask, b * 1024, std::min(n, b * 1024 + 1024), s);
#endif
  });
}

HF_ISA_END
}  // namespace hf
