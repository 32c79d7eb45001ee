// CPU kernel for the fused drift integration: the whole step / stage loop in one call.
//
// Parallelism: with fewer tasks than threads (tasks == 1 in particular) one OpenMP team runs the
// whole integration and splits the rows of every mat-vec among its threads ("team" mode: `omp
// for` with its implicit barrier between phases, the guard in `omp single`); otherwise the tasks
// are cut into one block per thread and each thread integrates its block with no barrier.
//
// Mat-vec forms: one task → blocked dot products over the rows of W (four rows share each load
// of the vector); several tasks → outer-product tiles over W transposed (a strip of 128 bytes
// of W^T per reduction index times up to eight task vectors, the accumulators in registers, the
// reduction blocked for L2), so each weight loaded serves every task of the block. All are
// `omp simd` loops, the epilogues (bias, silu, increment) too. Scratch (the transposed weights;
// stages x P, P, H, H per task) is allocated once per call.
//
// Rounding: sums run in the input dtype in a different order than torch's GEMMs, and silu uses
// the shared polynomial exp of hf_drift.h, so results match the torch reference to float
// rounding, not bit for bit.
#include "hf_drift.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hf {
HF_ISA_BEGIN
namespace {

// ---- SIMD tiles --------------------------------------------------------------------------------

template <typename T>
inline T dot_1x1(const T* __restrict w, const T* __restrict x, std::int64_t n) {
  T a0 = T(0);
#pragma omp simd reduction(+ : a0)
  for (std::int64_t i = 0; i < n; ++i) a0 += w[i] * x[i];
  return a0;
}

// Four consecutive rows of w (row stride ld) against one vector: out[r] = w[r, :] . x.
template <typename T>
inline void dot_4x1(const T* __restrict w, std::int64_t ld, const T* __restrict x, std::int64_t n, T* out) {
  const T* __restrict w0 = w;
  const T* __restrict w1 = w + ld;
  const T* __restrict w2 = w + 2 * ld;
  const T* __restrict w3 = w + 3 * ld;
  T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0);
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (std::int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    a0 += w0[i] * xi;
    a1 += w1[i] * xi;
    a2 += w2[i] * xi;
    a3 += w3[i] * xi;
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

// Rows per outer-product strip: two cache lines of W^T per reduction index.
template <typename T>
constexpr int kStrip = 128 / static_cast<int>(sizeof(T));

// A strip of kStrip rows of W against NT vectors, read from W^T (n x ldt, row-major), over the
// reduction range [i0, i1): out[t * kStrip + j] (+)= sum_i wt[i, j] * x[t][i] ("+=" when
// `accumulate`). The NT x kStrip accumulators stay in registers.
// Not inlined: its accumulators need the whole register file. Where AVX-512 is on, GCC is
// told to use it here (its default is 256-bit vectors); measured ~1.3x on this loop.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define HF_WIDE_VECTORS __attribute__((noinline, target("prefer-vector-width=512")))
#else
#define HF_WIDE_VECTORS __attribute__((noinline))
#endif

template <typename T, int NT>
HF_WIDE_VECTORS void outer_strip(const T* __restrict wt, std::int64_t ldt, const T* const* x, std::int64_t i0,
                                 std::int64_t i1, T* out, bool accumulate) {
  constexpr int B = kStrip<T>;
  T acc[NT][B] = {};
  if (accumulate)
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < B; ++j) acc[t][j] = out[t * B + j];
  for (std::int64_t i = i0; i < i1; ++i) {
    const T* __restrict wr = wt + i * ldt;
    for (int t = 0; t < NT; ++t) {
      const T xi = x[t][i];
#pragma omp simd
      for (int j = 0; j < B; ++j) acc[t][j] += wr[j] * xi;
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < B; ++j) out[t * B + j] = acc[t][j];
}

// ---- Team / solo control flow ------------------------------------------------------------------

// `for i in [0, n)`: shared among the team (static schedule, implicit barrier) or run alone.
template <bool Team, typename F>
inline void for_rows(std::int64_t n, F&& f) {
  if constexpr (Team) {
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) f(i);
  } else {
    for (std::int64_t i = 0; i < n; ++i) f(i);
  }
}

// [0, n) in chunks of 512 (shared among the team, or alone): f(begin, end) per chunk.
template <bool Team, typename F>
inline void for_chunks(std::int64_t n, F&& f) {
  constexpr std::int64_t C = 512;
  for_rows<Team>((n + C - 1) / C, [&](std::int64_t i) { f(i * C, std::min(n, (i + 1) * C)); });
}

// Run by one thread of the team while the others wait (implicit barrier), or run alone.
template <bool Team, typename F>
inline void once(F&& f) {
  if constexpr (Team) {
#pragma omp single
    { f(); }
  } else {
    f();
  }
}

// ---- Mat-vecs --------------------------------------------------------------------------------

// A weight matrix in both layouts: w (rows x n, row-major, the caller's) and, when some block
// integrates several tasks, wt = w^T (n x ldt, columns rows..ldt zero-padded).
template <typename T>
struct Mat {
  const T* w;
  const T* wt;
  std::int64_t rows, n, ldt;
};

// W against the vectors xs[0..nx): calls epi(r0, nr, slot, dots) with the dot products of rows
// [r0, r0 + nr) and vector `slot`, contiguous, so epilogues are SIMD loops too. Row tiles (16
// rows, or one strip) are the unit of work split among the team. tile: nx x kStrip scratch.
template <bool Team, typename T, typename Epi>
inline void matvec(const Mat<T>& m, const T* const* xs, int nx, T* tile, Epi&& epi) {
  const std::int64_t rows = m.rows, n = m.n;
  if (nx == 1 || m.wt == nullptr) {
    constexpr int R = 16;
    for_rows<Team>((rows + R - 1) / R, [&](std::int64_t rt) {
      const std::int64_t r0 = rt * R;
      const std::int64_t nr = std::min<std::int64_t>(R, rows - r0);
      T out[R];
      for (int t = 0; t < nx; ++t) {
        std::int64_t j = 0;
        for (; j + 4 <= nr; j += 4) dot_4x1(m.w + (r0 + j) * n, n, xs[t], n, out + j);
        for (; j < nr; ++j) out[j] = dot_1x1(m.w + (r0 + j) * n, xs[t], n);
        epi(r0, nr, t, static_cast<const T*>(out));
      }
    });
    return;
  }
  // Several tasks: strips of W^T, the reduction cut into blocks of kReduce so that a strip's
  // block of W^T (kReduce x 128 bytes) stays in L2 while every task of the block uses it.
  constexpr int B = kStrip<T>;
  constexpr std::int64_t kReduce = 1024;
  for_rows<Team>((rows + B - 1) / B, [&](std::int64_t strip) {
    const std::int64_t r0 = strip * B;
    const std::int64_t nr = std::min<std::int64_t>(B, rows - r0);
    const T* wt = m.wt + r0;
    for (std::int64_t i0 = 0; i0 < n; i0 += kReduce) {
      const std::int64_t i1 = std::min(n, i0 + kReduce);
      const bool acc = i0 > 0;
      int t = 0;
      for (; t + 8 <= nx; t += 8) outer_strip<T, 8>(wt, m.ldt, xs + t, i0, i1, tile + t * B, acc);
      if (t + 4 <= nx) outer_strip<T, 4>(wt, m.ldt, xs + t, i0, i1, tile + t * B, acc), t += 4;
      if (t + 2 <= nx) outer_strip<T, 2>(wt, m.ldt, xs + t, i0, i1, tile + t * B, acc), t += 2;
      if (t < nx) outer_strip<T, 1>(wt, m.ldt, xs + t, i0, i1, tile + t * B, acc);
    }
    for (int t = 0; t < nx; ++t) epi(r0, nr, t, static_cast<const T*>(tile + t * B));
  });
}

// w (rows x n) → w^T (n x ldt), columns [rows, ldt) zero; 32 x 32 blocks.
template <typename T>
void transpose_padded(const T* w, std::int64_t rows, std::int64_t n, std::int64_t ldt, std::vector<T>& out) {
  out.assign(static_cast<std::size_t>(n * ldt), T(0));
  T* o = out.data();
  constexpr std::int64_t K = 32;
#pragma omp parallel for schedule(static) if (rows * n > (1 << 18))
  for (std::int64_t i0 = 0; i0 < n; i0 += K)
    for (std::int64_t r0 = 0; r0 < rows; r0 += K)
      for (std::int64_t i = i0; i < std::min(n, i0 + K); ++i)
        for (std::int64_t r = r0; r < std::min(rows, r0 + K); ++r) o[i * ldt + r] = w[r * n + i];
}

// ---- The integration -------------------------------------------------------------------------

template <typename T>
struct Problem {
  Mat<T> w_in;          // H x P
  Mat<T> w_mid;         // H x H
  Mat<T> w_out;         // P x H
  const T* b_mid;       // H
  const T* b_out;       // P
  const T* task_bias;   // tasks x H
  const T* time_table;  // steps x stages x H
  T* state;             // tasks x P
  std::int64_t* done;   // tasks
  std::int64_t P, H, steps;
  DriftCoefs<T> c;
  // Scratch, indexed by task: k (tasks x stages x P), stage input / increment (tasks x P),
  // hidden activations (tasks x H each).
  T* k;
  T* ys;
  T* h1;
  T* h2;
};

// The tasks a block integrates together; shared by the team in team mode.
struct Block {
  std::vector<std::int64_t> active;  // task indices still integrating
};

template <bool Team, typename T>
void integrate_block(const Problem<T>& pr, Block& blk) {
  const std::int64_t P = pr.P, H = pr.H;
  const int S = pr.c.stages;
  const std::size_t cap = blk.active.size();
  // Per-thread pointer lists for the current stage's mat-vec inputs.
  std::vector<const T*> xin(cap), hin(cap);
  std::vector<T> tile(cap * kStrip<T>);  // outer-product results of one strip
  for (std::int64_t n = 0; n < pr.steps; ++n) {
    const int na = static_cast<int>(blk.active.size());
    if (na == 0) break;
    const std::int64_t* act = blk.active.data();
    for (int s = 0; s < S; ++s) {
      // Stage input y_s (only stages that read an earlier k).
      if (pr.c.has_a[s]) {
        for_chunks<Team>(P, [&](std::int64_t p0, std::int64_t p1) {
          for (int t = 0; t < na; ++t) {
            const std::int64_t task = act[t];
            const T* y = pr.state + task * P;
            const T* k = pr.k + task * S * P;
            T* __restrict ys = pr.ys + task * P;
            // drift_stage_input, one SIMD sweep per earlier stage (same summation order).
#pragma omp simd
            for (std::int64_t p = p0; p < p1; ++p) ys[p] = y[p];
            for (int j = 0; j < s; ++j) {
              const T coef = pr.c.a[s * S + j];
              const T* __restrict kj = k + j * P;
              if (coef == T(0)) continue;
#pragma omp simd
              for (std::int64_t p = p0; p < p1; ++p) ys[p] += coef * kj[p];
            }
          }
        });
      }
      for (int t = 0; t < na; ++t) xin[t] = (pr.c.has_a[s] ? pr.ys : pr.state) + act[t] * P;
      // h1 = silu(W_in y_s + task_bias + time_table[n, s])
      const T* tt = pr.time_table + (n * S + s) * H;
      matvec<Team>(pr.w_in, xin.data(), na, tile.data(), [&](std::int64_t r0, std::int64_t nr, int t, const T* d) {
        const std::int64_t task = act[t];
        T* __restrict h1 = pr.h1 + task * H + r0;
        const T* __restrict tb = pr.task_bias + task * H + r0;
        const T* __restrict ts = tt + r0;
#pragma omp simd
        for (std::int64_t j = 0; j < nr; ++j) h1[j] = drift_silu(d[j] + (tb[j] + ts[j]));
      });
      // h2 = silu(W_mid h1 + b_mid)
      for (int t = 0; t < na; ++t) hin[t] = pr.h1 + act[t] * H;
      matvec<Team>(pr.w_mid, hin.data(), na, tile.data(), [&](std::int64_t r0, std::int64_t nr, int t, const T* d) {
        T* __restrict h2 = pr.h2 + act[t] * H + r0;
        const T* __restrict bm = pr.b_mid + r0;
#pragma omp simd
        for (std::int64_t j = 0; j < nr; ++j) h2[j] = drift_silu(d[j] + bm[j]);
      });
      // k_s = W_out h2 + b_out; after the last stage also the increment (into the ys buffer).
      for (int t = 0; t < na; ++t) hin[t] = pr.h2 + act[t] * H;
      const bool last = s == S - 1;
      matvec<Team>(pr.w_out, hin.data(), na, tile.data(), [&](std::int64_t r0, std::int64_t nr, int t, const T* d) {
        const std::int64_t task = act[t];
        T* k = pr.k + task * S * P;
        T* __restrict ks = k + s * P + r0;
        const T* __restrict bo = pr.b_out + r0;
#pragma omp simd
        for (std::int64_t j = 0; j < nr; ++j) ks[j] = d[j] + bo[j];
        if (last) {  // drift_increment, one SIMD sweep per stage (same summation order)
          T* __restrict inc = pr.ys + task * P + r0;
          const T b0 = pr.c.b[0];
          const T* __restrict k0 = k + r0;
#pragma omp simd
          for (std::int64_t j = 0; j < nr; ++j) inc[j] = b0 * k0[j];
          for (int q = 1; q < S; ++q) {
            const T bq = pr.c.b[q];
            const T* __restrict kq = k + q * P + r0;
#pragma omp simd
            for (std::int64_t j = 0; j < nr; ++j) inc[j] += bq * kq[j];
          }
        }
      });
    }
    // The guard: drop the tasks whose increment diverged, count the accepted step.
    once<Team>([&] {
      std::size_t kept = 0;
      for (int t = 0; t < na; ++t) {
        const std::int64_t task = act[t];
        const T* inc = pr.ys + task * P;
        const T bound = pr.c.max_increment;
        int bad = 0;
#pragma omp simd reduction(| : bad)
        for (std::int64_t p = 0; p < P; ++p) bad |= !drift_increment_ok(inc[p], bound);
        if (!bad) {
          blk.active[kept++] = task;
          pr.done[task] += 1;
        }
      }
      blk.active.resize(kept);
    });
    const int nk = static_cast<int>(blk.active.size());
    const std::int64_t* kept = blk.active.data();
    for_chunks<Team>(P, [&](std::int64_t p0, std::int64_t p1) {
      for (int t = 0; t < nk; ++t) {
        T* __restrict y = pr.state + kept[t] * P;
        const T* __restrict inc = pr.ys + kept[t] * P;
#pragma omp simd
        for (std::int64_t p = p0; p < p1; ++p) y[p] += inc[p];
      }
    });
  }
}

std::int64_t round_up(std::int64_t v, std::int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
void run(const DriftParams& p) {
  const std::int64_t tasks = p.tasks, P = p.params, H = p.hidden, S = p.stages;
#ifdef _OPENMP
  const std::int64_t threads = omp_get_max_threads();
#else
  const std::int64_t threads = 1;
#endif
  // Team mode below as many tasks as threads; otherwise one block of tasks per thread.
  const bool team = tasks < threads || tasks == 1;
  const std::int64_t blocks = team ? 1 : threads;
  const bool multi = (tasks + blocks - 1) / blocks > 1;  // some block integrates several tasks
  // Threads only pay off above ~100k multiply-adds per evaluation (team mode: five barriers
  // per step or so, and each can cost a scheduler quantum on an oversubscribed machine) or
  // ~250k in all (task blocks).
  const std::int64_t per_eval = tasks * (2 * P * H + H * H);
  const bool small = team ? per_eval < (1 << 17) : per_eval * S * p.steps < (1 << 18);

  std::vector<T> wt_in, wt_mid, wt_out;
  const T* w_in = ptr<const T>(p.w_in);
  const T* w_mid = ptr<const T>(p.w_mid);
  const T* w_out = ptr<const T>(p.w_out);
  const std::int64_t hp = round_up(H, kStrip<T>), pp = round_up(P, kStrip<T>);
  if (multi) {
    transpose_padded(w_in, H, P, hp, wt_in);
    transpose_padded(w_mid, H, H, hp, wt_mid);
    transpose_padded(w_out, P, H, pp, wt_out);
  }
  std::vector<T> k(static_cast<std::size_t>(tasks * S * P)), ys(static_cast<std::size_t>(tasks * P));
  std::vector<T> h1(static_cast<std::size_t>(tasks * H)), h2(static_cast<std::size_t>(tasks * H));
  const Problem<T> pr{Mat<T>{w_in, multi ? wt_in.data() : nullptr, H, P, hp},
                      Mat<T>{w_mid, multi ? wt_mid.data() : nullptr, H, H, hp},
                      Mat<T>{w_out, multi ? wt_out.data() : nullptr, P, H, pp},
                      ptr<const T>(p.b_mid), ptr<const T>(p.b_out), ptr<const T>(p.task_bias),
                      ptr<const T>(p.time_table), ptr<T>(p.state), ptr<std::int64_t>(p.steps_done),
                      P, H, p.steps, drift_coefs<T>(p), k.data(), ys.data(), h1.data(), h2.data()};
  if (team) {
    Block blk;
    for (std::int64_t t = 0; t < tasks; ++t) blk.active.push_back(t);
#pragma omp parallel if (!small && threads > 1)
    integrate_block<true>(pr, blk);
    return;
  }
#pragma omp parallel for schedule(static, 1) if (!small)
  for (std::int64_t i = 0; i < blocks; ++i) {
    Block blk;
    for (std::int64_t t = i * tasks / blocks; t < (i + 1) * tasks / blocks; ++t) blk.active.push_back(t);
    integrate_block<false>(pr, blk);
  }
}

}  // namespace

void drift_integrate(CpuTag, const DriftParams& p) {
  check(p);
  dispatch_float(p.dtype, "drift_integrate", [&](auto zero) { run<decltype(zero)>(p); });
}

HF_ISA_END
}  // namespace hf
