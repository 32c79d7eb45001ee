// CPU kernels for the core ops (OpenMP over rows / elements, vectorisable inner loops).
#include "hf_core.h"
#include "hf_sparse.h"

namespace hf {
HF_ISA_BEGIN

void euler_axpy(CpuTag, const EulerParams& p) {
  checked_dispatch(p, "euler_axpy", [&](auto zero) {
    using T = decltype(zero);
    const T* theta = ptr<const T>(p.theta);
    const T* drift = ptr<const T>(p.drift);
    T* out = ptr<T>(p.out);
    const T dt = static_cast<T>(p.dt);
#pragma omp parallel for simd schedule(static) if (p.n > (1 << 16))
    for (std::int64_t i = 0; i < p.n; ++i) out[i] = euler_axpy(theta[i], drift[i], dt);
  });
}

void csr_spmm(CpuTag, const CsrSpmmParams& p) {
  check(p);
  csr_spmm_batched(CpuTag{}, as_batched(p));
}

HF_ISA_END
}  // namespace hf
