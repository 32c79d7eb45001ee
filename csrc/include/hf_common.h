// Shared definitions for the CPU and CUDA builds of hyperflow's native kernels.
//
// Functions marked HF_HD are compiled by g++ for the CPU module and by nvcc for the CUDA
// module, so the arithmetic the tests check on the CPU is the arithmetic the GPU runs.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif

namespace hf {

// Dtype codes shared with hyperflow_ext/_native_args.py.
enum class DType : int { kFloat32 = 0, kFloat64 = 1 };
enum class IType : int { kInt32 = 0, kInt64 = 1 };

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Invoke `f(T{})` for the scalar type named by a dtype code.
template <typename F>
inline void dispatch_float(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype));
  }
}

template <typename F>
inline void dispatch_index(int itype, const char* op, F&& f) {
  switch (static_cast<IType>(itype)) {
    case IType::kInt32: f(std::int32_t{}); break;
    case IType::kInt64: f(std::int64_t{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported index dtype code " + std::to_string(itype));
  }
}

}  // namespace hf
