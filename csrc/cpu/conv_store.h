// The epilogue of the direct sparse convolution (conv.cpp): bias, residual and ReLU, and the ways
// accumulated lanes reach y (whole-register or per-row-run stores from registers, tile buffers through
// row copies or register transposes). Included by conv.cpp only, once per ISA translation unit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "conv_pack.h"

namespace hf {
HF_ISA_BEGIN
namespace {
#if defined(HF_SPARSE_SIMD)
// Channels-last output (ys_c == 1): the tiles of output channels [o0, o0 + no) (no <= W; tile row
// o - o0 at tile + (o - o0) * ldt, epilogue already applied) written as (pixel, channel) blocks
// transposed in registers.
template <typename T>
void store_rows_nhwc(const SparseConvParams& p, const Packing& k, const T* __restrict tile, std::int64_t ldt,
                     std::int64_t gi, std::int64_t o0, std::int64_t no, std::int64_t i0, std::int64_t i1,
                     T* __restrict y) {
  constexpr std::int64_t W = cpu::Simd<T>::W;
  const std::int64_t nvalid = std::min(k.nb, p.n - gi * k.nb);
  T* yg = y + gi * k.nb * p.ys_n + o0;
  for (std::int64_t i = i0; i < i1; ++i) {
    const T* t = tile + (i - i0) * k.wq * k.nb;
    if (k.nb == 1) {
      for (std::int64_t j0 = 0; j0 < p.wo; j0 += W)
        cpu::transpose_block(t + j0, ldt, no, std::min(W, p.wo - j0), yg + i * p.ys_h + j0 * p.ys_w, p.ys_w,
                             static_cast<const T*>(nullptr));
    } else {
      for (std::int64_t j = 0; j < p.wo; ++j)
        cpu::transpose_block(t + j * k.nb, ldt, no, nvalid, yg + i * p.ys_h + j * p.ys_w, p.ys_n,
                             static_cast<const T*>(nullptr));
    }
  }
}
#endif

// y = act(y + residual) over output rows [i0, i1), channels [o0, o1) of group gi (after the stores;
// with a residual the tile epilogue adds only the bias).
template <typename T>
void add_residual(const SparseConvParams& p, const Packing& k, std::int64_t gi, std::int64_t o0, std::int64_t o1,
                  std::int64_t i0, std::int64_t i1, T* __restrict y) {
  const T* __restrict r = ptr<const T>(p.res);
  const bool relu = p.relu;
  const std::int64_t s0 = gi * k.nb, s1 = std::min(p.n, s0 + k.nb);
  for (std::int64_t b = s0; b < s1; ++b)
    for (std::int64_t i = i0; i < i1; ++i) {
      T* yr = y + b * p.ys_n + i * p.ys_h;
      const T* rr = r + b * p.rs_n + i * p.rs_h;
      if (p.ys_c == 1 && p.rs_c == 1) {  // channels-last: contiguous runs of channels
        for (std::int64_t j = 0; j < p.wo; ++j) {
          T* __restrict yj = yr + j * p.ys_w;
          const T* __restrict rj = rr + j * p.rs_w;
#pragma omp simd
          for (std::int64_t o = o0; o < o1; ++o) yj[o] = conv_epilogue(yj[o], static_cast<const T*>(nullptr), 0, relu, rj[o]);
        }
      } else {
        for (std::int64_t o = o0; o < o1; ++o) {
          T* __restrict yo = yr + o * p.ys_c;
          const T* __restrict ro = rr + o * p.rs_c;
          for (std::int64_t j = 0; j < p.wo; ++j)
            yo[j * p.ys_w] = conv_epilogue(yo[j * p.ys_w], static_cast<const T*>(nullptr), 0, relu, ro[j * p.rs_w]);
        }
      }
    }
}

#if defined(HF_SPARSE_SIMD)
// Fused epilogue (nb = 1, unit column stride of y and of the residual): register r of a lane tile
// (lanes of whole output rows [i0, i1), row i at lane (i - i0) * wq) splits into runs of one output
// row each; segs[r * nseg .. r * nseg + nseg) holds each run's lanes and where its lane 0 would sit in
// y and in the residual (offsets within one output channel's plane), padded with empty runs so every
// register has the same count (no data-dependent branches). The accumulators then go straight to
// y — bias, residual and ReLU in registers — with no tile buffer, no epilogue pass and no copy.
template <typename T>
struct RowSeg {
  typename cpu::Simd<T>::M mask;
  std::int64_t yoff, roff;
};

// Runs per register: at most ceil((W - 1) / wq) + 1 rows meet in W lanes.
inline std::int64_t max_runs(std::int64_t wq, std::int64_t W) { return (W - 1 + wq - 1) / wq + 1; }

template <typename T>
void row_segments(const SparseConvParams& p, const Packing& k, std::int64_t i0, std::int64_t len, std::int64_t nseg,
                  RowSeg<T>* segs) {
  using M = typename cpu::Simd<T>::M;
  constexpr std::int64_t W = cpu::Simd<T>::W;
  const std::int64_t nreg = (len + W - 1) / W;
  for (std::int64_t r = 0; r < nreg; ++r) {
    RowSeg<T>* sr = segs + r * nseg;
    std::int64_t n = 0;
    for (std::int64_t l = r * W, end = std::min(len, l + W); l < end;) {
      const std::int64_t row = l / k.wq, j = l % k.wq, run = std::min(end - l, k.wq - j);
      const std::int64_t valid = std::max<std::int64_t>(0, std::min(run, p.wo - j)), lane = l - r * W;
      if (valid > 0)  // tail(W) is all W lanes
        sr[n++] = RowSeg<T>{static_cast<M>(cpu::Simd<T>::tail(valid) << lane), (i0 + row) * p.ys_h + j - lane,
                            (i0 + row) * p.rs_h + j - lane};
      l += run;
    }
    for (; n < nseg; ++n) sr[n] = RowSeg<T>{0, 0, 0};
  }
}

// emit for gather_row_emit: act(acc + bias[o] + residual) of output channel o. Two ways out:
// * keep (y rows at the lane pitch, see SparseConvParams::y_gaps_zero): yo is the tile's lane 0 and
//   each register is one whole store, its gap lanes (columns past wo) zeroed by keep[register]; a masked
//   store only for the tile's last, partial register. AVX2's masked store is microcoded on AMD (about
//   a third of a 98 %-sparse ResNet's time went to the run stores), hence this path.
// * otherwise through the runs of segs: yo is (sample, channel o) and each run a masked store.
// The residual comes the same two ways: ro at the tile's lane 0 when res_pitch, else through the runs.
template <typename T>
struct FusedStore {
  using S = cpu::Simd<T>;
  const RowSeg<T>* segs;
  std::int64_t nseg;
  const typename S::M* keep;  // per register: lanes of real output columns; null: store through the runs
  T* yo;
  const T* ro;  // residual, or null
  bool res_pitch;
  typename S::R bias;
  bool relu;
  inline __attribute__((always_inline)) void operator()(std::int64_t c, typename S::R a, typename S::M m) const {
    const RowSeg<T>* sr = segs ? segs + (c / S::W) * nseg : nullptr;
    typename S::R v = S::add(a, bias);
    if (ro && res_pitch) {
      v = S::add(v, m ? S::loadz(m, ro + c) : S::load(ro + c));  // m == 0: a full register
    } else if (ro) {
      typename S::R add = S::zero();
      for (std::int64_t s = 0; s < nseg; ++s) add = S::add(add, S::loadz(sr[s].mask, ro + sr[s].roff));
      v = S::add(v, add);
    }
    if (relu) v = S::max(S::zero(), v);  // NaN stays NaN (max returns its second operand then)
    if (keep) {
      v = S::zero_unless(keep[c / S::W], v);
      if (m) S::store(m, yo + c, v); else S::store(yo + c, v);
      return;
    }
    for (std::int64_t s = 0; s < nseg; ++s) S::store(sr[s].mask, yo + sr[s].yoff, v);
  }
};

// keep[r]: the lanes of register r (of a tile of len lanes from an output row start) whose column
// (lane % wq) is a real output column (< wo).
template <typename T>
void column_masks(std::int64_t wq, std::int64_t wo, std::int64_t len, typename cpu::Simd<T>::M* keep) {
  using M = typename cpu::Simd<T>::M;
  constexpr std::int64_t W = cpu::Simd<T>::W;
  std::int64_t j = 0;  // column of the current lane, stepped (no division per lane: this runs per tile)
  for (std::int64_t r = 0; r * W < len; ++r) {
    std::uint32_t bits = 0;
    for (std::int64_t l = 0; l < W; ++l) {
      bits |= static_cast<std::uint32_t>(j < wo) << l;
      if (++j == wq) j = 0;
    }
    keep[r] = static_cast<M>(bits);
  }
}
#endif

// bias + ReLU over one output channel's tile (contiguous, vectorised).
template <typename T>
inline void epilogue_tile(T* __restrict tile, std::int64_t len, const T* bias, std::int64_t o, bool relu) {
  const T bo = bias ? bias[o] : T(0);
#pragma omp simd
  for (std::int64_t l = 0; l < len; ++l) tile[l] = conv_epilogue(tile[l], &bo, 0, relu);
}

// y for output channel o from tile, which holds the lanes of whole output rows [i0, i1) of group gi
// (row i starts at lane (i - i0) * wq * nb; epilogue applied): the valid lanes out — row copies for
// nb = 1, register transposes of (pixel, sample) blocks for nb > 1.
template <typename T>
void store_rows(const SparseConvParams& p, const Packing& k, const T* __restrict tile, std::int64_t gi,
                std::int64_t o, std::int64_t i0, std::int64_t i1, T* __restrict y) {
  const std::int64_t row = k.wq * k.nb;
  const std::int64_t nvalid = std::min(k.nb, p.n - gi * k.nb);
  T* __restrict yo = y + gi * k.nb * p.ys_n + o * p.ys_c;
  for (std::int64_t i = i0; i < i1; ++i) {
    const T* __restrict t = tile + (i - i0) * row;
    T* __restrict yr = yo + i * p.ys_h;
    if (k.nb == 1) {
      if (p.ys_w == 1) {
        copy_row(yr, t, p.wo);
      } else {
        for (std::int64_t j = 0; j < p.wo; ++j) yr[j * p.ys_w] = t[j];
      }
      continue;
    }
#if defined(HF_SPARSE_SIMD)
    constexpr std::int64_t W = cpu::Simd<T>::W;
    if (p.ys_w == 1 && k.nb <= W) {
      for (std::int64_t j0 = 0; j0 < p.wo; j0 += W)
        cpu::transpose_block(t + j0 * k.nb, k.nb, std::min(W, p.wo - j0), nvalid, yr + j0, p.ys_n,
                             static_cast<const T*>(nullptr));
      continue;
    }
#endif
    for (std::int64_t b = 0; b < nvalid; ++b)
      for (std::int64_t j = 0; j < p.wo; ++j) yr[b * p.ys_n + j * p.ys_w] = t[j * k.nb + b];
  }
}

}  // namespace
HF_ISA_END
}  // namespace hf
