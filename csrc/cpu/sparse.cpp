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
#include <type_traits>

#include "hf_sparse_cpu.h"

namespace hf {
HF_ISA_BEGIN
namespace {

using cpu::gather_row;
using cpu::round_up;
using cpu::scratch;
using cpu::vec_width;

constexpr std::int64_t kTile = 16;             // output rows per tile
constexpr std::int64_t kColBlock = 16;         // input columns per block (masked grad input)
constexpr std::int64_t kParallelWork = 1 << 15;

// Columns of the (features x batch) operand processed per pass: every sparse row gathers whole
// rows of it, so a pass keeps about `hot_bytes` of it (features x chunk elements) in L2 instead of
// streaming the full operand from L3 / memory once per nonzero; at least four registers wide (one
// gather_chunk<4, 2>: 8 FMA chains).
template <typename T>
std::int64_t batch_chunk(std::int64_t features, std::int64_t batch, std::int64_t hot_bytes) {
  const std::int64_t step = 4 * vec_width<T>();
  std::int64_t cw = hot_bytes / static_cast<std::int64_t>(sizeof(T)) / std::max<std::int64_t>(features, 1);
  cw = std::max(step, cw / step * step);
  return std::min(cw, round_up(batch, vec_width<T>()));
}

// The panel sizes. CSR rows cost nothing to set up, so csr_linear takes the narrowest panels: measured
// on Zen 4 (1 MiB L2) from 1 MiB down to 32 KiB, they were fastest on both paths (AVX2 1024 x 1024 at
// 90 % batch 256: 1.74 -> 1.16 ms; AVX-512 1.32 -> 1.11 ms; 4096-wide inputs even within the noise),
// and they leave room on the 512 KiB L2 of Zen 2 / 3. The masked products compact a dense mask row
// once per row and pass, so narrower panels multiply that scan (128 KiB made them 1.7-7x slower on
// AVX2): they keep 1 MiB, as does the batched SpMM (unmeasured).
constexpr std::int64_t kCsrHotBytes = 128 << 10;
constexpr std::int64_t kMaskedHotBytes = 1 << 20;

// The dense operand (features x batch) as panels of `cw` batch columns: element (f, b) at
// d[(b / cw) * panel + f * ld + b % cw]. Packing each panel contiguously (ld = cw rounded to a
// register) also keeps its rows from aliasing into a few L2 sets, as a 1-4 KiB stride would.
template <typename T>
struct Panels {
  const T* d;
  std::int64_t ld, panel, cw, chunks;
  bool needs_copy;
};

// src element (b, f) at src[b * s_b + f * s_f]. An already-transposed source that fits one
// panel is used in place; otherwise the caller packs into scratch slot 0 (pack_panels, inside
// its parallel region).
template <typename T>
Panels<T> plan_panels(const T* src, std::int64_t batch, std::int64_t s_b, std::int64_t s_f, std::int64_t features,
                      std::int64_t hot_bytes) {
  const std::int64_t cw = batch_chunk<T>(features, batch, hot_bytes), chunks = (batch + cw - 1) / cw;
  if (chunks == 1 && s_b == 1 && s_f >= batch) return {src, s_f, 0, cw, 1, false};
  const std::int64_t ld = round_up(std::min(cw, batch), vec_width<T>()), panel = features * ld;
  return {scratch<T>(0, chunks * panel), ld, panel, cw, chunks, true};
}

template <typename T>
inline void pack_panels(const T* src, std::int64_t batch, std::int64_t s_b, std::int64_t s_f, std::int64_t features,
                        const Panels<T>& p) {
  cpu::transpose_into(src, batch, features, s_b, s_f, const_cast<T*>(p.d), p.ld, p.cw, p.panel);
}

// y[b, o0 + r] = tile[r * ld + b] (+ bias[o0 + r]) for r < nr, b < batch.
template <typename T>
inline void store_tile(const T* tile, std::int64_t ld, std::int64_t nr, std::int64_t batch, const T* bias,
                       std::int64_t o0, T* y, std::int64_t ldy) {
#if defined(HF_SPARSE_SIMD)
  constexpr std::int64_t W = cpu::Simd<T>::W;
  // Per W rows of y, the W-column blocks of the tile back to back: the two halves of a 64-byte line
  // of y on AVX2 are written together (a 4 KiB row stride of y evicts a half-written line).
  for (std::int64_t b0 = 0; b0 < batch; b0 += W)
    for (std::int64_t r0 = 0; r0 < nr; r0 += W)
      cpu::transpose_block(tile + r0 * ld + b0, ld, nr - r0 < W ? nr - r0 : W, batch - b0 < W ? batch - b0 : W,
                           y + b0 * ldy + o0 + r0, ldy, bias ? bias + o0 + r0 : nullptr);
#else
  for (std::int64_t b = 0; b < batch; ++b) {
    T* __restrict yr = y + b * ldy + o0;
    for (std::int64_t r = 0; r < nr; ++r) yr[r] = tile[r * ld + b] + (bias ? bias[o0 + r] : T(0));
  }
#endif
}

// The x·Wᵀ skeleton shared by the three products: src (element (b, f) at src[b * s_b + f * s_f]) is
// packed into panels; per (panel, tile of tile_rows output rows) fill_tile gathers the rows into the
// tile buffer and store_tile transposes them into y (+ bias). make_filler runs once per thread in the
// parallel region (so its scratch is per thread) and returns fill_tile(panel, ld, nc, r0, nr, tile,
// ldt): rows [r0, r0 + nr), row r at tile + (r - r0) * ldt, over the panel's nc batch columns.
// bias: const T*, or nullptr (a compile-time null: store_tile drops the add).
template <typename T, typename Bias, typename MakeFiller>
void product_by_panels(const T* src, std::int64_t batch, std::int64_t s_b, std::int64_t s_f, std::int64_t features,
                       std::int64_t hot_bytes, std::int64_t rows, std::int64_t tile_rows, bool par, Bias bias,
                       T* y, std::int64_t ldy, MakeFiller&& make_filler) {
  const Panels<T> pn = plan_panels(src, batch, s_b, s_f, features, hot_bytes);
  const std::int64_t tiles = (rows + tile_rows - 1) / tile_rows, cw = pn.cw, chunks = pn.chunks;
#pragma omp parallel if (par)
  {
    if (pn.needs_copy) pack_panels(src, batch, s_b, s_f, features, pn);
    const std::int64_t ldt = round_up(std::min(cw, batch), vec_width<T>());
    T* tile = scratch<T>(1, tile_rows * ldt);
    auto fill_tile = make_filler();
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (std::int64_t ch = 0; ch < chunks; ++ch) {
      for (std::int64_t t = 0; t < tiles; ++t) {
        const std::int64_t c0 = ch * cw, nc = std::min(cw, batch - c0);
        const std::int64_t r0 = t * tile_rows, nr = std::min(tile_rows, rows - r0);
        fill_tile(pn.d + ch * pn.panel, pn.ld, nc, r0, nr, tile, ldt);
        store_tile<T>(tile, ldt, nr, nc, bias, r0, y + c0 * ldy, ldy);
      }
    }
  }
}

}  // namespace

void masked_matmul(CpuTag, const MaskedMatmulParams& p) {
  checked_dispatch(p, "masked_matmul", [&](auto zero) {
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
      constexpr std::int64_t W = vec_width<T>();
      const std::int64_t groups = (out + W - 1) / W;
#pragma omp parallel for schedule(static, 2) if (par)
      for (std::int64_t gi = 0; gi < groups; ++gi)
        cpu::masked_matvec_rows(mask, w, p.ldw, xc, in, gi * W, std::min(W, out - gi * W), bias, y);
      return;
    }
    // Per output row: its active entries compacted into (idx, val), then gathered.
    product_by_panels(x, batch, p.x_sb, p.x_si, in, kMaskedHotBytes, out, kTile, par, bias, y, p.ldy, [&]() {
      std::int32_t* idx = scratch<std::int32_t>(2, in);
      T* val = scratch<T>(3, in);
      return [=](const T* panel, std::int64_t ld, std::int64_t nc, std::int64_t o0, std::int64_t nr, T* tile,
                 std::int64_t ldt) {
        for (std::int64_t r = 0; r < nr; ++r) {
          const std::int64_t o = o0 + r;
          const std::int64_t nnz = cpu::compact_mask_row(mask + o * in, w + o * p.ldw, in, idx, val);
          gather_row(idx, val, nnz, panel, ld, nc, tile + r * ldt);
        }
      };
    });
  });
}

