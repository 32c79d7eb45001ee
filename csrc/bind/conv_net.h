// pybind11 binding of the depth-first network executor (CPU module only).
#pragma once

#include <pybind11/pybind11.h>

#include "hf_conv_net.h"

namespace hf {

template <class Tag>  // CpuTag only (a template, so the CUDA module never instantiates it)
void bind_conv_net(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  using i64 = std::int64_t;
  m.def("sparse_conv_net",
        [](u steps, i64 nsteps, u slot_size, i64 nslots, u x, i64 n, i64 xs_n, i64 xs_c, i64 xs_h, i64 xs_w, u y,
           int dtype, int itype, int threads) {
          sparse_conv_net(Tag{}, ConvNetParams{steps, nsteps, slot_size, nslots, x, n, xs_n, xs_c, xs_h, xs_w, y,
                                                  dtype, itype, threads});
        },
        py::arg("steps"), py::arg("nsteps"), py::arg("slot_size"), py::arg("nslots"), py::arg("x"), py::arg("n"),
        py::arg("xs_n"), py::arg("xs_c"), py::arg("xs_h"), py::arg("xs_w"), py::arg("y"), py::arg("dtype"),
        py::arg("itype"), py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "Run a program of sparse convolutions and pools (ConvNetStep, int64) over n samples, depth-first, on at most\n"
        "threads threads (0: the OpenMP default).");
  m.attr("conv_net_step_fields") = kConvNetStepFields;
}

}  // namespace hf
