// CPU kernels for the sparse family (OpenMP over row tiles / column blocks, register-blocked
// SIMD inner loops from hf_sparse_cpu.h).
//
// All three x·Wᵀ-shaped products use the same layout: the dense operand is brought once into a
// row-major (features x batch) buffer (skipped when it already is one), every output row is a
// sparse combination of rows of that buffer (gather_row: unit-stride SIMD over the batch), and
// a tile of 16 output rows is transposed into the (batch x features) result.
#include "hf_sparse.h"

#include <algorithm>
#include <cstdint>

#include "hf_sparse_cpu.h"

namespace hf {
namespace {

using cpu::gather_row;
using cpu::round_up;
using cpu::scratch;
using cpu::vec_width;

constexpr std::int64_t kTile = 16;             // output rows per tile
constexpr std::int64_t kColBlock = 16;         // input columns per block (masked grad input)
constexpr std::int64_t kParallelWork = 1 << 15;

// The dense operand as a row-major (features x batch) matrix: d[f * ld + b].
template <typename T>
struct DenseT {
  const T* d;
  std::int64_t ld;
  bool needs_copy;
};

// src element (b, f) at src[b * s_b + f * s_f]. Batch 1 or an already-transposed source is used
// in place; otherwise the caller transposes into scratch slot 0 (inside its parallel region).
template <typename T>
DenseT<T> plan_transpose(const T* src, std::int64_t batch, std::int64_t s_b, std::int64_t s_f, std::int64_t features) {
  if (batch == 1) return {src, s_f, false};
  if (s_b == 1 && s_f >= batch) return {src, s_f, false};
  const std::int64_t ld = round_up(batch, vec_width<T>());
  return {scratch<T>(0, features * ld), ld, true};
}

// y[b, o0 + r] = tile[r * ld + b] (+ bias[o0 + r]) for r < nr, b < batch.
template <typename T>
inline void store_tile(const T* tile, std::int64_t ld, std::int64_t nr, std::int64_t batch, const T* bias,
                       std::int64_t o0, T* y, std::int64_t ldy) {
  for (std::int64_t b = 0; b < batch; ++b) {
    T* __restrict yr = y + b * ldy + o0;
    if (bias) {
      for (std::int64_t r = 0; r < nr; ++r) yr[r] = tile[r * ld + b] + bias[o0 + r];
    } else {
      for (std::int64_t r = 0; r < nr; ++r) yr[r] = tile[r * ld + b];
    }
  }
}

}  // namespace

void masked_matmul(CpuTag, const MaskedMatmulParams& p) {
  check(p);
  if (p.batch == 0 || p.out == 0) return;
  dispatch_float(p.dtype, "masked_matmul", [&](auto zero) {
    using T = decltype(zero);
    const T* x = ptr<const T>(p.x);
    const T* w = ptr<const T>(p.w);
    const std::uint8_t* mask = ptr<const std::uint8_t>(p.mask);
    const T* bias = p.bias ? ptr<const T>(p.bias) : nullptr;
    T* y = ptr<T>(p.y);
    const std::int64_t batch = p.batch, in = p.in, out = p.out;
    const bool par = batch * in * out / 8 > kParallelWork;
    if (batch == 1) {
      // Matrix-vector: per row, one masked FMA per register of columns holding an active entry.
      const T* xc = x;
      if (p.x_si != 1) {
        T* buf = scratch<T>(0, in);
        for (std::int64_t i = 0; i < in; ++i) buf[i] = x[i * p.x_si];
        xc = buf;
      }
#pragma omp parallel for schedule(static, 16) if (par)
      for (std::int64_t o = 0; o < out; ++o)
        y[o] = cpu::masked_dot(mask + o * in, w + o * p.ldw, xc, in) + (bias ? bias[o] : T(0));
      return;
    }
    const DenseT<T> xt = plan_transpose(x, batch, p.x_sb, p.x_si, in);
    const std::int64_t tiles = (out + kTile - 1) / kTile;
#pragma omp parallel if (par)
    {
      if (xt.needs_copy) cpu::transpose_into(x, batch, in, p.x_sb, p.x_si, const_cast<T*>(xt.d), xt.ld);
      const std::int64_t ldt = round_up(batch, vec_width<T>());
      T* tile = scratch<T>(1, kTile * ldt);
      std::int32_t* idx = scratch<std::int32_t>(2, in);
      T* val = scratch<T>(3, in);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t t = 0; t < tiles; ++t) {
        const std::int64_t o0 = t * kTile, nr = std::min(kTile, out - o0);
        for (std::int64_t r = 0; r < nr; ++r) {
          const std::int64_t o = o0 + r;
          const std::int64_t nnz = cpu::compact_mask_row(mask + o * in, w + o * p.ldw, in, idx, val);
          gather_row(idx, val, nnz, xt.d, xt.ld, batch, tile + r * ldt);
        }
        store_tile(tile, ldt, nr, batch, bias, o0, y, p.ldy);
      }
    }
  });
}

