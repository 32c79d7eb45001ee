// CUDA twin of the direct sparse convolution: one thread per output element runs the per-output
// body sparse_conv_point and the epilogue conv_epilogue from hf_conv.h, the arithmetic the CPU
// build runs with algo = 1 (the CPU's packed path computes the same sums in another order).
// Consecutive threads take consecutive output columns, so input reads of a tap coalesce for
// stride 1 and the CSR row of the block's output channel is shared through L1.
#include "hf_conv.h"
#include "hf_cuda.h"

namespace hf {

namespace {

constexpr int kThreads = 256;

template <typename T, typename I>
__global__ void sparse_conv2d_kernel(SparseConvParams p) {
  const std::int64_t plane = p.ho * p.wo;
  const std::int64_t pix = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t o = blockIdx.y, b = blockIdx.z;
  if (pix >= plane) return;
  const std::int64_t i = pix / p.wo, j = pix % p.wo;
  const CsrOperands<T, I> op = csr_operands<T, I>(p);
  const T acc = sparse_conv_point(p, op.rowptr, op.col, op.val, op.x, b, o, i, j);
  const T r = conv_residual(p, reinterpret_cast<const T*>(p.res), b, o, i, j);
  op.y[b * p.ys_n + o * p.ys_c + i * p.ys_h + j * p.ys_w] = conv_epilogue(acc, op.bias, o, p.relu, r);
}

}  // namespace

void sparse_conv2d(CudaTag, const SparseConvParams& p) {
  check(p);
  if (nothing_to_do(p)) return;
  const std::int64_t blocks_x = (p.ho * p.wo + kThreads - 1) / kThreads;
  require(blocks_x < (1LL << 31) && p.out_c < 65536 && p.n < 65536, "sparse_conv2d: problem too large for one grid");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(p.out_c), static_cast<unsigned>(p.n));
  dispatch_float_index(p.dtype, p.itype, "sparse_conv2d", [&](auto zero, auto izero) {
    sparse_conv2d_kernel<decltype(zero), decltype(izero)><<<grid, kThreads, 0, stream_of(p.stream)>>>(p);
  });
  check_launch("sparse_conv2d");
}

}  // namespace hf