void masked_matmul_grad_input(CpuTag, const MaskedGradInputParams& p) {
  checked_dispatch(p, "masked_matmul_grad_input", [&](auto zero) {
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
    // The "rows" of gx are input columns, a block of kColBlock at a time: per column of the block,
    // the rows o where it is active and W there (a CSC slice), then gathered.
    product_by_panels(g, batch, p.g_sb, p.g_so, out, kMaskedHotBytes, in, kColBlock, par, nullptr, gx, p.ldgx,
                      [&]() {
      std::int32_t* idx = scratch<std::int32_t>(2, kColBlock * out);
      T* val = scratch<T>(3, kColBlock * out);
      return [=](const T* panel, std::int64_t ld, std::int64_t ncols, std::int64_t i0, std::int64_t nc, T* tile,
                 std::int64_t ldt) {
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
          gather_row(idx + k * out, val + k * out, cnt[k], panel, ld, ncols, tile + k * ldt);
      };
    });
  });
}

void csr_linear(CpuTag, const CsrLinearParams& p) {
  checked_dispatch_index(p, "csr_linear", [&](auto zero, auto izero) {
    using T = decltype(zero);
    using I = decltype(izero);
    const CsrOperands<T, I> op = csr_operands<T, I>(p);
    const std::int64_t batch = p.batch, in = p.in, out = p.out;
    const bool par = (p.nnz + out) * batch > kParallelWork;
    if (batch == 1) {
#if defined(HF_SPARSE_SIMD)
      if constexpr (std::is_same_v<I, std::int32_t>) {
        // Vectorised mat-vec, a register of rows at a time, for rows of Simd<T>::gather_row_nnz
        // nonzeros or more on average; shorter rows take the scalar loop below.
        if (p.x_si == 1 && p.nnz >= cpu::Simd<T>::gather_row_nnz * out) {
          constexpr std::int64_t W = cpu::Simd<T>::W;
          const std::int64_t groups = (out + W - 1) / W;
#pragma omp parallel for schedule(static, 8) if (par)
          for (std::int64_t gi = 0; gi < groups; ++gi)
            cpu::csr_spmv_rows(op.rowptr, op.col, op.val, op.x, gi * W, std::min(W, out - gi * W), op.bias, op.y);
          return;
        }
      }
#endif
      // Sparse matrix-vector product: the shared element body, one row per iteration.
#pragma omp parallel for schedule(static, 64) if (par)
      for (std::int64_t o = 0; o < out; ++o)
        op.y[o] = csr_row_dot(op.rowptr, op.col, op.val, op.x, p.x_si, o) + (op.bias ? op.bias[o] : T(0));
      return;
    }
    // A CSR row is its own compacted (col, val) list: nothing to set up per thread.
    product_by_panels(op.x, batch, p.x_sb, p.x_si, in, kCsrHotBytes, out, kTile, par, op.bias, op.y, p.ldy, [&]() {
      return [=](const T* panel, std::int64_t ld, std::int64_t nc, std::int64_t o0, std::int64_t nr, T* tile,
                 std::int64_t ldt) {
        for (std::int64_t r = 0; r < nr; ++r) {
          const std::int64_t j0 = op.rowptr[o0 + r], j1 = op.rowptr[o0 + r + 1];
          gather_row(op.col + j0, op.val + j0, j1 - j0, panel, ld, nc, tile + r * ldt);
        }
      };
    });
  });
}

