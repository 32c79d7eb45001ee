// CPU building blocks of the sparse kernels (host only; included by csrc/cpu/*.cpp):
//
//  * gather_row: out[c] = sum_j val[j] * d[idx[j], c] for c < ncols — one sparse row times a
//    dense row-major matrix, in register-resident column chunks (two interleaved accumulator
//    sets per chunk, so a 64-float chunk keeps 8 independent FMA chains in flight);
//  * compact_mask_row: the active column indices of a mask row (and the weights there), 64
//    mask bytes per AVX-512 test when available;
//  * transpose_into: a strided (rows x cols) matrix into a padded row-major (cols x ld) buffer;
//  * scratch: per-thread growable buffers reused across calls (no page faults per call).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace hf {
namespace cpu {

// Bytes per SIMD register the chunk widths are built from (64: AVX-512; still correct and
// reasonable with AVX2, where a chunk is two registers).
constexpr int kVecBytes = 64;
template <typename T>
constexpr int vec_width() { return kVecBytes / static_cast<int>(sizeof(T)); }

inline std::int64_t round_up(std::int64_t v, std::int64_t m) { return (v + m - 1) / m * m; }

// Threads a parallel region started here would get (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// A 64-byte aligned per-thread buffer of at least `count` T's; `slot` separates buffers that
// must be live at the same time. Contents are unspecified.
template <typename T>
T* scratch(int slot, std::int64_t count) {
  thread_local std::vector<unsigned char> bufs[6];
  auto& b = bufs[slot];
  const std::size_t bytes = static_cast<std::size_t>(count > 0 ? count : 1) * sizeof(T) + 64;
  if (b.size() < bytes) b.resize(bytes);
  const auto p = (reinterpret_cast<std::uintptr_t>(b.data()) + 63) & ~static_cast<std::uintptr_t>(63);
  return reinterpret_cast<T*>(p);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HF_SPARSE_AVX512 1

// The few AVX-512 operations the kernels need, per scalar type.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R loadz(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // b where either is NaN
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
  static float sum(R v) {
    alignas(64) float t[W];
    _mm512_store_ps(t, v);
    float a = 0.0f;
    for (int i = 0; i < W; ++i) a += t[i];
    return a;
  }
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
  static R zero() { return _mm512_setzero_pd(); }
  static R set1(double v) { return _mm512_set1_pd(v); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static R loadz(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }  // b where either is NaN
  static R even(R a, R b) { return _mm512_permutex2var_pd(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b); }
  static R odd(R a, R b) { return _mm512_permutex2var_pd(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b); }
  static R expandz(M m, const double* p) { return _mm512_maskz_expandloadu_pd(m, p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static void store(M m, double* p, R v) { _mm512_mask_storeu_pd(p, m, v); }
  static double sum(R v) {
    alignas(64) double t[W];
    _mm512_store_pd(t, v);
    double a = 0.0;
    for (int i = 0; i < W; ++i) a += t[i];
    return a;
  }
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

// dst[c * ldd + r] = src[r * lds + c] (+ add[r] when add) for r < nr, c < nc (nr, nc <= W).
template <typename T>
inline void transpose_block(const T* __restrict src, std::int64_t lds, std::int64_t nr, std::int64_t nc,
                            T* __restrict dst, std::int64_t ldd, const T* __restrict add) {
  using S = Simd<T>;
  constexpr int W = S::W;
  typename S::R r[W];
  const typename S::M cm = nc >= W ? static_cast<typename S::M>(~0u) : S::tail(nc);
  const typename S::M rm = nr >= W ? static_cast<typename S::M>(~0u) : S::tail(nr);
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) r[i] = i < nr ? S::loadz(cm, src + i * lds) : S::zero();
  transpose_regs(r);
  const typename S::R a = add ? S::loadz(rm, add) : S::zero();
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i)
    if (i < nc) S::store(rm, dst + i * ldd, S::add(r[i], a));
}

// y[r0 + i] = (sum of the lanes of acc[i]) (+ bias[r0 + i]) for i < nr <= W: one register
// transpose turns the W per-row accumulators into a single vector of row sums.
template <typename T>
inline void store_row_sums(typename Simd<T>::R acc[Simd<T>::W], std::int64_t r0, std::int64_t nr,
                           const T* __restrict bias, T* __restrict y) {
  using S = Simd<T>;
  constexpr int W = S::W;
  transpose_regs(acc);
  typename S::R sum = acc[0];
#pragma GCC unroll 16
  for (int i = 1; i < W; ++i) sum = S::add(sum, acc[i]);
  const typename S::M rm = nr >= W ? static_cast<typename S::M>(~0u) : S::tail(nr);
  if (bias) sum = S::add(sum, S::loadz(rm, bias + r0));
  S::store(rm, y + r0, sum);
}

// y[r0 + i] = sum_j val[j] * x[col[j]] (+ bias) for the nr <= W rows starting at r0 (CSR
// mat-vec, int32 indices, x contiguous): each row is a few masked gathers with no
// data-dependent branch for rows of up to W nonzeros, and the W row sums come out of one
// register transpose instead of W horizontal reductions.
template <typename T>
inline void csr_spmv_rows(const std::int32_t* __restrict rowptr, const std::int32_t* __restrict col,
                          const T* __restrict val, const T* __restrict x, std::int64_t r0, std::int64_t nr,
                          const T* __restrict bias, T* __restrict y) {
  using S = Simd<T>;
  constexpr int W = S::W;
  typename S::R acc[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) {
    acc[i] = S::zero();
    if (i < nr) {
      std::int64_t j = rowptr[r0 + i];
      const std::int64_t end = rowptr[r0 + i + 1];
      for (; j + W <= end; j += W)
        acc[i] = S::fma(S::load(val + j), S::gather(static_cast<typename S::M>(~0u), col + j, x), acc[i]);
      if (j < end) {
        const typename S::M m = S::tail(end - j);
        acc[i] = S::fma(S::loadz(m, val + j), S::gather(m, col + j, x), acc[i]);
      }
    }
  }
  store_row_sums(acc, r0, nr, bias, y);
}

// The accumulators of out[c0 : c0 + NV*W] (the last register masked by `last` when TAIL) =
//   sum_j val[j] * d[idx[j] * ld + c0 : ...], with NS interleaved accumulator sets so NV*NS
// independent FMA chains are in flight; all accumulators stay in registers. Each finished register
// goes to emit(c, acc, mask) (c: its first column, a multiple of W; mask: its valid lanes).
template <int NV, int NS, bool TAIL, typename T, typename I, class Emit>
inline __attribute__((always_inline)) void gather_chunk(const I* __restrict idx, const T* __restrict val,
                                                        std::int64_t nnz, const T* __restrict d, std::int64_t ld,
                                                        std::int64_t c0, Emit& emit, typename Simd<T>::M last) {
  using S = Simd<T>;
  typename S::R acc[NS][NV];
#pragma GCC unroll 8
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) acc[s][k] = S::zero();
  d += c0;
  std::int64_t j = 0;
  for (; j + NS <= nnz; j += NS) {
#pragma GCC unroll 8
    for (int s = 0; s < NS; ++s) {
      const typename S::R v = S::set1(val[j + s]);
      const T* __restrict r = d + static_cast<std::int64_t>(idx[j + s]) * ld;
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k)
        acc[s][k] = S::fma(v, (TAIL && k == NV - 1) ? S::loadz(last, r + k * S::W) : S::load(r + k * S::W),
                           acc[s][k]);
    }
  }
  for (; j < nnz; ++j) {
    const typename S::R v = S::set1(val[j]);
    const T* __restrict r = d + static_cast<std::int64_t>(idx[j]) * ld;
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k)
      acc[0][k] = S::fma(v, (TAIL && k == NV - 1) ? S::loadz(last, r + k * S::W) : S::load(r + k * S::W),
                         acc[0][k]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) {
    typename S::R a = acc[0][k];
#pragma GCC unroll 8
    for (int s = 1; s < NS; ++s) a = S::add(a, acc[s][k]);
    emit(c0 + k * S::W, a, (TAIL && k == NV - 1) ? last : static_cast<typename S::M>(~0u));
  }
}

// emit(c, sum_j val[j] * d[idx[j] * ld + c : c + W], lanes) for the registers c = 0, W, ... < ncols:
// one sparse row times a dense row-major matrix, the epilogue left to the caller.
template <typename T, typename I, class Emit>
inline void gather_row_emit(const I* idx, const T* val, std::int64_t nnz, const T* d, std::int64_t ld,
                            std::int64_t ncols, Emit&& emit) {
  using S = Simd<T>;
  constexpr int V = S::W;
  const typename S::M none = 0;
  std::int64_t c = 0;
  for (; c + 8 * V <= ncols; c += 8 * V) gather_chunk<8, 1, false>(idx, val, nnz, d, ld, c, emit, none);
  if (c + 4 * V <= ncols) {
    gather_chunk<4, 2, false>(idx, val, nnz, d, ld, c, emit, none);
    c += 4 * V;
  }
  if (c + 2 * V <= ncols) {
    gather_chunk<2, 4, false>(idx, val, nnz, d, ld, c, emit, none);
    c += 2 * V;
  }
  if (c + V <= ncols) {
    gather_chunk<1, 4, false>(idx, val, nnz, d, ld, c, emit, none);
    c += V;
  }
  if (c < ncols) gather_chunk<1, 4, true>(idx, val, nnz, d, ld, c, emit, S::tail(ncols - c));
}

// out[c] = sum_j val[j] * d[idx[j] * ld + c], c < ncols.
template <typename T, typename I>
inline void gather_row(const I* idx, const T* val, std::int64_t nnz, const T* d, std::int64_t ld,
                       std::int64_t ncols, T* out) {
  using S = Simd<T>;
  gather_row_emit(idx, val, nnz, d, ld, ncols,
                  [out](std::int64_t c, typename S::R a, typename S::M m) { S::store(m, out + c, a); });
}

// Lane-wise partial sums of sum_j (m[j] ? w[j] * x[j] : 0) over j < n: one masked FMA per
// register of columns that holds any active entry (masked-out entries are never loaded).
// x contiguous.
template <typename T>
inline typename Simd<T>::R masked_dot_lanes(const std::uint8_t* __restrict m, const T* __restrict w,
                                            const T* __restrict x, std::int64_t n) {
  using S = Simd<T>;
  constexpr int V = S::W;
  typename S::R a0 = S::zero(), a1 = S::zero();
  std::int64_t j = 0;
  for (; j + 2 * V <= n; j += 2 * V) {
    const typename S::M k0 = S::active(m + j), k1 = S::active(m + j + V);
    if (k0) a0 = S::fma(S::loadz(k0, w + j), S::loadz(k0, x + j), a0);
    if (k1) a1 = S::fma(S::loadz(k1, w + j + V), S::loadz(k1, x + j + V), a1);
  }
  for (; j < n; j += V) {
    const typename S::M k = S::active(m + j, n - j >= V ? static_cast<typename S::M>(~0u) : S::tail(n - j));
    if (k) a0 = S::fma(S::loadz(k, w + j), S::loadz(k, x + j), a0);
  }
  return S::add(a0, a1);
}

// y[r0 + i] = sum over active j of w[(r0 + i) * ldw + j] * x[j] (+ bias) for nr <= W rows of a
// masked matrix; the W row sums come out of one register transpose.
template <typename T>
inline void masked_matvec_rows(const std::uint8_t* __restrict mask, const T* __restrict w, std::int64_t ldw,
                               const T* __restrict x, std::int64_t n, std::int64_t r0, std::int64_t nr,
                               const T* __restrict bias, T* __restrict y) {
  using S = Simd<T>;
  constexpr int W = S::W;
  typename S::R acc[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i)
    acc[i] = i < nr ? masked_dot_lanes(mask + (r0 + i) * n, w + (r0 + i) * ldw, x, n) : S::zero();
  store_row_sums(acc, r0, nr, bias, y);
}

// acc[c] += s * (m[c] ? w[c] : 0) for c < n (masked axpy of one weight row into acc).
template <typename T>
inline void masked_axpy(const std::uint8_t* __restrict m, const T* __restrict w, T s, T* __restrict acc,
                        std::int64_t n) {
  using S = Simd<T>;
  constexpr int V = S::W;
  const typename S::R sv = S::set1(s);
  std::int64_t j = 0;
  for (; j + V <= n; j += V) {
    const typename S::M k = S::active(m + j);
    if (k) S::store(acc + j, S::fma(sv, S::loadz(k, w + j), S::load(acc + j)));
  }
  if (j < n) {
    const typename S::M valid = S::tail(n - j);
    const typename S::M k = S::active(m + j, valid);
    if (k) S::store(valid, acc + j, S::fma(sv, S::loadz(k, w + j), S::loadz(valid, acc + j)));
  }
}

#else  // portable fallback (no AVX-512): plain loops the compiler vectorises

template <int W, typename T, typename I>
inline void gather_chunk(const I* __restrict idx, const T* __restrict val, std::int64_t nnz,
                         const T* __restrict d, std::int64_t ld, std::int64_t nc, T* __restrict out) {
  T a[W];
  for (int c = 0; c < W; ++c) a[c] = T(0);
  for (std::int64_t j = 0; j < nnz; ++j) {
    const T v = val[j];
    const T* __restrict r = d + static_cast<std::int64_t>(idx[j]) * ld;
    if (nc == W) {
#pragma omp simd
      for (int c = 0; c < W; ++c) a[c] += v * r[c];
    } else {
      for (std::int64_t c = 0; c < nc; ++c) a[c] += v * r[c];
    }
  }
  for (std::int64_t c = 0; c < nc; ++c) out[c] = a[c];
}

template <typename T, typename I>
inline void gather_row(const I* idx, const T* val, std::int64_t nnz, const T* d, std::int64_t ld,
                       std::int64_t ncols, T* out) {
  constexpr int W = vec_width<T>();
  for (std::int64_t c = 0; c < ncols; c += W)
    gather_chunk<W>(idx, val, nnz, d + c, ld, ncols - c < W ? ncols - c : W, out + c);
}

template <typename T>
inline void masked_matvec_rows(const std::uint8_t* __restrict mask, const T* __restrict w, std::int64_t ldw,
                               const T* __restrict x, std::int64_t n, std::int64_t r0, std::int64_t nr,
                               const T* __restrict bias, T* __restrict y) {
  for (std::int64_t r = r0; r < r0 + nr; ++r) {
    T acc = T(0);
    for (std::int64_t j = 0; j < n; ++j)
      if (mask[r * n + j]) acc += w[r * ldw + j] * x[j];
    y[r] = acc + (bias ? bias[r] : T(0));
  }
}

template <typename T>
inline void masked_axpy(const std::uint8_t* __restrict m, const T* __restrict w, T s, T* __restrict acc,
                        std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j)
    if (m[j]) acc[j] += s * w[j];
}

