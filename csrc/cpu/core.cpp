// CPU kernels for the core ops (OpenMP over rows / elements, vectorisable inner loops).
#include "hf_core.h"

#include <cstring>

#include "hf_sparse_cpu.h"

namespace hf {

void euler_axpy(CpuTag, const EulerParams& p) {
  check(p);
  dispatch_float(p.dtype, "euler_axpy", [&](auto zero) {
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
  dispatch_float(p.dtype, "csr_spmm", [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(p.itype, "csr_spmm", [&](auto izero) {
      using I = decltype(izero);
      const I* rowptr = ptr<const I>(p.rowptr);
      const I* col = ptr<const I>(p.col);
      const T* val = ptr<const T>(p.val);
      const T* b = ptr<const T>(p.b);
      T* out = ptr<T>(p.out);
      const std::int64_t n = p.n;
#pragma omp parallel for schedule(dynamic, 16) if (p.rows * n > 4096)
      for (std::int64_t r = 0; r < p.rows; ++r) {
        T* o = out + r * p.ldo;
        if (n == 1) {
          o[0] = csr_dot(rowptr, col, val, b, p.ldb, r, 0);
          continue;
        }
        // Row-combination form: the output row is sum_j val[j] * B[col[j], :], accumulated in
        // registers a column chunk at a time (hf_sparse_cpu.h).
        const I j0 = rowptr[r];
        cpu::gather_row(col + j0, val + j0, static_cast<std::int64_t>(rowptr[r + 1] - j0), b, p.ldb, n, o);
      }
    });
  });
}

}  // namespace hf
