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

#include "conv_pack.h"
#include "conv_store.h"
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
