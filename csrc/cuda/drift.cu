// CUDA twin of csrc/cpu/drift.cpp: one thread block per task runs every step and stage of the
// integration; a warp computes one row of a mat-vec (lane-strided dot + shuffle reduction) and
// __syncthreads separates the phases. Element bodies (silu, stage input, increment, guard) come
// from hf_drift.h, shared with the CPU. Scratch lives in global memory, allocated with
// cudaMallocAsync on the caller's stream and freed on it after the launch.
#include "hf_cuda.h"
#include "hf_drift.h"

namespace hf {
namespace {

constexpr int kThreads = 256;  // 8 warps per task

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
struct DriftArgs {
  const T* w_in;        // H x P
  const T* w_mid;       // H x H
  const T* b_mid;       // H
  const T* w_out;       // P x H
  const T* b_out;       // P
  const T* task_bias;   // tasks x H
  const T* time_table;  // steps x stages x H
  T* state;             // tasks x P
  std::int64_t* done;   // tasks
  T* scratch;           // tasks x (stages * P + P + 2 * H)
  std::int64_t P, H, steps;
  DriftCoefs<T> c;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) drift_integrate_kernel(const DriftArgs<T> g) {
  const std::int64_t task = blockIdx.x;
  const std::int64_t P = g.P, H = g.H;
  const int S = g.c.stages;
  T* k = g.scratch + task * (S * P + P + 2 * H);  // S x P
  T* ys = k + S * P;                               // P
  T* h1 = ys + P;                                  // H
  T* h2 = h1 + H;                                  // H
  T* y = g.state + task * P;
  const T* tb = g.task_bias + task * H;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

  std::int64_t accepted = 0;
  for (std::int64_t n = 0; n < g.steps; ++n) {
    for (int s = 0; s < S; ++s) {
      const T* x = y;
      if (g.c.has_a[s]) {  // uniform over the block
        for (std::int64_t p = tid; p < P; p += blockDim.x) ys[p] = drift_stage_input(y, k, P, g.c, s, p);
        __syncthreads();
        x = ys;
      }
      const T* tt = g.time_table + (n * S + s) * H;
      for (std::int64_t h = warp; h < H; h += warps) {
        const T acc = warp_sum(drift_dot_strided(g.w_in + h * P, x, lane, P, 32));
        if (lane == 0) h1[h] = drift_silu(acc + (tb[h] + tt[h]));
      }
      __syncthreads();
      for (std::int64_t h = warp; h < H; h += warps) {
        const T acc = warp_sum(drift_dot_strided(g.w_mid + h * H, h1, lane, H, 32));
        if (lane == 0) h2[h] = drift_silu(acc + g.b_mid[h]);
      }
      __syncthreads();
      for (std::int64_t p = warp; p < P; p += warps) {
        const T acc = warp_sum(drift_dot_strided(g.w_out + p * H, h2, lane, H, 32));
        if (lane == 0) k[s * P + p] = acc + g.b_out[p];
      }
      __syncthreads();
    }
    // The guard: every thread checks its share; the block stops together.
    int bad = 0;
    for (std::int64_t p = tid; p < P; p += blockDim.x)
      bad |= !drift_increment_ok(drift_increment(k, P, g.c, p), g.c.max_increment);
    if (__syncthreads_or(bad)) break;
    for (std::int64_t p = tid; p < P; p += blockDim.x) y[p] += drift_increment(k, P, g.c, p);
    ++accepted;
    __syncthreads();
  }
  if (tid == 0) g.done[task] = accepted;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("drift_integrate: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

void drift_integrate(CudaTag, const DriftParams& p) {
  check(p);
  require(p.tasks < (1LL << 31), "drift_integrate: too many tasks for one grid");
  dispatch_float(p.dtype, "drift_integrate", [&](auto zero) {
    using T = decltype(zero);
    const cudaStream_t stream = stream_of(p.stream);
    const std::size_t bytes =
        static_cast<std::size_t>(p.tasks * (p.stages * p.params + p.params + 2 * p.hidden)) * sizeof(T);
    void* scratch = nullptr;
    check_cuda(cudaMallocAsync(&scratch, bytes, stream), "scratch allocation failed");
    const DriftArgs<T> g{ptr<const T>(p.w_in), ptr<const T>(p.w_mid), ptr<const T>(p.b_mid), ptr<const T>(p.w_out),
                         ptr<const T>(p.b_out), ptr<const T>(p.task_bias), ptr<const T>(p.time_table),
                         ptr<T>(p.state), ptr<std::int64_t>(p.steps_done), static_cast<T*>(scratch),
                         p.params, p.hidden, p.steps, drift_coefs<T>(p)};
    drift_integrate_kernel<T><<<static_cast<unsigned>(p.tasks), kThreads, 0, stream>>>(g);
    const cudaError_t launch = cudaGetLastError();
    cudaFreeAsync(scratch, stream);  // stream-ordered: after the kernel
    if (launch != cudaSuccess)
      throw std::runtime_error(std::string("drift_integrate: CUDA launch failed: ") + cudaGetErrorString(launch));
  });
}

}  // namespace hf
