// CUDA kernels for the sparse family. Element bodies (masked_value, csr_row_dot, csr_dot) come
// from hf_sparse.h / hf_core.h and are shared with the CPU build.
#include "hf_cuda.h"
#include "hf_sparse.h"

namespace hf {
namespace {

constexpr int kTile = 16;

// C[r, c] = sum_k A[r, k] * (M[k, c] ? W[k, c] : 0)  (+ bias[c]) with all operands strided.
// Shared-memory tiles of 16 x 16; a k-tile whose 16 x 16 mask block is all zero is skipped
// (the block votes with __syncthreads_or). W_K_CONTIG: W / M have unit stride along k
// (forward: W is out x in and k = in), so the tile is loaded transposed to stay coalesced.
template <typename T, bool W_K_CONTIG>
__global__ void masked_gemm_kernel(const T* __restrict__ a, std::int64_t a_sr, std::int64_t a_sk,
                                   const T* __restrict__ w, std::int64_t w_sk, std::int64_t w_sc,
                                   const std::uint8_t* __restrict__ m, std::int64_t m_sk, std::int64_t m_sc,
                                   const T* __restrict__ bias, T* __restrict__ c_out, std::int64_t ldc,
                                   std::int64_t rows, std::int64_t kdim, std::int64_t cols) {
  __shared__ T as[kTile][kTile + 1];
  __shared__ T bs[kTile][kTile + 1];  // bs[k][c]
  const int ty = threadIdx.y, tx = threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kTile;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const std::int64_t r = r0 + ty, c = c0 + tx;
  T acc = T(0);
  for (std::int64_t k0 = 0; k0 < kdim; k0 += kTile) {
    const std::int64_t ka = k0 + tx;
    as[ty][tx] = (r < rows && ka < kdim) ? a[r * a_sr + ka * a_sk] : T(0);
    // This thread loads B element (kb, cb); stored at bs[kb - k0][cb - c0].
    const std::int64_t kb = W_K_CONTIG ? k0 + tx : k0 + ty;
    const std::int64_t cb = W_K_CONTIG ? c0 + ty : c0 + tx;
    std::uint8_t mb = 0;
    T wv = T(0);
    if (kb < kdim && cb < cols) {
      mb = m[kb * m_sk + cb * m_sc];
      wv = masked_value(mb, w[kb * w_sk + cb * w_sc]);
    }
    if (W_K_CONTIG) bs[tx][ty] = wv; else bs[ty][tx] = wv;
    if (!__syncthreads_or(mb != 0)) continue;  // barrier too: nobody reads this tile
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += as[ty][kk] * bs[kk][tx];
    __syncthreads();
  }
  if (r < rows && c < cols) c_out[r * ldc + c] = acc + (bias ? bias[c] : T(0));
}

template <typename T, bool W_K_CONTIG>
void launch_masked_gemm(const T* a, std::int64_t a_sr, std::int64_t a_sk, const T* w, std::int64_t w_sk,
                        std::int64_t w_sc, const std::uint8_t* m, std::int64_t m_sk, std::int64_t m_sc,
                        const T* bias, T* c, std::int64_t ldc, std::int64_t rows, std::int64_t kdim,
                        std::int64_t cols, std::uintptr_t stream, const char* op) {
  const std::int64_t gy = (rows + kTile - 1) / kTile, gx = (cols + kTile - 1) / kTile;
  require(gy < 65536 && gx < (1LL << 31), std::string(op) + ": problem too large for one grid");
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  dim3 block(kTile, kTile);
  masked_gemm_kernel<T, W_K_CONTIG><<<grid, block, 0, stream_of(stream)>>>(
      a, a_sr, a_sk, w, w_sk, w_sc, m, m_sk, m_sc, bias, c, ldc, rows, kdim, cols);
}

// y[b, o] for one thread; threads of a warp take consecutive b, so with x passed transposed
// (x_sb == 1) their loads of x are coalesced.
template <typename T, typename I>
__global__ void csr_linear_kernel(const I* __restrict__ rowptr, const I* __restrict__ col,
                                  const T* __restrict__ val, const T* __restrict__ x, std::int64_t x_sb,
                                  std::int64_t x_si, const T* __restrict__ bias, T* __restrict__ y,
                                  std::int64_t ldy, std::int64_t batch, std::int64_t out) {
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  for (std::int64_t o = blockIdx.y; o < out; o += gridDim.y)
    y[b * ldy + o] = csr_row_dot(rowptr, col, val, x + b * x_sb, x_si, o) + (bias ? bias[o] : T(0));
}

template <typename T, typename I>
__global__ void csr_spmm_batched_kernel(const I* __restrict__ rowptr, const I* __restrict__ col,
                                        const T* __restrict__ val, const T* __restrict__ b, std::int64_t b_bs,
                                        std::int64_t ldb, T* __restrict__ out, std::int64_t o_bs, std::int64_t ldo,
                                        std::int64_t batch, std::int64_t rows, std::int64_t n) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  for (std::int64_t s = blockIdx.z; s < batch; s += gridDim.z)
    for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y)
      out[s * o_bs + r * ldo + c] = csr_dot(rowptr, col, val, b + s * b_bs, ldb, r, c);
}

