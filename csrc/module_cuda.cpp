// hyperflow_ext._C_cuda: the CUDA extension module. Links the CUDA runtime statically, so it
// imports on machines without a GPU or driver; calls then fail with a clear RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bind/all.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hyperflow CUDA kernels";
  hf::bind_all<hf::CudaTag>(m);
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
  m.def("build_info", [] {
    return std::string("cuda runtime ") + std::to_string(CUDART_VERSION) + "; archs " HF_CUDA_ARCHS;
  });
}