#endif

// Active positions of one mask row: idx[k] = j and val[k] = w[j] for every j < n with m[j] != 0,
// in increasing j. Returns the count.
template <typename T>
inline std::int64_t compact_mask_row(const std::uint8_t* __restrict m, const T* __restrict w, std::int64_t n,
                                     std::int32_t* __restrict idx, T* __restrict val) {
  std::int64_t c = 0, j = 0;
#if defined(__AVX512BW__)
  for (; j + 64 <= n; j += 64) {
    const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(m + j));
    std::uint64_t bits = _mm512_test_epi8_mask(v, v);
    while (bits) {
      const std::int64_t k = j + __builtin_ctzll(bits);
      idx[c] = static_cast<std::int32_t>(k);
      val[c] = w[k];
      ++c;
      bits &= bits - 1;
    }
  }
#endif
  for (; j + 8 <= n; j += 8) {
    std::uint64_t word;
    std::memcpy(&word, m + j, 8);
    if (!word) continue;
    for (std::int64_t k = j; k < j + 8; ++k)
      if (m[k]) { idx[c] = static_cast<std::int32_t>(k); val[c] = w[k]; ++c; }
  }
  for (; j < n; ++j)
    if (m[j]) { idx[c] = static_cast<std::int32_t>(j); val[c] = w[j]; ++c; }
  return c;
}

