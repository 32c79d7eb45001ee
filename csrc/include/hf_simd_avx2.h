// AVX2 + FMA vector traits of the CPU sparse kernels (hf_sparse_cpu.h): the same interface as the
// AVX-512 traits (hf_simd_avx512.h) over 256-bit registers, so one kernel body serves both. AVX2 has
// no mask registers: a lane mask M is an integer bit set (bit k = lane k; bits >= W ignored), turned
// into a vector mask for vmaskmov / masked gathers, which, like AVX-512's masked loads, never touch
// the memory of inactive lanes. Included only by translation units compiled with the AVX2 flags
// (HF_ISA=avx2), inside namespace hf::<isa>::cpu. vmaskmov is slow on AMD (the masked store is
// microcoded on Zen 2-4), so a mask covering every lane takes the plain load / store: kernels written
// for AVX-512's free masks pass full masks in their main loops.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace hf {
HF_ISA_BEGIN
namespace cpu {

// Expand-load permutations: idx[m][l] = the number of set bits of m below lane l, i.e. which of the
// packed source elements lane l takes (0 for lanes outside m, which are cleared afterwards).
struct ExpandTable {
  std::int32_t idx[256][8];
  constexpr ExpandTable() : idx() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int l = 0; l < 8; ++l) {
        idx[m][l] = (m >> l) & 1 ? k : 0;
        k += (m >> l) & 1;
      }
    }
  }
};
inline constexpr ExpandTable kExpand{};

// Nonzero bytes among the n <= 8 at p (bit k: p[k] != 0); reads only p[0, n).
inline unsigned nonzero_bytes(const std::uint8_t* p, int n) {
  std::uint64_t word = 0;
  if (n >= 8) std::memcpy(&word, p, 8); else std::memcpy(&word, p, static_cast<std::size_t>(n));
  const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(word));
  return ~static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_setzero_si128()))) & ((1u << n) - 1u);
}

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using R = __m256;
  using M = unsigned;
  static constexpr int W = 8;
  // CSR mat-vec: rows averaging at least this many nonzeros take the gathers (csr_spmv_rows), shorter
  // ones the scalar loop. Zen 4, 1024 rows: 10 a row 5.9 (gathers) vs 5.6 us (scalar), 15 a row 7.0 vs 8.6 us.
  static constexpr int gather_row_nnz = 12;
  static __m256i vmask(M m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bit), bit);
  }
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R loadz(M m, const float* p) { return (m & 0xFFu) == 0xFFu ? load(p) : _mm256_maskload_ps(p, vmask(m)); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }  // b where either is NaN
  static R zero_unless(M m, R v) { return _mm256_and_ps(v, _mm256_castsi256_ps(vmask(m))); }  // +0 outside m
  // The even / odd lanes of the 2W values a, b (a's first): shuffle in 128-bit halves, then order
  // the 64-bit pairs.
  static R even(R a, R b) {
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
  }
  static R odd(R a, R b) {
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8));
  }
  // The lanes in m filled, in order, from p[0, popcount(m)) (zero elsewhere): reads nothing else.
  static R expandz(M m, const float* p) {
    m &= 0xFFu;
    const R packed = loadz(tail(__builtin_popcount(m)), p);
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), _mm256_castsi256_ps(vmask(m)));
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(M m, float* p, R v) {
    if ((m & 0xFFu) == 0xFFu) store(p, v); else _mm256_maskstore_ps(p, vmask(m), v);
  }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static M tail(std::int64_t n) { return (1u << n) - 1u; }  // n < W (n == W: all lanes, too)
  static M active(const std::uint8_t* m, M valid) { return nonzero_bytes(m, __builtin_popcount(valid & 0xFFu)); }
  static M active(const std::uint8_t* m) { return nonzero_bytes(m, 8); }
  // base[idx[k]] for the lanes in m (zero elsewhere); idx lanes outside m are not read. A full mask
  // takes eight scalar loads: vgatherdps is microcoded on AMD (and slowed by Intel's GDS mitigation);
  // on Zen 4 the scalar loads halved csr_linear's batch-1 time (4096^2 at 90 %: 1.31 -> 0.69 ms).
  static R gather(M m, const std::int32_t* idx, const float* base) {
    if ((m & 0xFFu) == 0xFFu) {
      const __m128 lo = _mm_setr_ps(base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]]);
      const __m128 hi = _mm_setr_ps(base[idx[4]], base[idx[5]], base[idx[6]], base[idx[7]]);
      return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    }
    const __m256i k = vmask(m);
    const __m256i i = _mm256_maskload_epi32(idx, k);
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, i, _mm256_castsi256_ps(k), 4);
  }
};

