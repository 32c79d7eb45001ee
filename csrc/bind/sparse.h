// pybind11 bindings for the sparse family (masked matmuls, CSR linear, batched CSR SpMM),
// shared by the CPU (_C) and CUDA (_C_cuda) modules.
#pragma once

#include <pybind11/pybind11.h>

#include "hf_sparse.h"

namespace hf {

template <class Tag>
void bind_sparse(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  using i64 = std::int64_t;
  m.def("masked_matmul",
        [](u x, u w, u mask, u bias, u y, i64 batch, i64 in, i64 out, i64 x_sb, i64 x_si, i64 ldw, i64 ldy,
           int dtype, u stream) {
          masked_matmul(Tag{}, MaskedMatmulParams{x, w, mask, bias, y, batch, in, out, x_sb, x_si, ldw, ldy, dtype,
                                                  stream});
        },
        py::arg("x"), py::arg("w"), py::arg("mask"), py::arg("bias"), py::arg("y"), py::arg("batch"), py::arg("in_"),
        py::arg("out"), py::arg("x_sb"), py::arg("x_si"), py::arg("ldw"), py::arg("ldy"), py::arg("dtype"),
        py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
        "y (batch x out) = x (batch x in) @ (W ⊙ m)ᵀ + bias, skipping masked entries.");
  m.def("masked_matmul_grad_input",
        [](u g, u w, u mask, u gx, i64 batch, i64 in, i64 out, i64 g_sb, i64 g_so, i64 ldw, i64 ldgx, int dtype,
           u stream) {
          masked_matmul_grad_input(Tag{}, MaskedGradInputParams{g, w, mask, gx, batch, in, out, g_sb, g_so, ldw, ldgx,
                                                                dtype, stream});
        },
        py::arg("g"), py::arg("w"), py::arg("mask"), py::arg("gx"), py::arg("batch"), py::arg("in_"), py::arg("out"),
        py::arg("g_sb"), py::arg("g_so"), py::arg("ldw"), py::arg("ldgx"), py::arg("dtype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "gx (batch x in) = g (batch x out) @ (W ⊙ m), skipping masked entries.");
  m.def("csr_linear",
        [](u rowptr, u col, u val, u x, u bias, u y, i64 batch, i64 in, i64 out, i64 nnz, i64 x_sb, i64 x_si,
           i64 ldy, int dtype, int itype, u stream) {
          csr_linear(Tag{}, CsrLinearParams{rowptr, col, val, x, bias, y, batch, in, out, nnz, x_sb, x_si, ldy, dtype,
                                            itype, stream});
        },
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("x"), py::arg("bias"), py::arg("y"),
        py::arg("batch"), py::arg("in_"), py::arg("out"), py::arg("nnz"), py::arg("x_sb"), py::arg("x_si"),
        py::arg("ldy"), py::arg("dtype"), py::arg("itype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(), "y (batch x out) = x (batch x in) @ Wᵀ + bias, W in CSR.");
  m.def("csr_spmm_batched",
        [](u rowptr, u col, u val, u b, u out, i64 batch, i64 rows, i64 k, i64 n, i64 nnz, i64 b_bs, i64 ldb,
           i64 o_bs, i64 ldo, int dtype, int itype, u stream) {
          csr_spmm_batched(Tag{}, CsrSpmmBatchedParams{rowptr, col, val, b, out, batch, rows, k, n, nnz, b_bs, ldb,
                                                       o_bs, ldo, dtype, itype, stream});
        },
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("b"), py::arg("out"), py::arg("batch"),
        py::arg("rows"), py::arg("k"), py::arg("n"), py::arg("nnz"), py::arg("b_bs"), py::arg("ldb"), py::arg("o_bs"),
        py::arg("ldo"), py::arg("dtype"), py::arg("itype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(), "out[s] (rows x n) = CSR A (rows x k) @ B[s] (k x n).");
  m.def("score_mask",
        [](u scores, u mask, u count, i64 n, int dtype, u stream) {
          score_mask(Tag{}, ScoreMaskParams{scores, mask, count, n, dtype, stream});
        },
        py::arg("scores"), py::arg("mask"), py::arg("count"), py::arg("n"), py::arg("dtype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "mask = scores >= 0 over n contiguous elements; *count = number of active entries (int64).");
}

}  // namespace hf
