// CUDA kernel for the fused flow step; the element body is flow_step_elem from hf_flowacc.h,
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
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T ti = t[i], fi = flow[i], mi = m[i], vi = v[i], gwi;
    const bool keep = flow_step_elem(w[i], g[i], ti, fi, mi, vi, gwi, s);
    t[i] = ti;
    flow[i] = fi;
    m[i] = mi;
    v[i] = vi;
    gw[i] = gwi;
    mask[i] = keep ? 1 : 0;
  }
}

void flow_step(CudaTag, const FlowStepParams& p) {
  check(p);
  if (p.n == 0) return;
  dispatch_float(p.dtype, "flow_step", [&](auto zero) {
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
