// hyperflow_ext._C: the CPU extension module. Never sees a torch tensor: the Python wrappers
// validate tensors and pass raw pointers and sizes.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bind/all.h"
#include "hf_isa.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "hyperflow CPU kernels (OpenMP)";
  hf::bind_all<hf::CpuTag>(m);
  m.def("omp_max_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("omp_set_num_threads", [](int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#endif
  }, pybind11::arg("n"), "Threads of this module's OpenMP parallel regions (torch.set_num_threads does not reach them).");
  m.def("isa", [] { return hf::isa_active(); },
        "The active ISA path of the CPU kernels (picked at first use: $HYPERFLOW_ISA, else the best this CPU runs).");
  m.def("isa_compiled", [] { return hf::isa_compiled(); }, "The ISA paths this build holds, best first.");
  m.def("isa_supported", [](const std::string& isa) { return hf::isa_supported(isa); }, pybind11::arg("isa"),
        "Whether this CPU (and OS) can run the named ISA path.");
  m.def("isa_select", [](const std::string& isa) { hf::isa_select(isa); }, pybind11::arg("isa"),
        "Make the named ISA path active (ValueError if unknown or unsupported here).");
  m.def("build_info", [] {
    std::string s = "cpu; compiler " __VERSION__;
#ifdef _OPENMP
    s += "; openmp " + std::to_string(_OPENMP);
#endif
    s += "; isa paths";
    for (const auto& isa : hf::isa_compiled()) s += " " + isa;
#ifdef HF_MARCH
    s += "; march " HF_MARCH;  // HYPERFLOW_MARCH: the generic and baseline code, not a portable build
#endif
#ifdef HF_SANITIZE
    s += "; sanitize " HF_SANITIZE;  // set by .ci/sanitize.sh, never by setup.py
#endif
    return s;
  });
}