void masked_matmul_grad_input(CpuTag, const MaskedGradInputParams& p) {
  check(p);
  if (p.batch == 0 || p.in == 0) return;
  dispatch_float(p.dtype, "masked_matmul_grad_input", [&](auto zero) {
    using T = decltype(zero);
    const T* g = ptr<const T>(p.g);
    const T* w = ptr<const T>(p.w);
    const std::uint8_t* mask = ptr<const std::uint8_t>(p.mask);
    T* gx = ptr<T>(p.gx);
    const std::int64_t batch = p.batch, in = p.in, out = p.out;
    const bool par = batch * in * out / 8 > kParallelWork;
    if (batch == 1) {
      // Vector-matrix: every thread owns a block of columns of gx and adds g[o] * masked row o.
      constexpr std::int64_t kCols = 256;
      const std::int64_t nblk = (in + kCols - 1) / kCols;
#pragma omp parallel for schedule(dynamic, 1) if (par)
      for (std::int64_t blk = 0; blk < nblk; ++blk) {
        const std::int64_t i0 = blk * kCols, nc = std::min(kCols, in - i0);
        T* acc = gx + i0;
        for (std::int64_t c = 0; c < nc; ++c) acc[c] = T(0);
        for (std::int64_t o = 0; o < out; ++o)
          cpu::masked_axpy(mask + o * in + i0, w + o * p.ldw + i0, g[o * p.g_so], acc, nc);
      }
      return;
    }
    const DenseT<T> gt = plan_transpose(g, batch, p.g_sb, p.g_so, out);
    const std::int64_t blocks = (in + kColBlock - 1) / kColBlock;
#pragma omp parallel if (par)
    {
      if (gt.needs_copy) cpu::transpose_into(g, batch, out, p.g_sb, p.g_so, const_cast<T*>(gt.d), gt.ld);
      const std::int64_t ldt = round_up(batch, vec_width<T>());
      T* tile = scratch<T>(1, kColBlock * ldt);
      // Per column of the block: the rows o where it is active, and W there (a CSC slice).
      std::int32_t* idx = scratch<std::int32_t>(2, kColBlock * out);
      T* val = scratch<T>(3, kColBlock * out);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t blk = 0; blk < blocks; ++blk) {
        const std::int64_t i0 = blk * kColBlock, nc = std::min(kColBlock, in - i0);
        std::int64_t cnt[kColBlock] = {0};
        for (std::int64_t o = 0; o < out; ++o) {
          std::uint32_t bits = cpu::active_bits16(mask + o * in + i0, nc);
          const T* __restrict wr = w + o * p.ldw + i0;
          while (bits) {
            const int k = __builtin_ctz(bits);
            bits &= bits - 1;
            idx[k * out + cnt[k]] = static_cast<std::int32_t>(o);
            val[k * out + cnt[k]] = wr[k];
            ++cnt[k];
          }
        }
        for (std::int64_t k = 0; k < nc; ++k)
          gather_row(idx + k * out, val + k * out, cnt[k], gt.d, gt.ld, batch, tile + k * ldt);
        store_tile(tile, ldt, nc, batch, static_cast<const T*>(nullptr), i0, gx, p.ldgx);
      }
    }
  });
}

