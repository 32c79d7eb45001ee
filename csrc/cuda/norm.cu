// CUDA kernels for the in-place group norm: one block per (sample, group) reduces its mean and
// centred variance, then applies the scale and shift from hf_norm.h, shared with the CPU.
#include "hf_norm.h"
#include "hf_cuda.h"

namespace hf {

namespace {

constexpr int kThreads = 256;

__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void group_norm_kernel(T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                  std::int64_t hw, std::int64_t c, std::int64_t k, double eps, bool relu) {
  __shared__ double shared[kThreads];
  const std::int64_t s = blockIdx.x, g = blockIdx.y, span = hw * k;
  T* xs = x + s * hw * c + g * k;
  auto at = [&](std::int64_t j) -> T& { return xs[(j / k) * c + j % k]; };
  double sum = 0.0;
  for (std::int64_t j = threadIdx.x; j < span; j += blockDim.x) sum += static_cast<double>(at(j));
  const double mean = block_sum(sum, shared) / static_cast<double>(span);
  double sq = 0.0;
  for (std::int64_t j = threadIdx.x; j < span; j += blockDim.x) {
    const double d = static_cast<double>(at(j)) - mean;
    sq += d * d;
  }
  const double var = block_sum(sq, shared) / static_cast<double>(span);
  for (std::int64_t j = threadIdx.x; j < span; j += blockDim.x) {
    T scale, shift;
    group_norm_affine<T>(mean, var, eps, weight, bias, g * k + j % k, scale, shift);
    at(j) = group_norm_apply(at(j), scale, shift, relu);
  }
}

}  // namespace

void group_norm_(CudaTag, const GroupNormParams& p) {
  checked_dispatch(p, "group_norm_", [&](auto zero) {
    using T = decltype(zero);
    const dim3 blocks(static_cast<unsigned>(p.n), static_cast<unsigned>(p.groups));
    group_norm_kernel<T><<<blocks, kThreads, 0, stream_of(p.stream)>>>(
        ptr<T>(p.x), ptr<const T>(p.weight), ptr<const T>(p.bias), p.hw, p.c, p.c / p.groups, p.eps, p.relu);
  });
  check_launch("group_norm_");
}

}  // namespace hf
