// CUDA-only helpers: stream handles from Python and launch-error checks.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace hf {

inline cudaStream_t stream_of(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace hf
