// Sparse ops for pruning by flow: the masked matmul X·(W⊙m)ᵀ and its input gradient
// (training; the mask changes every step), and the CSR linear layer x·Wᵀ (inference).
// Parameter structs, element bodies shared by the CPU and CUDA back-ends, and entry points.
#pragma once

#include "hf_common.h"
#include "hf_core.h"  // CpuTag / CudaTag

namespace hf {

// ---- masked matmul:  y = x @ (W ⊙ m)ᵀ + bias ------------------------------------------
// Element (b, i) of x lives at x[b * x_sb + i * x_si]: any 2-D strides, so a transposed or
// sliced x needs no copy.
struct MaskedMatmulParams {
  std::uintptr_t x;     // batch x in, strides (x_sb, x_si)
  std::uintptr_t w;     // out x in, row stride ldw, unit column stride
  std::uintptr_t mask;  // out x in, 1 byte per entry (bool/uint8; nonzero = active), contiguous
  std::uintptr_t bias;  // out, or 0 for none
  std::uintptr_t y;     // batch x out, row stride ldy, unit column stride
  std::int64_t batch, in, out, x_sb, x_si, ldw, ldy;
  int dtype;
  std::uintptr_t stream;
};

// ---- masked matmul input gradient:  gx = g @ (W ⊙ m) ----------------------------------
struct MaskedGradInputParams {
  std::uintptr_t g;     // batch x out, strides (g_sb, g_so)
  std::uintptr_t w;     // out x in, row stride ldw, unit column stride
  std::uintptr_t mask;  // out x in, 1 byte per entry, contiguous
  std::uintptr_t gx;    // batch x in, row stride ldgx, unit column stride
  std::int64_t batch, in, out, g_sb, g_so, ldw, ldgx;
  int dtype;
  std::uintptr_t stream;
};

// ---- CSR linear:  y = x @ Wᵀ + bias with W (out x in) in CSR ----------------------------
struct CsrLinearParams {
  std::uintptr_t rowptr;  // out + 1, monotone, rowptr[0] == 0, rowptr[out] == nnz
  std::uintptr_t col;     // nnz, each in [0, in), sorted within a row (not required)
  std::uintptr_t val;     // nnz
  std::uintptr_t x;       // batch x in, strides (x_sb, x_si)
  std::uintptr_t bias;    // out, or 0
  std::uintptr_t y;       // batch x out, row stride ldy, unit column stride
  std::int64_t batch, in, out, nnz, x_sb, x_si, ldy;
  int dtype, itype;
  std::uintptr_t stream;
};

// ---- batched CSR SpMM:  out[n] = A @ B[n]  (sparse conv: A = weight, B[n] = im2col of sample n)
struct CsrSpmmBatchedParams {
  std::uintptr_t rowptr;  // rows + 1
  std::uintptr_t col;     // nnz, each in [0, k)
  std::uintptr_t val;     // nnz
  std::uintptr_t b;       // batch x k x n: element (s, r, c) at b[s * b_bs + r * ldb + c]
  std::uintptr_t out;     // batch x rows x n: element (s, r, c) at out[s * o_bs + r * ldo + c]
  std::int64_t batch, rows, k, n, nnz, b_bs, ldb, o_bs, ldo;
  int dtype, itype;
  std::uintptr_t stream;
};

HF_ISA_BEGIN
// CSR SpMM of one matrix pair is the batch-1 case of the batched op; both back-ends forward to it.
inline CsrSpmmBatchedParams as_batched(const CsrSpmmParams& p) {
  return CsrSpmmBatchedParams{p.rowptr, p.col, p.val, p.b, p.out, 1, p.rows, p.k, p.n, p.nnz,
                              0, p.ldb, 0, p.ldo, p.dtype, p.itype, p.stream};
}

HF_ISA_END
// ---- score mask:  mask = scores >= 0, and the number of active entries ------------------
struct ScoreMaskParams {
  std::uintptr_t scores;  // n, contiguous
  std::uintptr_t mask;    // n bytes (bool), written
  std::uintptr_t count;   // one int64 on the same device, overwritten with the active count
  std::int64_t n;
  int dtype;
  std::uintptr_t stream;
};

HF_ISA_BEGIN
// A weight is active iff its score is >= 0 (NaN scores are inactive, as in torch).
template <typename T>
HF_HD bool score_active(T t) { return t >= T(0); }

// The value a masked entry contributes: w where the mask byte is set, else exactly zero.
template <typename T>
HF_HD T masked_value(std::uint8_t m, T w) { return m ? w : T(0); }

// One output of the CSR linear layer: sum_j val[j] * x[b, col[j]] over row r, x strided.
// The CUDA kernel runs exactly this per output; the CPU runs it for batch 1 (except int32
// indices with contiguous x on AVX-512, where the gathered csr_spmv_rows does the same sum).
template <typename T, typename I>
HF_HD T csr_row_dot(const I* rowptr, const I* col, const T* val, const T* x, std::int64_t x_si,
                    std::int64_t r) {
  T a0 = T(0), a1 = T(0);  // two partial sums: half the FMA dependency chain
  I j = rowptr[r];
  const I end = rowptr[r + 1];
  for (; j + 1 < end; j += 2) {
    a0 += val[j] * x[static_cast<std::int64_t>(col[j]) * x_si];
    a1 += val[j + 1] * x[static_cast<std::int64_t>(col[j + 1]) * x_si];
  }
  if (j < end) a0 += val[j] * x[static_cast<std::int64_t>(col[j]) * x_si];
  return a0 + a1;
}

void masked_matmul(CpuTag, const MaskedMatmulParams& p);
void masked_matmul_grad_input(CpuTag, const MaskedGradInputParams& p);
void csr_linear(CpuTag, const CsrLinearParams& p);
void csr_spmm_batched(CpuTag, const CsrSpmmBatchedParams& p);
void score_mask(CpuTag, const ScoreMaskParams& p);
void masked_matmul(CudaTag, const MaskedMatmulParams& p);
void masked_matmul_grad_input(CudaTag, const MaskedGradInputParams& p);
void csr_linear(CudaTag, const CsrLinearParams& p);
void csr_spmm_batched(CudaTag, const CsrSpmmBatchedParams& p);
void score_mask(CudaTag, const ScoreMaskParams& p);

inline void check(const MaskedMatmulParams& p) {
  require(p.batch >= 0 && p.in >= 0 && p.out >= 0, "masked_matmul: negative size");
  require((p.x || p.batch * p.in == 0) && ((p.w && p.mask) || p.out * p.in == 0) && (p.y || p.batch * p.out == 0),
          "masked_matmul: null pointer");
  require(p.ldw >= p.in && p.ldy >= p.out, "masked_matmul: leading dimension smaller than the row length");
}

inline void check(const MaskedGradInputParams& p) {
  require(p.batch >= 0 && p.in >= 0 && p.out >= 0, "masked_matmul_grad_input: negative size");
  require((p.g || p.batch * p.out == 0) && ((p.w && p.mask) || p.out * p.in == 0) && (p.gx || p.batch * p.in == 0),
          "masked_matmul_grad_input: null pointer");
  require(p.ldw >= p.in && p.ldgx >= p.in, "masked_matmul_grad_input: leading dimension smaller than the row length");
}

inline void check(const CsrLinearParams& p) {
  require(p.batch >= 0 && p.in >= 0 && p.out >= 0 && p.nnz >= 0, "csr_linear: negative size");
  require(p.rowptr && (p.y || p.batch * p.out == 0), "csr_linear: null pointer");
  require(p.nnz == 0 || p.batch == 0 || (p.col && p.val && p.x), "csr_linear: null pointer");
  require(p.ldy >= p.out, "csr_linear: leading dimension smaller than the row length");
}

inline void check(const CsrSpmmBatchedParams& p) {
  require(p.batch >= 0 && p.rows >= 0 && p.k >= 0 && p.n >= 0 && p.nnz >= 0, "csr_spmm_batched: negative size");
  require(p.rowptr && (p.out || p.batch * p.rows * p.n == 0), "csr_spmm_batched: null pointer");
  require(p.nnz == 0 || p.batch * p.n == 0 || (p.col && p.val && p.b), "csr_spmm_batched: null pointer");
  require(p.ldb >= p.n && p.ldo >= p.n, "csr_spmm_batched: leading dimension smaller than n");
}

// Empty products write nothing: both back-ends return before dispatching (checked_dispatch).
inline bool nothing_to_do(const MaskedMatmulParams& p) { return p.batch == 0 || p.out == 0; }
inline bool nothing_to_do(const MaskedGradInputParams& p) { return p.batch == 0 || p.in == 0; }
inline bool nothing_to_do(const CsrLinearParams& p) { return p.batch == 0 || p.out == 0; }
inline bool nothing_to_do(const CsrSpmmBatchedParams& p) { return p.batch == 0 || p.rows == 0 || p.n == 0; }

inline void check(const ScoreMaskParams& p) {
  require(p.n >= 0, "score_mask: negative size");
  require(p.count && (p.n == 0 || (p.scores && p.mask)), "score_mask: null pointer");
}

HF_ISA_END
}  // namespace hf
