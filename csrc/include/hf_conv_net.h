// Depth-first execution of a chain of sparse convolutions and pools (CPU), for inference:
// a whole feature extractor in one call. Each sample goes through every step before the next
// sample starts, so its activations live in the thread's cache-resident scratch instead of
// round-tripping through memory between layers; samples run in parallel, one per thread. With a
// single sample, every convolution uses the whole team instead.
//
// A program is an array of ConvNetStep (all int64, built and validated by the Python wrapper
// hyperflow_ext/sparse/network.py). Steps read and write activation slots: slot 0 is the network
// input x (any strides), every other slot one sample's NCHW map in the thread's scratch, its planes
// surrounded by a zero border of slot_border[slot] pixels. A stride-1 convolution whose padding is
// its input slot's border reads the slot as its packed input (no copy). The last step writes y[b]
// (NCHW, contiguous per sample) instead of a slot.
#pragma once

#include "hf_common.h"
#include "hf_conv.h"
#include "hf_core.h"  // CpuTag

namespace hf {

enum ConvNetKind : std::int64_t { kNetConv = 0, kNetMaxPool = 1, kNetAvgPool = 2, kNetLinear = 3 };

struct ConvNetStep {
  std::int64_t kind;
  std::int64_t in, res, out;     // slots; res = -1: none (convolutions only, added before the ReLU)
  std::int64_t c, h, w;          // input map of one sample
  std::int64_t oc, oh, ow;       // output map of one sample
  std::int64_t kh, kw, sh, sw;   // kernel and stride (convolutions and max pools)
  std::int64_t ph, pw, dh, dw;   // padding and dilation (convolutions)
  std::int64_t nnz, relu;        // convolutions
  std::int64_t rowptr, col, val, bias, off;  // convolutions: CSR arrays, bias or 0, int32 tap offsets (batch block 1);
                                             // linear (c x 1 x 1 -> oc x 1 x 1): val the oc x c row-major weight, bias
  std::int64_t prepacked;        // convolutions: 0 pack the input; 1 read the input slot in place (stride 1,
                                 // padding = its border); 2 read what the previous step (same geometry) packed
  std::int64_t lane_pitch;       // convolutions: packed row width (SparseConvParams::lane_pitch; 0: natural),
                                 // the output slot's row pitch where that saves masked stores; off matches it
};
constexpr std::int64_t kConvNetStepFields = 27;
static_assert(sizeof(ConvNetStep) == kConvNetStepFields * sizeof(std::int64_t), "ConvNetStep must be 27 int64");

struct ConvNetParams {
  std::uintptr_t steps;      // nsteps ConvNetStep
  std::int64_t nsteps;
  std::uintptr_t slot_size;  // 2 x nslots int64: elements of one sample's bordered map per slot, then each
                             // slot's border (slot 0, the input: unused)
  std::int64_t nslots;
  std::uintptr_t x;          // n x c x h x w of step 0's input, element (b, c, i, j) at b*xs_n + c*xs_c + i*xs_h + j*xs_w
  std::int64_t n, xs_n, xs_c, xs_h, xs_w;
  std::uintptr_t y;          // n x (last step's oc*oh*ow), contiguous
  int dtype, itype;
  int threads;               // at most this many threads (0: the OpenMP default)
};

HF_ISA_BEGIN
void sparse_conv_net(CpuTag, const ConvNetParams& p);

HF_ISA_END
}  // namespace hf