void csr_linear(CpuTag, const CsrLinearParams& p) {
  check(p);
  if (p.batch == 0 || p.out == 0) return;
  dispatch_float(p.dtype, "csr_linear", [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(p.itype, "csr_linear", [&](auto izero) {
      using I = decltype(izero);
      const I* rowptr = ptr<const I>(p.rowptr);
      const I* col = ptr<const I>(p.col);
      const T* val = ptr<const T>(p.val);
      const T* x = ptr<const T>(p.x);
      const T* bias = p.bias ? ptr<const T>(p.bias) : nullptr;
      T* y = ptr<T>(p.y);
      const std::int64_t batch = p.batch, in = p.in, out = p.out;
      const bool par = (p.nnz + out) * batch > kParallelWork;
      if (batch == 1) {
        // Sparse matrix-vector product: the shared element body, one row per iteration.
#pragma omp parallel for schedule(static, 64) if (par)
        for (std::int64_t o = 0; o < out; ++o)
          y[o] = csr_row_dot(rowptr, col, val, x, p.x_si, o) + (bias ? bias[o] : T(0));
        return;
      }
      const DenseT<T> xt = plan_transpose(x, batch, p.x_sb, p.x_si, in);
      const std::int64_t tiles = (out + kTile - 1) / kTile;
#pragma omp parallel if (par)
      {
        if (xt.needs_copy) cpu::transpose_into(x, batch, in, p.x_sb, p.x_si, const_cast<T*>(xt.d), xt.ld);
        const std::int64_t ldt = round_up(batch, vec_width<T>());
        T* tile = scratch<T>(1, kTile * ldt);
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t t = 0; t < tiles; ++t) {
          const std::int64_t o0 = t * kTile, nr = std::min(kTile, out - o0);
          for (std::int64_t r = 0; r < nr; ++r) {
            const std::int64_t o = o0 + r;
            const std::int64_t j0 = rowptr[o], j1 = rowptr[o + 1];
            gather_row(col + j0, val + j0, j1 - j0, xt.d, xt.ld, batch, tile + r * ldt);
          }
          store_tile(tile, ldt, nr, batch, bias, o0, y, p.ldy);
        }
      }
    });
  });
}

void csr_spmm_batched(CpuTag, const CsrSpmmBatchedParams& p) {
  check(p);
  if (p.batch == 0 || p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "csr_spmm_batched", [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(p.itype, "csr_spmm_batched", [&](auto izero) {
      using I = decltype(izero);
      const I* rowptr = ptr<const I>(p.rowptr);
      const I* col = ptr<const I>(p.col);
      const T* val = ptr<const T>(p.val);
      const T* b = ptr<const T>(p.b);
      T* out = ptr<T>(p.out);
      const std::int64_t tiles = (p.rows + kTile - 1) / kTile;
      const bool par = (p.nnz + p.rows) * p.n * p.batch > kParallelWork;
#pragma omp parallel for schedule(dynamic, 1) collapse(2) if (par)
      for (std::int64_t s = 0; s < p.batch; ++s) {
        for (std::int64_t t = 0; t < tiles; ++t) {
          const T* bs = b + s * p.b_bs;
          T* os = out + s * p.o_bs;
          const std::int64_t r1 = std::min(p.rows, (t + 1) * kTile);
          for (std::int64_t r = t * kTile; r < r1; ++r) {
            const std::int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
            gather_row(col + j0, val + j0, j1 - j0, bs, p.ldb, p.n, os + r * p.ldo);
          }
        }
      }
    });
  });
}

void score_mask(CpuTag, const ScoreMaskParams& p) {
  check(p);
  dispatch_float(p.dtype, "score_mask", [&](auto zero) {
    using T = decltype(zero);
    const T* t = ptr<const T>(p.scores);
    std::uint8_t* m = ptr<std::uint8_t>(p.mask);
    std::int64_t count = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : count) if (p.n > (1 << 16))
    for (std::int64_t i = 0; i < p.n; ++i) {
      const bool a = score_active(t[i]);
      m[i] = a ? 1 : 0;
      count += a ? 1 : 0;
    }
    *ptr<std::int64_t>(p.count) = count;
  });
}

}  // namespace hf
