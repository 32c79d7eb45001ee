// pybind11 bindings for the in-place group norm, shared by the CPU (_C) and CUDA (_C_cuda) modules.
#pragma once

#include <pybind11/pybind11.h>

#include "hf_norm.h"

namespace hf {

template <class Tag>
void bind_norm(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  m.def("group_norm_",
        [](u x, u weight, u bias, std::int64_t n, std::int64_t hw, std::int64_t c, std::int64_t groups, double eps,
           bool relu, int dtype, u stream) {
          group_norm_(Tag{}, GroupNormParams{x, weight, bias, n, hw, c, groups, eps, relu, dtype, stream});
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("n"), py::arg("hw"), py::arg("c"),
        py::arg("groups"), py::arg("eps"), py::arg("relu"), py::arg("dtype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "In-place GroupNorm (+ ReLU) of an n x hw x c (NHWC) map; weight and bias of size c, or both 0.");
}

}  // namespace hf
