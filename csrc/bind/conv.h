// pybind11 bindings for the direct sparse convolution, shared by the CPU (_C) and CUDA (_C_cuda) modules.
#pragma once

#include <pybind11/pybind11.h>

#include <type_traits>

#include "hf_conv.h"

namespace hf {

namespace conv_bind {
using u = std::uintptr_t;
using i64 = std::int64_t;

// Every entry takes the full parameter set by keyword (the order of SparseConvParams).
#define HF_CONV_SIG                                                                                                   \
  u rowptr, u col, u val, u x, u bias, u y, i64 n, i64 in_c, i64 h, i64 w, i64 out_c, i64 ho, i64 wo, i64 kh, i64 kw, \
      i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 nnz, i64 xs_n, i64 xs_c, i64 xs_h, i64 xs_w, i64 ys_n,      \
      i64 ys_c, i64 ys_h, i64 ys_w, u res, i64 rs_n, i64 rs_c, i64 rs_h, i64 rs_w, i64 batch_block, u off, int algo, bool relu, int dtype, int itype, u stream
#define HF_CONV_PARAMS                                                                                                \
  SparseConvParams {                                                                                                  \
    rowptr, col, val, x, bias, y, n, in_c, h, w, out_c, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, nnz, xs_n, xs_c,      \
        xs_h, xs_w, ys_n, ys_c, ys_h, ys_w, res, rs_n, rs_c, rs_h, rs_w, batch_block, off, algo, relu, dtype, itype, stream                        \
  }
}  // namespace conv_bind

#define HF_CONV_PY_ARGS                                                                                              \
  py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("n"),      \
      py::arg("in_c"), py::arg("h"), py::arg("w"), py::arg("out_c"), py::arg("ho"), py::arg("wo"), py::arg("kh"),    \
      py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),       \
      py::arg("nnz"), py::arg("xs_n"), py::arg("xs_c"), py::arg("xs_h"), py::arg("xs_w"), py::arg("ys_n"),           \
      py::arg("ys_c"), py::arg("ys_h"), py::arg("ys_w"), py::arg("res"), py::arg("rs_n"), py::arg("rs_c"),          \
      py::arg("rs_h"), py::arg("rs_w"), py::arg("batch_block"), py::arg("off"), py::arg("algo"),    \
      py::arg("relu"), py::arg("dtype"), py::arg("itype"), py::arg("stream")

template <class Tag>
void bind_conv(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace conv_bind;
  m.def("sparse_conv2d", [](HF_CONV_SIG) { sparse_conv2d(Tag{}, HF_CONV_PARAMS); }, HF_CONV_PY_ARGS,
        py::call_guard<py::gil_scoped_release>(),
        "y (n x out_c x ho x wo, strided) = act(conv2d(x, W) + bias), W in CSR (out_c x in_c*kh*kw).");
  if constexpr (std::is_same_v<Tag, CpuTag>) {
    m.def("sparse_conv2d_batch_block", [](HF_CONV_SIG) { return sparse_conv2d_batch_block(HF_CONV_PARAMS); },
          HF_CONV_PY_ARGS, "Samples per packed group that sparse_conv2d picks for batch_block = 0.");
    m.def(
        "sparse_conv2d_offsets",
        [](HF_CONV_SIG, i64 lane_pitch) {
          SparseConvParams p = HF_CONV_PARAMS;
          p.lane_pitch = lane_pitch;
          return sparse_conv2d_offsets(p);
        },
        HF_CONV_PY_ARGS, py::arg("lane_pitch") = 0, py::call_guard<py::gil_scoped_release>(),
        "Fill off (nnz int32) with the tap offsets for this geometry, batch_block and lane_pitch (the network "
        "executor's packed row width, 0: the natural one); False if 64-bit are needed.");
  }
}

#undef HF_CONV_PY_ARGS
#undef HF_CONV_SIG
#undef HF_CONV_PARAMS

}  // namespace hf
