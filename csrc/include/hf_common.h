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

// Runtime ISA dispatch (csrc/dispatch.cpp): every csrc/cpu/*.cpp is compiled once per ISA with that
// ISA's flags and -DHF_ISA=<avx512|avx2|baseline>. Everything with code that such a file defines or
// includes (inline functions, templates, the CpuTag entry points) sits between HF_ISA_BEGIN and
// HF_ISA_END: an inline namespace hf::<isa> there, so each ISA's copies have their own symbols and
// the linker can never merge an AVX-512 copy of an inline function into the baseline path. Parameter
// structs stay in hf:: (no code; the dispatcher passes them through). Elsewhere both macros are empty.
#if defined(HF_ISA) && !defined(__CUDACC__)
#define HF_ISA_BEGIN inline namespace HF_ISA {
#define HF_ISA_END }
#else
#define HF_ISA_BEGIN
#define HF_ISA_END
#endif

namespace hf {

// Dtype codes shared with hyperflow_ext/_native_args.py.
enum class DType : int { kFloat32 = 0, kFloat64 = 1 };
enum class IType : int { kInt32 = 0, kInt64 = 1 };

HF_ISA_BEGIN

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

// Invoke `f(T{}, I{})` for a float dtype code and an index dtype code (CSR operands).
template <typename F>
inline void dispatch_float_index(int dtype, int itype, const char* op, F&& f) {
  dispatch_float(dtype, op, [&](auto zero) { dispatch_index(itype, op, [&](auto izero) { f(zero, izero); }); });
}

// The common entry of a kernel on either back-end: validate the parameters (check(p)), return when
// the op has no output to write (nothing_to_do(p)), else run `f` for p's dtype (and index dtype).
// check / nothing_to_do are found by argument-dependent lookup next to each parameter struct.
template <typename P, typename F>
inline void checked_dispatch(const P& p, const char* op, F&& f) {
  check(p);
  if (!nothing_to_do(p)) dispatch_float(p.dtype, op, f);
}

template <typename P, typename F>
inline void checked_dispatch_index(const P& p, const char* op, F&& f) {
  check(p);
  if (!nothing_to_do(p)) dispatch_float_index(p.dtype, p.itype, op, f);
}

HF_ISA_END
}  // namespace hf
