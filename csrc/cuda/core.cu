// CUDA kernels for the core ops; element bodies come from hf_core.h, shared with the CPU.
#include "hf_core.h"
#include "hf_sparse.h"
#include "hf_cuda.h"

namespace hf {

template <typename T>
__global__ void euler_axpy_kernel(const T* __restrict__ theta, const T* __restrict__ drift,
                                  T* __restrict__ out, std::int64_t n, T dt) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = euler_axpy(theta[i], drift[i], dt);
}

void euler_axpy(CudaTag, const EulerParams& p) {
  checked_dispatch(p, "euler_axpy", [&](auto zero) {
    using T = decltype(zero);
    const int threads = 256;
    const auto blocks = static_cast<unsigned>((p.n + threads - 1) / threads);
    euler_axpy_kernel<T><<<blocks, threads, 0, stream_of(p.stream)>>>(
        ptr<const T>(p.theta), ptr<const T>(p.drift), ptr<T>(p.out), p.n, static_cast<T>(p.dt));
  });
  check_launch("euler_axpy");
}

void csr_spmm(CudaTag, const CsrSpmmParams& p) {
  check(p);
  csr_spmm_batched(CudaTag{}, as_batched(p));
}

}  // namespace hf