template <typename T>
__global__ void score_mask_kernel(const T* __restrict__ t, std::uint8_t* __restrict__ m,
                                  unsigned long long* __restrict__ count, std::int64_t n) {
  unsigned long long local = 0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool a = score_active(t[i]);
    m[i] = a ? 1 : 0;
    local += a ? 1 : 0;
  }
  for (int off = 16; off > 0; off >>= 1) local += __shfl_down_sync(0xffffffffu, local, off);
  if ((threadIdx.x & 31) == 0 && local) atomicAdd(count, local);
}

unsigned clamp_grid(std::int64_t v, std::int64_t hi) { return static_cast<unsigned>(v < hi ? (v > 0 ? v : 1) : hi); }

// Threads of a block along `n` consecutive outputs (a warp when n is small) and the blocks covering n.
struct Lanes {
  int threads;
  unsigned blocks;
};

Lanes lanes_for(std::int64_t n) {
  const int threads = n >= 128 ? 128 : 32;
  return {threads, clamp_grid((n + threads - 1) / threads, 1LL << 30)};
}

}  // namespace

void masked_matmul(CudaTag, const MaskedMatmulParams& p) {
  checked_dispatch(p, "masked_matmul", [&](auto zero) {
    using T = decltype(zero);
    // rows = batch, k = in, cols = out; W[o, i] at o * ldw + i, mask at o * in + i.
    launch_masked_gemm<T, true>(ptr<const T>(p.x), p.x_sb, p.x_si, ptr<const T>(p.w), 1, p.ldw,
                                ptr<const std::uint8_t>(p.mask), 1, p.in,
                                p.bias ? ptr<const T>(p.bias) : nullptr, ptr<T>(p.y), p.ldy, p.batch, p.in, p.out,
                                p.stream, "masked_matmul");
  });
  check_launch("masked_matmul");
}

void masked_matmul_grad_input(CudaTag, const MaskedGradInputParams& p) {
  checked_dispatch(p, "masked_matmul_grad_input", [&](auto zero) {
    using T = decltype(zero);
    // rows = batch, k = out, cols = in; W[o, i] at o * ldw + i, mask at o * in + i.
    launch_masked_gemm<T, false>(ptr<const T>(p.g), p.g_sb, p.g_so, ptr<const T>(p.w), p.ldw, 1,
                                 ptr<const std::uint8_t>(p.mask), p.in, 1, static_cast<const T*>(nullptr),
                                 ptr<T>(p.gx), p.ldgx, p.batch, p.out, p.in, p.stream,
                                 "masked_matmul_grad_input");
  });
  check_launch("masked_matmul_grad_input");
}

void csr_linear(CudaTag, const CsrLinearParams& p) {
  checked_dispatch_index(p, "csr_linear", [&](auto zero, auto izero) {
    using T = decltype(zero);
    using I = decltype(izero);
    const CsrOperands<T, I> op = csr_operands<T, I>(p);
    const Lanes lanes = lanes_for(p.batch);
    const dim3 grid(lanes.blocks, clamp_grid(p.out, 65535));
    csr_linear_kernel<T, I><<<grid, lanes.threads, 0, stream_of(p.stream)>>>(
        op.rowptr, op.col, op.val, op.x, p.x_sb, p.x_si, op.bias, op.y, p.ldy, p.batch, p.out);
  });
  check_launch("csr_linear");
}

void csr_spmm_batched(CudaTag, const CsrSpmmBatchedParams& p) {
  checked_dispatch_index(p, "csr_spmm_batched", [&](auto zero, auto izero) {
    using T = decltype(zero);
    using I = decltype(izero);
    const Lanes lanes = lanes_for(p.n);
    const dim3 grid(lanes.blocks, clamp_grid(p.rows, 65535), clamp_grid(p.batch, 65535));
    csr_spmm_batched_kernel<T, I><<<grid, lanes.threads, 0, stream_of(p.stream)>>>(
        ptr<const I>(p.rowptr), ptr<const I>(p.col), ptr<const T>(p.val), ptr<const T>(p.b), p.b_bs, p.ldb,
        ptr<T>(p.out), p.o_bs, p.ldo, p.batch, p.rows, p.n);
  });
  check_launch("csr_spmm_batched");
}

void score_mask(CudaTag, const ScoreMaskParams& p) {
  check(p);
  cudaStream_t stream = stream_of(p.stream);
  const cudaError_t err = cudaMemsetAsync(reinterpret_cast<void*>(p.count), 0, sizeof(std::int64_t), stream);
  if (err != cudaSuccess) throw std::runtime_error(std::string("score_mask: cudaMemsetAsync failed: ") + cudaGetErrorString(err));
  if (p.n == 0) return;
  dispatch_float(p.dtype, "score_mask", [&](auto zero) {
    using T = decltype(zero);
    const int threads = 256;
    const unsigned blocks = clamp_grid((p.n + threads - 1) / threads, 65535 * 4);
    score_mask_kernel<T><<<blocks, threads, 0, stream>>>(ptr<const T>(p.scores), ptr<std::uint8_t>(p.mask),
                                                           ptr<unsigned long long>(p.count), p.n);
  });
  check_launch("score_mask");
}

}  // namespace hf
