// pybind11 bindings for the fused drift integration, shared by the CPU (_C) and CUDA (_C_cuda)
// modules.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "hf_drift.h"

namespace hf {

template <class Tag>
void bind_drift(pybind11::module_& m) {
  namespace py = pybind11;
  using u = std::uintptr_t;
  using i64 = std::int64_t;
  m.def("drift_integrate",
        [](u w_in, u w_mid, u b_mid, u w_out, u b_out, u task_bias, u time_table, u state, u steps_done,
           i64 tasks, i64 params, i64 hidden, i64 steps, i64 stages, std::vector<double> a, std::vector<double> b,
           double dt, double max_increment, int dtype, u stream) {
          drift_integrate(Tag{}, DriftParams{w_in, w_mid, b_mid, w_out, b_out, task_bias, time_table, state,
                                             steps_done, tasks, params, hidden, steps, stages, std::move(a),
                                             std::move(b), dt, max_increment, dtype, stream});
        },
        py::arg("w_in"), py::arg("w_mid"), py::arg("b_mid"), py::arg("w_out"), py::arg("b_out"),
        py::arg("task_bias"), py::arg("time_table"), py::arg("state"), py::arg("steps_done"), py::arg("tasks"),
        py::arg("params"), py::arg("hidden"), py::arg("steps"), py::arg("stages"), py::arg("a"), py::arg("b"),
        py::arg("dt"), py::arg("max_increment"), py::arg("dtype"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Integrate the packed drift network in place: state (tasks x params) advanced `steps` explicit "
        "Runge-Kutta steps (tableau a: stages*stages row-major, b: stages) with the divergence guard; "
        "steps_done (tasks, int64) counts the accepted steps.");
}

}  // namespace hf
