// CPU direct sparse convolution (no im2col buffer).
//
// The input is first copied, zero-padded, into a packed buffer in which every kernel tap is a
// constant offset: for stride s the padded map is split into s_h*s_w phase planes
// (plane (py, px) holds padded rows py, py + s_h, ... and columns px, px + s_w, ...), so output
// (i, j) reads plane row i + oy/s_h, column j + ox/s_w of the tap's phase (oy = ky*d_h,
// ox = kx*d_w). `nb` samples are interleaved innermost: element (c, phase, r, q, b) lives at
// ((c*P + phase)*hq + r)*wq*nb + q*nb + b. Output lane g = (i*wq + j)*nb + b then reads
// packed[g + offset(tap)] for every tap, so one output channel over a tile of lanes is exactly a
// CSR row times shifted contiguous rows: gather_row (hf_sparse_cpu.h; register-resident
// accumulators, AVX-512 FMAs with the weight broadcast) with the per-nonzero offsets as indices.
// Lanes with j >= wo are computed and dropped; nb > 1 keeps small maps (4x4, 2x2) from wasting
// most SIMD lanes. The epilogue adds the bias (and a residual), applies ReLU and writes y through its
// strides: with one sample per group and unit column strides (NCHW output) straight from the
// accumulator registers through per-tile row runs (FusedStore), otherwise through a tile buffer.
// Stride phases that no tap reads (a 1x1 stride-2 shortcut reads one of four) are not packed.
//
// One parallel region with one barrier (its end): with a sample group per thread or more, each thread
// packs and computes whole groups; with fewer groups (batch 1), every thread packs the small input
// itself and takes a static share of (group, lane tile, block of output channels) items, so batch 1
// also uses every thread. A tile's input stays in L2 while its output channels run. Channels-last
// input and output go through 16x16 register transposes (the pack and the epilogue).
#include "hf_conv.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "hf_sparse_cpu.h"

