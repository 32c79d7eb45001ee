// CUDA kernel for the fused flow step; the element body is flow_step_at from hf_flowacc.h,
// shared with the CPU. The NaN/Inf scan runs in Python (torch) on CUDA tensors.
#include "hf_cuda.h"
#include "hf_flowacc.h"

namespace hf {

template <typename T>
__global__ void flow_step_kernel(const T* __restrict__ w, const T* __restrict__ g, T* __restrict__ t,
                                 T* __restrict__ flow, T* __restrict__ m, T* __restrict__ v,
                                 T* __restrict__ gw, std::uint8_t* __restrict__ mask, std::int64_t n,
                                 FlowScalars<T> s) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    flow_step_at(w, g, t, flow, m, v, gw, mask, i, s);
}

void flow_step(CudaTag, const FlowStepParams& p) {
  checked_dispatch(p, "flow_step", [&](auto zero) {
    using T = decltype(zero);
    const int threads = 256;
    const std::int64_t want = (p.n + threads - 1) / threads;
    const auto blocks = static_cast<unsigned>(want < 65535 * 8 ? want : 65535 * 8);
    flow_step_kernel<T><<<blocks, threads, 0, stream_of(p.stream)>>>(
        ptr<const T>(p.weight), ptr<const T>(p.grad_eff), ptr<T>(p.scores), ptr<T>(p.flow), ptr<T>(p.exp_avg),
        ptr<T>(p.exp_avg_sq), ptr<T>(p.grad_weight), ptr<std::uint8_t>(p.new_mask), p.n, flow_scalars<T>(p));
  });
  check_launch("flow_step");
}

}  // namespace hf
