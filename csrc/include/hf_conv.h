// Direct sparse 2-D convolution (groups = 1, zero padding) with a CSR weight, for inference:
//
//   y[n, o, i, j] = act(bias[o] + sum over the nonzeros (c, ky, kx) of row o of
//                   w * x[n, c, i*sh - ph + ky*dh, j*sw - pw + kx*dw])     (out-of-range x = 0)
//
// The weight is CSR (out_channels x in_channels*kh*kw), column c*kh*kw + ky*kw + kx (the layout
// of conv.weight.reshape(out_channels, -1)). Parameter struct, the arithmetic both back-ends
// share (tap decoding, the per-output body, the epilogue), and the CPU / CUDA entry points.
#pragma once

#include "hf_common.h"
#include "hf_core.h"  // CpuTag / CudaTag

namespace hf {

struct SparseConvParams {
  std::uintptr_t rowptr;  // out_c + 1, monotone, rowptr[0] == 0, rowptr[out_c] == nnz
  std::uintptr_t col;     // nnz, each in [0, in_c*kh*kw)
  std::uintptr_t val;     // nnz
  std::uintptr_t x;       // n x in_c x h x w, element (b, c, i, j) at x[b*xs_n + c*xs_c + i*xs_h + j*xs_w]
  std::uintptr_t bias;    // out_c, or 0
  std::uintptr_t y;       // n x out_c x ho x wo, element (b, o, i, j) at y[b*ys_n + o*ys_c + i*ys_h + j*ys_w]
  std::int64_t n, in_c, h, w, out_c, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, nnz;
  std::int64_t xs_n, xs_c, xs_h, xs_w, ys_n, ys_c, ys_h, ys_w;
  std::uintptr_t res;                // n x out_c x ho x wo added before the ReLU (a residual), strides rs_*, or 0
  std::int64_t rs_n, rs_c, rs_h, rs_w;
  std::int64_t batch_block;  // CPU: samples interleaved in the packed input (1 = one sample's planes); 0 = auto
  std::uintptr_t off;        // CPU: nnz int32 tap offsets from sparse_conv2d_offsets for this geometry and
                             // batch_block (then batch_block != 0), or 0 to compute them in the call
  int algo;                  // CPU: 0 = packed shifted rows (production), 1 = the per-output body (as CUDA)
  bool relu;
  int dtype, itype;
  std::uintptr_t stream;
  // CPU, set only by the network executor (never by the bindings): x is already the packed buffer of
  // one sample (stride 1, planes of (h + 2 ph) x (w + 2 pw) with a zero border, xs_* their strides).
  bool prepacked = false;
  // CPU, network executor only: the cells between y's rows (each row's ys_h - wo cells past wo) are a
  // zero border this call may write zeros to, so rows laid out with the packed lane pitch (ys_h == the
  // packed row width) take whole-register stores instead of one masked store per row run.
  bool y_gaps_zero = false;
  // CPU, network executor and sparse_conv2d_offsets only: packed rows of at least this many lanes (0: the
  // geometry's own width, packed_row_width), so that output rows with this pitch take those stores.
  std::int64_t lane_pitch = 0;
  // CPU, network executor only: every plane of x has a zero border of this many cells around its h x w
  // interior (x points at the interior), which packing may read instead of masking.
  std::int64_t x_border = 0;
};

HF_ISA_BEGIN
// Output size of one spatial dimension (as torch.nn.functional.conv2d).
HF_HD std::int64_t conv_out_size(std::int64_t size, std::int64_t k, std::int64_t s, std::int64_t p,
                                 std::int64_t d) {
  return (size + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Column index of the CSR weight -> (input channel, kernel row, kernel column).
template <typename I>
HF_HD void conv_tap(I col, std::int64_t kh, std::int64_t kw, std::int64_t& c, std::int64_t& ky, std::int64_t& kx) {
  const std::int64_t k = static_cast<std::int64_t>(col), taps = kh * kw;
  c = k / taps;
  ky = (k % taps) / kw;
  kx = k % kw;
}

// bias + accumulator (+ a residual), then ReLU when asked (a NaN stays NaN, as in torch.relu).
template <typename T>
HF_HD T conv_epilogue(T acc, const T* bias, std::int64_t o, bool relu, T res = T(0)) {
  const T v = (bias ? acc + bias[o] : acc) + res;
  return relu && !(v > T(0)) && v == v ? T(0) : v;
}

// The residual added to output y[b, o, i, j] before the ReLU (zero for none).
template <typename T>
HF_HD T conv_residual(const SparseConvParams& p, const T* res, std::int64_t b, std::int64_t o, std::int64_t i,
                      std::int64_t j) {
  return res ? res[b * p.rs_n + o * p.rs_c + i * p.rs_h + j * p.rs_w] : T(0);
}

// One output y[b, o, i, j] before the epilogue: the sum over row o's nonzeros of the weight times
// the input tap, skipping taps that fall in the zero padding. The CUDA kernel runs this per output;
// the CPU runs it with algo = 1 (the tests check it against F.conv2d there).
template <typename T, typename I>
HF_HD T sparse_conv_point(const SparseConvParams& p, const I* rowptr, const I* col, const T* val, const T* x,
                          std::int64_t b, std::int64_t o, std::int64_t i, std::int64_t j) {
  T acc = T(0);
  const std::int64_t y0 = i * p.sh - p.ph, x0 = j * p.sw - p.pw;
  const T* xb = x + b * p.xs_n;
  for (I t = rowptr[o]; t < rowptr[o + 1]; ++t) {
    std::int64_t c, ky, kx;
    conv_tap(col[t], p.kh, p.kw, c, ky, kx);
    const std::int64_t yy = y0 + ky * p.dh, xx = x0 + kx * p.dw;
    if (yy >= 0 && yy < p.h && xx >= 0 && xx < p.w) acc += val[t] * xb[c * p.xs_c + yy * p.xs_h + xx * p.xs_w];
  }
  return acc;
}

void sparse_conv2d(CpuTag, const SparseConvParams& p);
// CPU: the samples per packed group sparse_conv2d picks when batch_block = 0.
std::int64_t sparse_conv2d_batch_block(const SparseConvParams& p);
// CPU: fill p.off (nnz int32) with the tap offsets for p's geometry and p.batch_block (!= 0);
// false (nothing written) when a group's packed buffer needs 64-bit offsets.
bool sparse_conv2d_offsets(const SparseConvParams& p);
void sparse_conv2d(CudaTag, const SparseConvParams& p);
// CPU, checked by the caller: the packed path with one sample per group (batch_block 1, int32 offsets
// in p.off) on a team of `threads` (1: the calling thread alone; in_team: called by every thread of the
// caller's parallel region, which synchronises afterwards). The network executor's building block.
template <typename T, typename I>
void sparse_conv2d_on(const SparseConvParams& p, int threads, bool in_team = false);
// CPU: whether one sample of p has the work for a team of threads (else one thread is faster).
bool sparse_conv2d_team_pays(const SparseConvParams& p);
// CPU: the calling thread's buffer that sparse_conv2d_on packs one sample of p's geometry into (valid
// until its next convolution), so a following convolution of the same geometry can read it prepacked.
template <typename T>
const T* sparse_conv2d_packed_scratch(const SparseConvParams& p);

// Lanes of one packed input row of one sample before lane_pitch: the padded width over the column stride.
inline std::int64_t packed_row_width(const SparseConvParams& p) { return (p.w + 2 * p.pw + p.sw - 1) / p.sw; }

// An empty batch or no output channels: nothing to write (both back-ends return first).
inline bool nothing_to_do(const SparseConvParams& p) { return p.n == 0 || p.out_c == 0; }

inline void check(const SparseConvParams& p) {
  require(p.n >= 0 && p.in_c > 0 && p.h > 0 && p.w > 0 && p.out_c >= 0 && p.nnz >= 0, "sparse_conv2d: bad size");
  require(p.kh > 0 && p.kw > 0 && p.sh > 0 && p.sw > 0 && p.dh > 0 && p.dw > 0 && p.ph >= 0 && p.pw >= 0,
          "sparse_conv2d: kernel, stride and dilation must be positive, padding non-negative");
  require(p.ho == conv_out_size(p.h, p.kh, p.sh, p.ph, p.dh) && p.wo == conv_out_size(p.w, p.kw, p.sw, p.pw, p.dw) &&
              p.ho > 0 && p.wo > 0,
          "sparse_conv2d: output size does not match the convolution");
  require(p.rowptr && (p.y || p.n * p.out_c == 0), "sparse_conv2d: null pointer");
  require(p.nnz == 0 || (p.col && p.val && (p.x || p.n == 0)), "sparse_conv2d: null pointer");
  require(p.batch_block >= 0 && (p.algo == 0 || p.algo == 1), "sparse_conv2d: bad batch_block or algo");
  require(p.off == 0 || p.batch_block > 0, "sparse_conv2d: precomputed offsets need an explicit batch_block");
  require(p.lane_pitch == 0 || (p.lane_pitch >= packed_row_width(p) && p.lane_pitch <= 2 * packed_row_width(p) + 16),
          "sparse_conv2d: lane_pitch must be 0 or at least the packed row width (and not far past it)");
  // Stride 1: the executor's zero-bordered planes, described by xs_*; otherwise the phase-split buffer
  // sparse_conv2d_packed_scratch gives (what the previous call of the same geometry packed).
  require(!p.prepacked || (p.n == 1 && p.batch_block == 1 && p.algo == 0 &&
                           (p.sh * p.sw > 1 || (p.lane_pitch == 0 && p.xs_w == 1 && p.xs_h == p.w + 2 * p.pw &&
                                                p.xs_c == (p.h + 2 * p.ph) * p.xs_h))),
          "sparse_conv2d: a prepacked input must be one sample's packed buffer");
}

HF_ISA_END
}  // namespace hf