namespace hf {
HF_ISA_BEGIN
namespace {

using cpu::gather_row;
using cpu::max_threads;
using cpu::round_up;
using cpu::scratch;

constexpr std::int64_t kTileLanes = 512;  // output lanes per work item (whole output rows; at least one)
constexpr std::int64_t kParallelWork = 1 << 15;

// Short row copies and zero fills (a 4x4 map has rows of 4-6 elements): masked register moves, not
// memset / memmove calls per row.
template <typename T>
inline void copy_row(T* __restrict d, const T* __restrict s, std::int64_t n) {
#if defined(HF_SPARSE_SIMD)
  using S = cpu::Simd<T>;
  std::int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(d + i, S::load(s + i));
  if (i < n) {
    const typename S::M m = S::tail(n - i);
    S::store(m, d + i, S::loadz(m, s + i));
  }
#else
  std::copy(s, s + n, d);
#endif
}

// d[i] = s[2 i] for i < n (a stride-2 row's phase): pairs of registers de-interleaved, reading only
// s[0 .. 2n - 2].
template <typename T>
inline void copy_row_stride2(T* __restrict d, const T* __restrict s, std::int64_t n) {
#if defined(HF_SPARSE_SIMD)
  using S = cpu::Simd<T>;
  constexpr std::int64_t W = S::W;
  for (std::int64_t i = 0; i < n; i += W) {
    const std::int64_t m = std::min(W, n - i), need = 2 * m - 1, la = std::min(W, need), lb = need - la;
    const typename S::R a = la == W ? S::load(s + 2 * i) : S::loadz(S::tail(la), s + 2 * i);
    const typename S::R b = lb > 0 ? S::loadz(S::tail(lb), s + 2 * i + W) : S::zero();
    if (m == W) S::store(d + i, S::even(a, b)); else S::store(S::tail(m), d + i, S::even(a, b));
  }
#else
  for (std::int64_t i = 0; i < n; ++i) d[i] = s[2 * i];
#endif
}

#if defined(HF_SPARSE_SIMD)
// The last, partial register of a row (lanes [i, n) of d): a whole store when the lanes past n are
// among the `spill` cells after the row that are rewritten later, else a masked one (a microcoded
// instruction on AMD's AVX2).
template <typename T>
inline void store_row_tail(T* __restrict d, std::int64_t i, std::int64_t n, std::int64_t spill,
                           typename cpu::Simd<T>::R v) {
  using S = cpu::Simd<T>;
  if (i + S::W - n <= spill) S::store(d + i, v); else S::store(S::tail(n - i), d + i, v);
}
#endif

template <typename T>
inline void zero_row(T* __restrict d, std::int64_t n, std::int64_t spill = 0) {
#if defined(HF_SPARSE_SIMD)
  using S = cpu::Simd<T>;
  std::int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(d + i, S::zero());
  if (i < n) store_row_tail(d, i, n, spill, S::zero());
#else
  std::fill(d, d + n, T(0));
#endif
}

// Geometry of the packed input of one group of nb samples.
struct Packing {
  std::int64_t nb, groups, phases, hq, wq, plane, gsize, grid;
  std::uint64_t used;  // bit py*sw + px: some tap reads that stride phase (all bits when phases > 64)
};

Packing plan(const SparseConvParams& p, std::int64_t nb) {
  Packing k;
  k.nb = nb;
  k.groups = (p.n + nb - 1) / nb;
  k.phases = p.sh * p.sw;
  k.hq = (p.h + 2 * p.ph + p.sh - 1) / p.sh;
  k.wq = std::max(packed_row_width(p), p.lane_pitch);
  k.plane = k.hq * k.wq * nb;
  k.gsize = p.in_c * k.phases * k.plane;
  k.grid = ((p.ho - 1) * k.wq + p.wo) * nb;
  k.used = k.phases > 64 ? ~std::uint64_t{0} : 0;
  if (k.phases <= 64)
    for (std::int64_t ky = 0; ky < p.kh; ++ky)
      for (std::int64_t kx = 0; kx < p.kw; ++kx)
        k.used |= std::uint64_t{1} << (((ky * p.dh) % p.sh) * p.sw + (kx * p.dw) % p.sw);
  return k;
}

// Share of SIMD lanes that hold a real output when nb samples are interleaved.
double lane_efficiency(const SparseConvParams& p, std::int64_t nb) {
  const Packing k = plan(p, nb);
  constexpr std::int64_t W = cpu::vec_width<float>();  // this ISA's float register (16 AVX-512, 8 AVX2)
  return static_cast<double>(p.ho * p.wo * nb) / static_cast<double>(round_up(k.grid, W));
}

// Samples per group when the caller leaves it to us: interleave up to a register of samples (16 floats
// on AVX-512 and the baseline, 8 on AVX2; half as many doubles) only when one sample's planes would leave a quarter or more of the lanes idle.
std::int64_t auto_batch_block(const SparseConvParams& p) {
  if (p.n <= 1) return 1;
  const std::int64_t nb = std::min<std::int64_t>(
      p.n, p.dtype == static_cast<int>(DType::kFloat64) ? cpu::vec_width<double>() : cpu::vec_width<float>());
  return lane_efficiency(p, 1) < 0.75 * lane_efficiency(p, nb) ? nb : 1;
}

// Packed buffer of group gi, channel c (all phases): zero padding included, every element written.
template <typename T>
void pack_channel(const SparseConvParams& p, const Packing& k, const T* __restrict x, std::int64_t gi,
                  std::int64_t c, T* __restrict dst) {
  for (std::int64_t py = 0; py < p.sh; ++py) {
    for (std::int64_t px = 0; px < p.sw; ++px) {
      if (!((k.used >> (k.phases > 64 ? 0 : py * p.sw + px)) & 1u)) continue;  // never read (e.g. 1x1, stride 2)
      T* __restrict d = dst + (c * k.phases + py * p.sw + px) * k.plane;
      // columns q with 0 <= q*sw + px - pw < w
      std::int64_t q_lo = p.pw > px ? (p.pw - px + p.sw - 1) / p.sw : 0;
      std::int64_t q_hi = (p.w - 1 + p.pw - px) >= 0 ? (p.w - 1 + p.pw - px) / p.sw + 1 : 0;
      q_lo = std::min(q_lo, k.wq);
      q_hi = std::max(q_lo, std::min(q_hi, k.wq));
      for (std::int64_t r = 0; r < k.hq; ++r) {
        T* __restrict row = d + r * k.wq * k.nb;
        const std::int64_t yy = r * p.sh + py - p.ph;
        if (yy < 0 || yy >= p.h) {
          zero_row(row, k.wq * k.nb);
          continue;
        }
        zero_row(row, q_lo * k.nb);
        zero_row(row + q_hi * k.nb, (k.wq - q_hi) * k.nb);
        const std::int64_t x0 = q_lo * p.sw + px - p.pw;  // first source column
        if (k.nb == 1) {
          const T* __restrict s = x + gi * p.xs_n + c * p.xs_c + yy * p.xs_h + x0 * p.xs_w;
          const std::int64_t step = p.sw * p.xs_w;
          if (step == 1) {
            copy_row(row + q_lo, s, q_hi - q_lo);
          } else if (step == 2) {
            copy_row_stride2(row + q_lo, s, q_hi - q_lo);
          } else {
            for (std::int64_t q = q_lo; q < q_hi; ++q) row[q] = s[(q - q_lo) * step];
          }
        } else {
          const std::int64_t nvalid = std::min(k.nb, p.n - gi * k.nb);
          const T* __restrict s = x + gi * k.nb * p.xs_n + c * p.xs_c + yy * p.xs_h + x0 * p.xs_w;
          const std::int64_t step = p.sw * p.xs_w;
#if defined(HF_SPARSE_SIMD)
          constexpr std::int64_t W = cpu::Simd<T>::W;
          if (step == 1 && k.nb <= W) {  // (sample, column) blocks transposed in registers
            for (std::int64_t q0 = q_lo; q0 < q_hi; q0 += W)
              cpu::transpose_block(s + (q0 - q_lo), p.xs_n, nvalid, std::min(W, q_hi - q0), row + q0 * k.nb, k.nb,
                                   static_cast<const T*>(nullptr));
            if (nvalid < k.nb)
              for (std::int64_t q = q_lo; q < q_hi; ++q) zero_row(row + q * k.nb + nvalid, k.nb - nvalid);
            continue;
          }
#endif
          for (std::int64_t b = 0; b < k.nb; ++b) {
            T* __restrict e = row + q_lo * k.nb + b;
            if (b >= nvalid) {
              for (std::int64_t q = q_lo; q < q_hi; ++q) e[(q - q_lo) * k.nb] = T(0);
              continue;
            }
            const T* __restrict sb = s + b * p.xs_n;
            for (std::int64_t q = q_lo; q < q_hi; ++q) e[(q - q_lo) * k.nb] = sb[(q - q_lo) * step];
          }
        }
      }
    }
  }
}

#if defined(HF_SPARSE_SIMD)
// Lanes [begin, begin + W) of a row of w elements, zero outside [0, w): reads only s[0, w), or, when the
// row has a zero border of `border` cells on each side, one plain load wherever that covers the lanes.
template <typename T>
inline typename cpu::Simd<T>::R padded_lanes(const T* s, std::int64_t begin, std::int64_t w, std::int64_t border) {
  using S = cpu::Simd<T>;
  if (begin >= -border && begin + S::W <= w + border) return S::load(s + begin);
  const std::int64_t lo = std::max<std::int64_t>(0, -begin), hi = std::min<std::int64_t>(S::W, w - begin);
  if (hi <= lo) return S::zero();
  const auto m = static_cast<typename S::M>(((std::uint32_t{1} << hi) - 1u) & ~((std::uint32_t{1} << lo) - 1u));
  return S::expandz(m, s + begin + lo);
}

// pack_channel for stride 2x2, one sample, unit column stride. The generic loop pays a row's set-up
// per phase, and ResNet maps have rows of 8-17 elements; here each source row is read once, two
// registers of its zero-padded form at a time, and split into both column phases.
template <typename T>
void pack_channel_stride2(const SparseConvParams& p, const Packing& k, const T* __restrict x, std::int64_t gi,
                          std::int64_t c, T* __restrict dst) {
  using S = cpu::Simd<T>;
  constexpr std::int64_t W = S::W;
  for (std::int64_t py = 0; py < 2; ++py) {
    const bool even_used = (k.used >> (2 * py)) & 1u, odd_used = (k.used >> (2 * py + 1)) & 1u;
    if (!even_used && !odd_used) continue;
    T* __restrict even_plane = dst + (c * 4 + 2 * py) * k.plane;
    T* __restrict odd_plane = even_plane + k.plane;
    for (std::int64_t r = 0; r < k.hq; ++r) {
      T* __restrict even_row = even_plane + r * k.wq;
      T* __restrict odd_row = odd_plane + r * k.wq;
      const std::int64_t spill = (k.hq - 1 - r) * k.wq;  // the plane's later rows, written after this one
      const std::int64_t yy = 2 * r + py - p.ph;
      if (yy < 0 || yy >= p.h) {
        if (even_used) zero_row(even_row, k.wq, spill);
        if (odd_used) zero_row(odd_row, k.wq, spill);
        continue;
      }
      const T* __restrict s = x + gi * p.xs_n + c * p.xs_c + yy * p.xs_h;
      for (std::int64_t q0 = 0; q0 < k.wq; q0 += W) {  // padded columns 2 q0 .. 2 q0 + 2W, source - pw
        const typename S::R a = padded_lanes(s, 2 * q0 - p.pw, p.w, p.x_border);
        const typename S::R b = padded_lanes(s, 2 * q0 + W - p.pw, p.w, p.x_border);
        if (q0 + W <= k.wq) {
          if (even_used) S::store(even_row + q0, S::even(a, b));
          if (odd_used) S::store(odd_row + q0, S::odd(a, b));
        } else {
          if (even_used) store_row_tail(even_row, q0, k.wq, spill, S::even(a, b));
          if (odd_used) store_row_tail(odd_row, q0, k.wq, spill, S::odd(a, b));
        }
      }
    }
  }
}

// Channels-last input (xs_c == 1), stride 1 (one phase), nb <= W: the packed buffer of group gi from
// (column, channel) or (sample, channel) blocks transposed in registers, every element written.
template <typename T>
void pack_group_nhwc(const SparseConvParams& p, const Packing& k, const T* __restrict x, std::int64_t gi,
                     T* __restrict dst) {
  constexpr std::int64_t W = cpu::Simd<T>::W;
  const std::int64_t chan = k.plane, nvalid = std::min(k.nb, p.n - gi * k.nb);
  const std::int64_t q_lo = std::min(p.pw, k.wq), q_hi = std::min(p.w + p.pw, k.wq);
  const T* xg = x + gi * k.nb * p.xs_n;
  for (std::int64_t r = 0; r < k.hq; ++r) {
    const std::int64_t yy = r - p.ph;
    const std::int64_t rl = r * k.wq * k.nb, rlen = k.wq * k.nb;
    for (std::int64_t c = 0; c < p.in_c; ++c) {  // zero padding (and absent samples) first
      T* row = dst + c * chan + rl;
      if (yy < 0 || yy >= p.h || nvalid < k.nb) {
        zero_row(row, rlen);
      } else {
        zero_row(row, q_lo * k.nb);
        zero_row(row + q_hi * k.nb, rlen - q_hi * k.nb);
      }
    }
    if (yy < 0 || yy >= p.h) continue;
    for (std::int64_t c0 = 0; c0 < p.in_c; c0 += W) {
      const std::int64_t nc = std::min(W, p.in_c - c0);
      if (k.nb == 1) {
        for (std::int64_t q0 = q_lo; q0 < q_hi; q0 += W)
          cpu::transpose_block(xg + yy * p.xs_h + (q0 - p.pw) * p.xs_w + c0, p.xs_w, std::min(W, q_hi - q0), nc,
                               dst + c0 * chan + rl + q0, chan, static_cast<const T*>(nullptr));
      } else {
        for (std::int64_t q = q_lo; q < q_hi; ++q)
          cpu::transpose_block(xg + yy * p.xs_h + (q - p.pw) * p.xs_w + c0, p.xs_n, nvalid, nc,
                               dst + c0 * chan + rl + q * k.nb, chan, static_cast<const T*>(nullptr));
      }
    }
  }
}

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
  for (std::int64_t r = 0; r * W < len; ++r) {
    std::uint32_t bits = 0;
    for (std::int64_t l = 0; l < W; ++l) bits |= static_cast<std::uint32_t>((r * W + l) % wq < wo) << l;
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

// Per nonzero: its constant offset into a group's packed buffer (one division per nonzero: callers
// that run a layer repeatedly cache these through sparse_conv2d_offsets).
template <typename I, typename Off>
void fill_offsets(const SparseConvParams& p, const Packing& k, const I* col, Off* off) {
  const std::int64_t taps = p.kh * p.kw;
  std::int64_t tap_off[64];
  std::int64_t* tap = taps <= 64 ? tap_off : nullptr;
  std::vector<std::int64_t> big;
  if (!tap) {
    big.resize(static_cast<std::size_t>(taps));
    tap = big.data();
  }
  for (std::int64_t ky = 0; ky < p.kh; ++ky)
    for (std::int64_t kx = 0; kx < p.kw; ++kx) {
      const std::int64_t oy = ky * p.dh, ox = kx * p.dw, phase = (oy % p.sh) * p.sw + ox % p.sw;
      tap[ky * p.kw + kx] = (phase * k.hq + oy / p.sh) * k.wq * k.nb + (ox / p.sw) * k.nb;
    }
  const std::int64_t chan = k.phases * k.plane;
  for (std::int64_t t = 0; t < p.nnz; ++t) {
    const std::int64_t cc = static_cast<std::int64_t>(col[t]);
    off[t] = static_cast<Off>((cc / taps) * chan + tap[cc % taps]);
  }
}

// threads: the team to use (1: run on the calling thread alone). in_team: every thread of the caller's
// parallel region (of `threads` threads) makes this call and takes its share of the work; the caller
// synchronises afterwards (the network executor keeps one region across its layers).
template <typename T, typename I, typename Off>
void conv_packed(const SparseConvParams& p, std::int64_t nb, int threads, bool in_team = false) {
  const CsrOperands<T, I> op = csr_operands<T, I>(p);
  const Packing k = plan(p, nb);
  const Off* off = p.off ? ptr<const Off>(p.off) : nullptr;
  if (!off) {
    Off* buf = scratch<Off>(1, p.nnz);
    fill_offsets<I>(p, k, op.col, buf);
    off = buf;
  }
  const std::int64_t tile_rows = std::max<std::int64_t>(1, kTileLanes / (k.wq * nb));
  const std::int64_t tiles = (p.ho + tile_rows - 1) / tile_rows;
  const std::int64_t base = k.groups * tiles, want = 8 * static_cast<std::int64_t>(threads);
  std::int64_t oblocks = base >= want ? 1 : std::min(p.out_c, (want + base - 1) / base);
  std::int64_t ob = (p.out_c + oblocks - 1) / oblocks;
#if defined(HF_SPARSE_SIMD)
  constexpr std::int64_t W = cpu::Simd<T>::W;
  const bool nhwc_in = p.xs_c == 1 && p.in_c > 1 && k.phases == 1 && nb <= W;
  const bool nhwc_out = p.ys_c == 1 && p.out_c > 1 && nb <= W;
  if (nhwc_out) {  // blocks of whole registers of channels
    ob = round_up(ob, W);
    oblocks = (p.out_c + ob - 1) / ob;
  }
#else
  constexpr std::int64_t W = 1;
  constexpr bool nhwc_in = false, nhwc_out = false;
#endif
  const std::int64_t ldt = round_up(tile_rows * k.wq * nb, 16);
  // Accumulators straight to y (FusedStore): one sample per group, unit column strides.
  const bool fused = W > 1 && nb == 1 && !nhwc_out && p.ys_w == 1 && (!p.res || p.rs_w == 1);
  (void)fused;
  const bool par = threads > 1 && (p.nnz + p.out_c) * k.grid * k.groups > kParallelWork;
  // One group's packed input (into dst), serially: the caller's thread owns dst.
  auto pack = [&](std::int64_t gi, T* dst) {
#if defined(HF_SPARSE_SIMD)
    if (nhwc_in) return pack_group_nhwc(p, k, op.x, gi, dst);
    if (nb == 1 && p.sh == 2 && p.sw == 2 && p.xs_w == 1) {
      for (std::int64_t c = 0; c < p.in_c; ++c) pack_channel_stride2(p, k, op.x, gi, c, dst);
      return;
    }
#endif
    for (std::int64_t c = 0; c < p.in_c; ++c) pack_channel(p, k, op.x, gi, c, dst);
  };
  // Output rows [i0, i1) of group gi for output channels [o_begin, o_end), from its packed input.
  auto compute = [&](const T* packed_g, T* tile, std::int64_t gi, std::int64_t t, std::int64_t o_begin,
                     std::int64_t o_end) {
    const std::int64_t i0 = t * tile_rows, i1 = std::min(p.ho, i0 + tile_rows);
    const std::int64_t g0 = i0 * k.wq * nb, len = ((i1 - i0 - 1) * k.wq + p.wo) * nb;
    const T* src = packed_g + g0;
#if defined(HF_SPARSE_SIMD)
    if (fused) {
      using M = typename cpu::Simd<T>::M;
      const std::int64_t nreg = (len + W - 1) / W;
      // lane l of the tile is y's cell i0 * ys_h + l when rows sit at the lane pitch
      const bool y_pitch = p.ys_h == k.wq && (p.wo == k.wq || p.y_gaps_zero);
      const bool res_pitch = p.res && p.rs_h == k.wq;
      const std::int64_t nseg = y_pitch && (!p.res || res_pitch) ? 0 : max_runs(k.wq, W);
      RowSeg<T>* segs = nseg ? scratch<RowSeg<T>>(3, nreg * nseg) : nullptr;
      if (segs) row_segments<T>(p, k, i0, len, nseg, segs);
      M* keep = y_pitch ? scratch<M>(5, nreg) : nullptr;
      if (keep) column_masks<T>(k.wq, p.wo, len, keep);
      const T* res = p.res ? ptr<const T>(p.res) + gi * p.rs_n + (res_pitch ? i0 * p.rs_h : 0) : nullptr;
      T* y = op.y + gi * p.ys_n + (y_pitch ? i0 * p.ys_h : 0);
      for (std::int64_t o = o_begin; o < o_end; ++o) {
        const std::int64_t j0 = op.rowptr[o], j1 = op.rowptr[o + 1];
        const FusedStore<T> st{segs, nseg, keep, y + o * p.ys_c, res ? res + o * p.rs_c : nullptr, res_pitch,
                               cpu::Simd<T>::set1(op.bias ? op.bias[o] : T(0)), p.relu};
        cpu::gather_row_emit(off + j0, op.val + j0, j1 - j0, src, 1, len, st);
      }
      return;
    }
#endif
    for (std::int64_t o0 = o_begin; o0 < o_end; o0 += W) {
      const std::int64_t no = std::min(W, o_end - o0);
      for (std::int64_t o = o0; o < o0 + no; ++o) {
        T* to = tile + (nhwc_out ? (o - o0) * ldt : 0);
        const std::int64_t j0 = op.rowptr[o], j1 = op.rowptr[o + 1];
        gather_row(off + j0, op.val + j0, j1 - j0, src, 1, len, to);
        epilogue_tile(to, len, op.bias, o, p.relu && !p.res);
        if (!nhwc_out) store_rows(p, k, to, gi, o, i0, i1, op.y);
      }
#if defined(HF_SPARSE_SIMD)
      if (nhwc_out) store_rows_nhwc(p, k, tile, ldt, gi, o0, no, i0, i1, op.y);
#endif
    }
    if (p.res) add_residual(p, k, gi, o_begin, o_end, i0, i1, op.y);
  };
  // A prepacked input (the network executor's, one group) is read in place.
  const T* prepacked = p.prepacked ? op.x : nullptr;
  // A team's share: every thread packs all the (few, small) groups itself and takes a static share of
  // the (group, tile, channel block) items; no barrier (the region's end or the caller's).
  auto team_share = [&]() {
    T* own = prepacked ? nullptr : scratch<T>(0, k.groups * k.gsize);
    const T* packed = prepacked ? prepacked : own;
    T* tile = scratch<T>(2, (nhwc_out ? W : 1) * ldt);
    if (!prepacked)
      for (std::int64_t gi = 0; gi < k.groups; ++gi) pack(gi, own + gi * k.gsize);
#pragma omp for schedule(static) collapse(3) nowait
    for (std::int64_t gi = 0; gi < k.groups; ++gi)
      for (std::int64_t t = 0; t < tiles; ++t)
        for (std::int64_t b = 0; b < oblocks; ++b)
          compute(packed + gi * k.gsize, tile, gi, t, b * ob, std::min(p.out_c, (b + 1) * ob));
  };
  if (in_team) return team_share();
  // A single barrier (the region's end): with at least a group per thread every thread packs and
  // computes whole groups (its packed input stays in its L2); otherwise the team shares the items.
  if (k.groups >= threads || !par) {
#pragma omp parallel for schedule(static) if (par)
    for (std::int64_t gi = 0; gi < k.groups; ++gi) {
      T* packed = prepacked ? nullptr : scratch<T>(0, k.gsize);
      T* tile = scratch<T>(2, (nhwc_out ? W : 1) * ldt);
      if (!prepacked) pack(gi, packed);
      for (std::int64_t t = 0; t < tiles; ++t) compute(prepacked ? prepacked : packed, tile, gi, t, 0, p.out_c);
    }
    return;
  }
#pragma omp parallel
  team_share();
}

template <typename T, typename I>
void conv_direct(const SparseConvParams& p) {
  const CsrOperands<T, I> op = csr_operands<T, I>(p);
#pragma omp parallel for collapse(2) schedule(static) if ((p.nnz + p.out_c) * p.n * p.ho * p.wo > kParallelWork)
  for (std::int64_t b = 0; b < p.n; ++b)
    for (std::int64_t o = 0; o < p.out_c; ++o)
      for (std::int64_t i = 0; i < p.ho; ++i)
        for (std::int64_t j = 0; j < p.wo; ++j)
          op.y[b * p.ys_n + o * p.ys_c + i * p.ys_h + j * p.ys_w] =
              conv_epilogue(sparse_conv_point(p, op.rowptr, op.col, op.val, op.x, b, o, i, j), op.bias, o, p.relu,
                            conv_residual(p, ptr<const T>(p.res), b, o, i, j));
}

}  // namespace

void sparse_conv2d(CpuTag, const SparseConvParams& p) {
  checked_dispatch_index(p, "sparse_conv2d", [&](auto zero, auto izero) {
    using T = decltype(zero);
    using I = decltype(izero);
    if (p.algo == 1) return conv_direct<T, I>(p);
    const std::int64_t nb = p.batch_block ? p.batch_block : auto_batch_block(p);
    const Packing k = plan(p, nb);
    if (k.gsize < (std::int64_t{1} << 31)) {
      conv_packed<T, I, std::int32_t>(p, nb, max_threads());
    } else {
      require(p.off == 0, "sparse_conv2d: 64-bit offsets cannot be precomputed");
      conv_packed<T, I, std::int64_t>(p, nb, max_threads());
    }
  });
}

template <typename T, typename I>
void sparse_conv2d_on(const SparseConvParams& p, int threads, bool in_team) {
  conv_packed<T, I, std::int32_t>(p, 1, threads, in_team);
}
template void sparse_conv2d_on<float, std::int32_t>(const SparseConvParams&, int, bool);
template void sparse_conv2d_on<float, std::int64_t>(const SparseConvParams&, int, bool);
template void sparse_conv2d_on<double, std::int32_t>(const SparseConvParams&, int, bool);
template void sparse_conv2d_on<double, std::int64_t>(const SparseConvParams&, int, bool);

template <typename T>
const T* sparse_conv2d_packed_scratch(const SparseConvParams& p) {
  return scratch<T>(0, plan(p, 1).gsize);  // the serial path's buffer (one group)
}
template const float* sparse_conv2d_packed_scratch<float>(const SparseConvParams&);
template const double* sparse_conv2d_packed_scratch<double>(const SparseConvParams&);

bool sparse_conv2d_team_pays(const SparseConvParams& p) {
  return (p.nnz + p.out_c) * plan(p, 1).grid > kParallelWork;
}

std::int64_t sparse_conv2d_batch_block(const SparseConvParams& p) {
  check(p);
  return auto_batch_block(p);
}

bool sparse_conv2d_offsets(const SparseConvParams& p) {
  check(p);
  require(p.batch_block > 0 && p.off != 0, "sparse_conv2d_offsets: needs batch_block > 0 and an off buffer");
  const Packing k = plan(p, p.batch_block);
  if (k.gsize >= (std::int64_t{1} << 31)) return false;
  dispatch_index(p.itype, "sparse_conv2d_offsets", [&](auto izero) {
    using I = decltype(izero);
    fill_offsets<I>(p, k, ptr<const I>(p.col), ptr<std::int32_t>(p.off));
  });
  return true;
}

HF_ISA_END
}  // namespace hf
