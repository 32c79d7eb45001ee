// pybind11 bindings for the fused flow step, shared by the CPU (_C) and CUDA (_C_cuda) modules.
#pragma once

#include <pybind11/pybind11.h>

#include "hf_flowacc.h"

namespace hf {

template <class Tag>
void bind_flowacc(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  m.def("flow_step",
        [](u weight, u grad_eff, u scores, u flow, u exp_avg, u exp_avg_sq, u grad_weight, u new_mask,
           std::int64_t n, double flow_decay, double ste_scale, double pressure, double beta1, double beta2,
           double step_size, double bc2_sqrt, double eps, bool check_finite, int dtype, u stream) {
          flow_step(Tag{}, FlowStepParams{weight, grad_eff, scores, flow, exp_avg, exp_avg_sq, grad_weight, new_mask,
                                          n, flow_decay, ste_scale, pressure, beta1, beta2, step_size, bc2_sqrt,
                                          eps, check_finite, dtype, stream});
        },
        py::arg("weight"), py::arg("grad_eff"), py::arg("scores"), py::arg("flow"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("grad_weight"), py::arg("new_mask"), py::arg("n"), py::arg("flow_decay"),
        py::arg("ste_scale"), py::arg("pressure"), py::arg("beta1"), py::arg("beta2"), py::arg("step_size"),
        py::arg("bc2_sqrt"), py::arg("eps"), py::arg("check_finite"), py::arg("dtype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Fused flow step over n contiguous elements: masked weight gradient, flow EMA, score gradient with "
        "pressure, Adam on the scores (in place), new mask.");
}

}  // namespace hf
