// CUDA kernels for the core ops; element bodies come from hf_core.h, shared with the CPU.
#include "hf_core.h"
#include "hf_cuda.h"

namespace hf {

template <typename T>
__global__ void euler_axpy_kernel(const T* __restrict__ theta, const T* __restrict__ drift,
                                  T* __restrict__ out, std::int64_t n, T dt) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = euler_axpy(theta[i], drift[i], dt);
}

void euler_axpy(CudaTag, const EulerParams& p) {
  check(p);
  if (p.n == 0) return;
  dispatch_float(p.dtype, "euler_axpy", [&](auto zero) {
    using T = decltype(zero);
    const int threads = 256;
    const auto blocks = static_cast<unsigned>((p.n + threads - 1) / threads);
    euler_axpy_kernel<T><<<blocks, threads, 0, stream_of(p.stream)>>>(
        ptr<const T>(p.theta), ptr<const T>(p.drift), ptr<T>(p.out), p.n, static_cast<T>(p.dt));
  });
  check_launch("euler_axpy");
}

// One thread per output element; threads of a warp share a row and read consecutive columns
// of B, so the loads of B are coalesced.
template <typename T, typename I>
__global__ void csr_spmm_kernel(const I* __restrict__ rowptr, const I* __restrict__ col,
                                const T* __restrict__ val, const T* __restrict__ b,
                                T* __restrict__ out, std::int64_t rows, std::int64_t n,
                                std::int64_t ldb, std::int64_t ldo) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t r = blockIdx.y;
  if (r < rows && c < n) out[r * ldo + c] = csr_dot(rowptr, col, val, b, ldb, r, c);
}

void csr_spmm(CudaTag, const CsrSpmmParams& p) {
  check(p);
  if (p.rows == 0 || p.n == 0) return;
  require(p.rows < 65536 * 1024LL, "csr_spmm: too many rows for one grid");
  dispatch_float(p.dtype, "csr_spmm", [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(p.itype, "csr_spmm", [&](auto izero) {
      using I = decltype(izero);
      const int threads = p.n >= 128 ? 128 : 32;
      dim3 grid(static_cast<unsigned>((p.n + threads - 1) / threads), static_cast<unsigned>(p.rows));
      csr_spmm_kernel<T, I><<<grid, threads, 0, stream_of(p.stream)>>>(
          ptr<const I>(p.rowptr), ptr<const I>(p.col), ptr<const T>(p.val), ptr<const T>(p.b),
          ptr<T>(p.out), p.rows, p.n, p.ldb, p.ldo);
    });
  });
  check_launch("csr_spmm");
}

}  // namespace hf
