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
#include <cstdlib>
#include <cstring>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "hf_common.h"

#if !defined(HF_ISA)
#error "hf_sparse_cpu.h is for the per-ISA kernel files (csrc/cpu/*.cpp), compiled with -DHF_ISA=<isa>"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HF_SPARSE_SIMD 512
#include "hf_simd_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#define HF_SPARSE_SIMD 256
#include "hf_simd_avx2.h"
#endif

namespace hf {
HF_ISA_BEGIN
namespace cpu {

// Bytes per SIMD register the chunk widths are built from: AVX2's 32; otherwise 64 (AVX-512's
// register; the baseline's plain loops keep 64-byte chunks, four SSE registers of accumulators).
#if defined(HF_SPARSE_SIMD) && HF_SPARSE_SIMD == 256
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 64;
#endif
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
// (Plain malloc'd bytes, not a std::vector: no standard-library template is instantiated here with
// this ISA's flags, where the linker could merge it into another ISA's code; see hf_common.h.)
struct ScratchBuffer {
  unsigned char* data = nullptr;
  std::size_t size = 0;
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data); }
  // At least `bytes`, zero-filled beyond what it held; the old contents are kept.
  void reserve(std::size_t bytes) {
    if (size >= bytes) return;
    auto* grown = static_cast<unsigned char*>(std::calloc(bytes, 1));
    if (!grown) throw std::bad_alloc();
    if (data) std::memcpy(grown, data, size);
    std::free(data);
    data = grown;
    size = bytes;
  }
};

template <typename T>
T* scratch(int slot, std::int64_t count) {
  thread_local ScratchBuffer bufs[6];
  auto& b = bufs[slot];
  b.reserve(static_cast<std::size_t>(count > 0 ? count : 1) * sizeof(T) + 64);
  const auto p = (reinterpret_cast<std::uintptr_t>(b.data) + 63) & ~static_cast<std::uintptr_t>(63);
  return reinterpret_cast<T*>(p);
}

#if defined(HF_SPARSE_SIMD)
// dst[c * ldd + r] = src[r * lds + c] (+ add[r] when add) for r < nr, c < nc (nr, nc <= W).
// A full block (nr == nc == W) is straight-line code: plain loads and stores, no per-row test.
template <typename T>
inline void transpose_block(const T* __restrict src, std::int64_t lds, std::int64_t nr, std::int64_t nc,
                            T* __restrict dst, std::int64_t ldd, const T* __restrict add) {
  using S = Simd<T>;
  constexpr int W = S::W;
  typename S::R r[W];
  if (nr == W && nc == W) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r[i] = S::load(src + i * lds);
    transpose_regs(r);
    const typename S::R a = add ? S::load(add) : S::zero();
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) S::store(dst + i * ldd, S::add(r[i], a));
    return;
  }
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

#else  // portable fallback (baseline x86-64): plain loops the compiler vectorises

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
#if defined(HF_SPARSE_SIMD)
  if (s_col == 1) {
    // W x W register blocks, the blocks of one 64-byte line of a source row back to back (two on
    // AVX2): a source row stride of 4 KiB maps every row to one L1 set, so a line left half-read
    // would be evicted before its other half is read.
    constexpr std::int64_t W = Simd<T>::W;
    constexpr std::int64_t L = W * static_cast<std::int64_t>(sizeof(T)) >= 64 ? W : 64 / static_cast<std::int64_t>(sizeof(T));
    const std::int64_t cgroups = (cols + L - 1) / L;
#pragma omp for schedule(static)
    for (std::int64_t cg = 0; cg < cgroups; ++cg) {
      const std::int64_t g0 = cg * L, g1 = g0 + L < cols ? g0 + L : cols;
      for (std::int64_t b0 = 0; b0 < rows; b0 += W)
        for (std::int64_t i0 = g0; i0 < g1; i0 += W)
          transpose_block(src + b0 * s_row + i0, s_row, rows - b0 < W ? rows - b0 : W, g1 - i0 < W ? g1 - i0 : W,
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
HF_ISA_END
}  // namespace hf
