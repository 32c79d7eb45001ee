// Core ops: the Euler update and CSR SpMM. Parameter structs, shared element bodies,
// and the CPU / CUDA entry points (overloaded on a back-end tag).
#pragma once

#include "hf_common.h"

namespace hf {

struct CpuTag {};
struct CudaTag {};

// ---- Euler update:  out = theta + dt * drift -------------------------------------------
struct EulerParams {
  std::uintptr_t theta;  // n, contiguous
  std::uintptr_t drift;  // n, contiguous
  std::uintptr_t out;    // n, contiguous (may alias theta)
  std::int64_t n;
  double dt;
  int dtype;
  std::uintptr_t stream;  // cudaStream_t on CUDA, ignored on CPU
};

HF_ISA_BEGIN
template <typename T>
HF_HD T euler_axpy(T theta, T drift, T dt) { return theta + dt * drift; }

HF_ISA_END
// ---- CSR SpMM:  out = A @ B -------------------------------------------------------------
struct CsrSpmmParams {
  std::uintptr_t rowptr;  // rows + 1, monotone, rowptr[0] == 0, rowptr[rows] == nnz
  std::uintptr_t col;     // nnz, each in [0, k)
  std::uintptr_t val;     // nnz
  std::uintptr_t b;       // k x n, row stride ldb
  std::uintptr_t out;     // rows x n, row stride ldo
  std::int64_t rows, k, n, nnz, ldb, ldo;
  int dtype, itype;
  std::uintptr_t stream;
};

HF_ISA_BEGIN
// out[r, c] for one CSR row: the per-thread body of the CUDA SpMM kernels.
template <typename T, typename I>
HF_HD T csr_dot(const I* rowptr, const I* col, const T* val, const T* b, std::int64_t ldb,
                std::int64_t r, std::int64_t c) {
  T acc = T(0);
  for (I j = rowptr[r]; j < rowptr[r + 1]; ++j) acc += val[j] * b[static_cast<std::int64_t>(col[j]) * ldb + c];
  return acc;
}

// The typed arrays of an x·Wᵀ-shaped op with a CSR weight W, from a parameter struct with rowptr /
// col / val / x / bias / y handles (CSR linear, sparse convolution); bias is null for none.
template <typename T, typename I>
struct CsrOperands {
  const I* rowptr;
  const I* col;
  const T* val;
  const T* x;
  const T* bias;
  T* y;
};

template <typename T, typename I, typename P>
HF_HD CsrOperands<T, I> csr_operands(const P& p) {
  return {reinterpret_cast<const I*>(p.rowptr), reinterpret_cast<const I*>(p.col), reinterpret_cast<const T*>(p.val),
          reinterpret_cast<const T*>(p.x), p.bias ? reinterpret_cast<const T*>(p.bias) : nullptr,
          reinterpret_cast<T*>(p.y)};
}

void euler_axpy(CpuTag, const EulerParams& p);
void csr_spmm(CpuTag, const CsrSpmmParams& p);
void euler_axpy(CudaTag, const EulerParams& p);
void csr_spmm(CudaTag, const CsrSpmmParams& p);

inline void check(const EulerParams& p) {
  require(p.n == 0 || (p.theta && p.drift && p.out), "euler_axpy: null pointer");  // empty tensors may have none
  require(p.n >= 0, "euler_axpy: negative size");
}

// Nothing to write for an empty tensor (both back-ends return before dispatching).
inline bool nothing_to_do(const EulerParams& p) { return p.n == 0; }

inline void check(const CsrSpmmParams& p) {
  require(p.rowptr && (p.out || p.rows * p.n == 0), "csr_spmm: null pointer");  // (rows x 0) has none
  require(p.rows >= 0 && p.k >= 0 && p.n >= 0 && p.nnz >= 0, "csr_spmm: negative size");
  require(p.ldb >= p.n && p.ldo >= p.n, "csr_spmm: leading dimension smaller than n");
}

HF_ISA_END
}  // namespace hf
