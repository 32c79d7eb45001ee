// hyperflow_ext._C: the CPU extension module. Never sees a torch tensor: the Python wrappers
// validate tensors and pass raw pointers and sizes.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bind/all.h"

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
  m.def("build_info", [] {
    std::string s = "cpu; compiler " __VERSION__;
#ifdef _OPENMP
    s += "; openmp " + std::to_string(_OPENMP);
#endif
#ifdef __AVX2__
    s += "; avx2";
#endif
#ifdef __AVX512F__
    s += "; avx512f";
#endif
#ifdef HF_SANITIZE
    s += "; sanitize " HF_SANITIZE;  // set by .ci/sanitize.sh, never by setup.py
#endif
    return s;
  });
}