void csr_spmm_batched(CpuTag, const CsrSpmmBatchedParams& p) {
  checked_dispatch_index(p, "csr_spmm_batched", [&](auto zero, auto izero) {
    using T = decltype(zero);
    using I = decltype(izero);
    const I* rowptr = ptr<const I>(p.rowptr);
    const I* col = ptr<const I>(p.col);
    const T* val = ptr<const T>(p.val);
    const T* b = ptr<const T>(p.b);
    T* out = ptr<T>(p.out);
    const std::int64_t tiles = (p.rows + kTile - 1) / kTile;
    const std::int64_t cw = batch_chunk<T>(p.k, p.n, kMaskedHotBytes), chunks = (p.n + cw - 1) / cw;
    const bool par = (p.nnz + p.rows) * p.n * p.batch > kParallelWork;
#pragma omp parallel for schedule(dynamic, 1) collapse(3) if (par)
    for (std::int64_t s = 0; s < p.batch; ++s) {
      for (std::int64_t ch = 0; ch < chunks; ++ch) {
        for (std::int64_t t = 0; t < tiles; ++t) {
          const std::int64_t c0 = ch * cw, nc = std::min(cw, p.n - c0);
          const T* bs = b + s * p.b_bs + c0;
          T* os = out + s * p.o_bs + c0;
          const std::int64_t r1 = std::min(p.rows, (t + 1) * kTile);
          for (std::int64_t r = t * kTile; r < r1; ++r) {
            const std::int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
            gather_row(col + j0, val + j0, j1 - j0, bs, p.ldb, nc, os + r * p.ldo);
          }
        }
      }
    }
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

HF_ISA_END
}  // namespace hf