// Bit k set iff m[k] != 0, for k < n <= 16.
inline std::uint32_t active_bits16(const std::uint8_t* __restrict m, std::int64_t n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 valid = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  const __m128i v = _mm_maskz_loadu_epi8(valid, m);
  return _mm_test_epi8_mask(v, v);
#else
  std::uint32_t bits = 0;
  for (std::int64_t k = 0; k < n; ++k) bits |= (m[k] ? 1u : 0u) << k;
  return bits;
#endif
}

// dst[(b / cw) * panel + i * ld + b % cw] = src[b * s_row + i * s_col] for b < rows, i < cols:
// the transpose of a strided (rows x cols) matrix, cut into panels of cw columns (cw a multiple
// of the register width). Call inside an OpenMP parallel region (work-shared over column
// blocks; ends with the implicit barrier).
template <typename T>
inline void transpose_into(const T* __restrict src, std::int64_t rows, std::int64_t cols, std::int64_t s_row,
                           std::int64_t s_col, T* __restrict dst, std::int64_t ld, std::int64_t cw,
                           std::int64_t panel) {
#if defined(HF_SPARSE_AVX512)
  if (s_col == 1) {
    constexpr std::int64_t W = Simd<T>::W;
    const std::int64_t cblocks = (cols + W - 1) / W;
#pragma omp for schedule(static)
    for (std::int64_t cb = 0; cb < cblocks; ++cb) {
      const std::int64_t i0 = cb * W, nc = cols - i0 < W ? cols - i0 : W;
      for (std::int64_t b0 = 0; b0 < rows; b0 += W)
        transpose_block(src + b0 * s_row + i0, s_row, rows - b0 < W ? rows - b0 : W, nc,
                        dst + (b0 / cw) * panel + i0 * ld + b0 % cw, ld, static_cast<const T*>(nullptr));
    }
    return;
  }
#endif
  constexpr std::int64_t kBlock = 16;
  const std::int64_t blocks = (cols + kBlock - 1) / kBlock;
#pragma omp for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t i0 = blk * kBlock, i1 = i0 + kBlock < cols ? i0 + kBlock : cols;
    for (std::int64_t b = 0; b < rows; ++b) {
      const T* __restrict s = src + b * s_row;
      T* __restrict d = dst + (b / cw) * panel + b % cw;
      for (std::int64_t i = i0; i < i1; ++i) d[i * ld] = s[i * s_col];
    }
  }
}

}  // namespace cpu
}  // namespace hf
