// AVX-512 vector traits of the CPU sparse kernels (hf_sparse_cpu.h): Simd<float> / Simd<double> over
// 512-bit registers with __mmask16 / __mmask8 lane masks, and the in-register W x W transposes.
// Included only by translation units compiled with the AVX-512 flags (HF_ISA=avx512), inside
// namespace hf::<isa>::cpu.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace hf {
HF_ISA_BEGIN
namespace cpu {

// The W lanes of v added in lane order (not a tree): the sum a scalar loop over them gives.
template <typename T, int W, typename R>
inline T sum_in_lane_order(R v) {
  static_assert(sizeof(R) == W * sizeof(T), "W lanes of T per register");
  alignas(64) T t[W];
  std::memcpy(t, &v, sizeof(t));
  T a = T(0);
  for (int i = 0; i < W; ++i) a += t[i];
  return a;
}

// The few AVX-512 operations the kernels need, per scalar type (the sparse kernels, and the flow
// step's register type in csrc/cpu/flowacc.cpp).
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  // CSR mat-vec: rows averaging at least this many nonzeros take the gathers (csr_spmv_rows), shorter
  // ones the scalar loop. Zen 4, 1024 rows: 10 a row 8.5 (gathers) vs 4.9 us (scalar), 20 a row 13.8 vs 13.2 us.
  static constexpr int gather_row_nnz = 20;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R loadz(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  static R zero_unless(M m, R v) { return _mm512_maskz_mov_ps(m, v); }  // +0 outside m
  // Element-wise arithmetic for the flow step's register type (csrc/cpu/flowacc.cpp).
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R sqrt(R a) { return _mm512_maskz_sqrt_ps(static_cast<M>(0xFFFF), a); }
  static M ge(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }  // false where either is NaN
  static R select(M m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }  // a in the lanes of m, else b
  // The even lanes of the 2W values a, b (a's lanes first): a stride-2 row de-interleaved.
  static R even(R a, R b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
  }
  static R odd(R a, R b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
  }
  // The lanes in m filled, in order, from p[0, popcount(m)) (zero elsewhere): reads nothing else.
  static R expandz(M m, const float* p) { return _mm512_maskz_expandloadu_ps(m, p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(M m, float* p, R v) { _mm512_mask_storeu_ps(p, m, v); }
  static float sum(R v) { return sum_in_lane_order<float, W>(v); }
  static M tail(std::int64_t n) { return static_cast<M>((1u << n) - 1u); }  // n < W
  // Active lanes of W mask bytes (nonzero byte = active); `full` lanes valid, rest cleared.
  static M active(const std::uint8_t* m, M valid) {
    const __m128i v = _mm_maskz_loadu_epi8(valid, m);
    return _mm_test_epi8_mask(v, v);
  }
  static M active(const std::uint8_t* m) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
    return _mm_test_epi8_mask(v, v);
  }
  // base[idx[k]] for the lanes in m (zero elsewhere); idx lanes outside m are not read.
  static R gather(M m, const std::int32_t* idx, const float* base) {
    const __m512i i = _mm512_maskz_loadu_epi32(m, idx);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, base, 4);
  }
};

template <>
struct Simd<double> {
  using R = __m512d;
  using M = __mmask8;
  static constexpr int W = 8;
  static constexpr int gather_row_nnz = 20;  // as for float (unmeasured)
  static R zero() { return _mm512_setzero_pd(); }
  static R set1(double v) { return _mm512_set1_pd(v); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static R loadz(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }  // b where either is NaN
  static R zero_unless(M m, R v) { return _mm512_maskz_mov_pd(m, v); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R div(R a, R b) { return _mm512_div_pd(a, b); }
  static R sqrt(R a) { return _mm512_maskz_sqrt_pd(static_cast<M>(0xFF), a); }
  static M ge(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ); }
  static R select(M m, R a, R b) { return _mm512_mask_blend_pd(m, b, a); }
  static R even(R a, R b) { return _mm512_permutex2var_pd(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b); }
  static R odd(R a, R b) { return _mm512_permutex2var_pd(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b); }
  static R expandz(M m, const double* p) { return _mm512_maskz_expandloadu_pd(m, p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static void store(M m, double* p, R v) { _mm512_mask_storeu_pd(p, m, v); }
  static double sum(R v) { return sum_in_lane_order<double, W>(v); }
  static M tail(std::int64_t n) { return static_cast<M>((1u << n) - 1u); }
  static M active(const std::uint8_t* m, M valid) {
    const __m128i v = _mm_maskz_loadu_epi8(static_cast<__mmask16>(valid), m);
    return static_cast<M>(_mm_test_epi8_mask(v, v));
  }
  static M active(const std::uint8_t* m) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m));
    return static_cast<M>(_mm_test_epi8_mask(v, v));
  }
  static R gather(M m, const std::int32_t* idx, const double* base) {
    const __m256i i = _mm256_maskz_loadu_epi32(m, idx);
    return _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, i, base, 8);
  }
};

// In-register transpose of a W x W block (W = 16 floats or 8 doubles): r[i] holds row i on
// entry and column i on exit. Unpack / shuffle within 128-bit lanes, then two rounds of
// 128-bit lane shuffles.
inline void transpose_regs(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // u[4i+k], lane L: rows 4i..4i+3 of column 4L+k
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512 a = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), d = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(a, c, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(a, c, 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(b, d, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

inline void transpose_regs(__m512d r[8]) {
  __m512d t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // t[2i+k], lane L: rows 2i, 2i+1 of column 2L+k
    t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k) {
    const __m512d a = _mm512_shuffle_f64x2(t[k], t[2 + k], 0x88), b = _mm512_shuffle_f64x2(t[k], t[2 + k], 0xDD);
    const __m512d c = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0x88), d = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0xDD);
    r[k] = _mm512_shuffle_f64x2(a, c, 0x88);
    r[4 + k] = _mm512_shuffle_f64x2(a, c, 0xDD);
    r[2 + k] = _mm512_shuffle_f64x2(b, d, 0x88);
    r[6 + k] = _mm512_shuffle_f64x2(b, d, 0xDD);
  }
}

}  // namespace cpu
HF_ISA_END
}  // namespace hf
