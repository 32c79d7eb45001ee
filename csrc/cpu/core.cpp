// CPU kernels for the core ops (OpenMP over rows / elements, vectorisable inner loops).
#include "hf_core.h"

#include <cstring>

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
        // Row-axpy form: each nonzero scales one row of B into the output row (unit stride).
        for (std::int64_t c = 0; c < n; ++c) o[c] = T(0);
        for (I j = rowptr[r]; j < rowptr[r + 1]; ++j) {
          const T v = val[j];
          const T* brow = b + static_cast<std::int64_t>(col[j]) * p.ldb;
#pragma omp simd
          for (std::int64_t c = 0; c < n; ++c) o[c] += v * brow[c];
        }
      }
    });
  });
}

}  // namespace hf
