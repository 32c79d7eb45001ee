// pybind11 bindings for the core ops, shared by the CPU (_C) and CUDA (_C_cuda) modules.
#pragma once

#include <pybind11/pybind11.h>

#include "hf_core.h"

namespace hf {

template <class Tag>
void bind_core(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  m.def("euler_axpy",
        [](u theta, u drift, u out, std::int64_t n, double dt, int dtype, u stream) {
          euler_axpy(Tag{}, EulerParams{theta, drift, out, n, dt, dtype, stream});
        },
        py::arg("theta"), py::arg("drift"), py::arg("out"), py::arg("n"), py::arg("dt"),
        py::arg("dtype"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
        "out = theta + dt * drift over n contiguous elements.");
  m.def("csr_spmm",
        [](u rowptr, u col, u val, u b, u out, std::int64_t rows, std::int64_t k, std::int64_t n,
           std::int64_t nnz, std::int64_t ldb, std::int64_t ldo, int dtype, int itype, u stream) {
          csr_spmm(Tag{}, CsrSpmmParams{rowptr, col, val, b, out, rows, k, n, nnz, ldb, ldo, dtype, itype, stream});
        },
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("b"), py::arg("out"),
        py::arg("rows"), py::arg("k"), py::arg("n"), py::arg("nnz"), py::arg("ldb"), py::arg("ldo"),
        py::arg("dtype"), py::arg("itype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(), "out (rows x n) = CSR A (rows x k) @ B (k x n).");
}

}  // namespace hf