template <>
struct Simd<double> {
  using R = __m256d;
  using M = unsigned;
  static constexpr int W = 4;
  static constexpr int gather_row_nnz = 12;  // as for float (unmeasured)
  static __m256i vmask(M m) {
    const __m256i bit = _mm256_setr_epi64x(1, 2, 4, 8);
    return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(static_cast<long long>(m)), bit), bit);
  }
  static R zero() { return _mm256_setzero_pd(); }
  static R set1(double v) { return _mm256_set1_pd(v); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static R loadz(M m, const double* p) { return (m & 0xFu) == 0xFu ? load(p) : _mm256_maskload_pd(p, vmask(m)); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static R zero_unless(M m, R v) { return _mm256_and_pd(v, _mm256_castsi256_pd(vmask(m))); }
  static R even(R a, R b) { return _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8); }
  static R odd(R a, R b) { return _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), 0xD8); }
  static R expandz(M m, const double* p) {
    m &= 0xFu;
    const R packed = loadz(tail(__builtin_popcount(m)), p);
    // 64-bit lane l takes source lane s = kExpand.idx[m][l]: the float pair (2s, 2s + 1).
    const __m256i s = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kExpand.idx[m])));
    const __m256i pair = _mm256_or_si256(_mm256_slli_epi64(_mm256_add_epi64(s, s), 32), _mm256_add_epi64(s, s));
    const __m256i idx = _mm256_add_epi32(pair, _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1));
    const __m256 moved = _mm256_permutevar8x32_ps(_mm256_castpd_ps(packed), idx);
    return _mm256_and_pd(_mm256_castps_pd(moved), _mm256_castsi256_pd(vmask(m)));
  }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static void store(M m, double* p, R v) {
    if ((m & 0xFu) == 0xFu) store(p, v); else _mm256_maskstore_pd(p, vmask(m), v);
  }
  static double sum(R v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static M tail(std::int64_t n) { return (1u << n) - 1u; }
  static M active(const std::uint8_t* m, M valid) { return nonzero_bytes(m, __builtin_popcount(valid & 0xFu)); }
  static M active(const std::uint8_t* m) { return nonzero_bytes(m, 4); }
  static R gather(M m, const std::int32_t* idx, const double* base) {
    if ((m & 0xFu) == 0xFu)  // scalar loads, as for float
      return _mm256_setr_pd(base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]]);
    const __m256i k = vmask(m);
    const __m128i kk = _mm_setr_epi32(m & 1u ? -1 : 0, m & 2u ? -1 : 0, m & 4u ? -1 : 0, m & 8u ? -1 : 0);
    const __m128i i = _mm_maskload_epi32(idx, kk);
    return _mm256_mask_i32gather_pd(_mm256_setzero_pd(), base, i, _mm256_castsi256_pd(k), 8);
  }
};

// In-register transpose of a W x W block (8 floats / 4 doubles): r[i] holds row i on entry and
// column i on exit.
inline void transpose_regs(__m256 r[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // u[4i+k], 128-bit half h: rows 4i..4i+3 of column 4h+k
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
    r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
  }
}

inline void transpose_regs(__m256d r[4]) {
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
  r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
  r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
  r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

}  // namespace cpu
HF_ISA_END
}  // namespace hf
