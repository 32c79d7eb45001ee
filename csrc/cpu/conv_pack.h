// Packing the input of the direct sparse convolution (conv.cpp describes the layout): the geometry of a
// packed group (Packing, plan) and the per-layout packers (NCHW rows, stride-2 phase split, channels-last
// register transposes). Included by conv.cpp only, once per ISA translation unit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "hf_conv.h"
#include "hf_sparse_cpu.h"

namespace hf {
HF_ISA_BEGIN
namespace {
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
  return static_cast<double>(p.ho * p.wo * nb) / static_cast<double>(cpu::round_up(k.grid, W));
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
#endif

}  // namespace
HF_ISA_END
}  // namespace hf
