// CPU kernel for the fused drift integration: the whole step / stage loop in one call.
//
// Parallelism: with fewer tasks than threads (tasks == 1 in particular) one OpenMP team runs the
// whole integration and splits the rows of every mat-vec among its threads ("team" mode: `omp
// for` with its implicit barrier between phases, the guard in `omp single`); otherwise the tasks
// are cut into blocks of up to eight and each thread integrates whole blocks with no barrier.
//
// Mat-vec forms: one task → blocked dot products over the rows of W (four rows share each load
// of the vector); several tasks → outer-product tiles over W transposed (a 32-row strip of W^T
// times up to eight task vectors, the accumulators in registers), so each weight loaded serves
// every task of the block. Both are `omp simd` loops. Scratch (the transposed weights, and
// stages x P, P, H, H per task) is allocated once per call.
#include "hf_drift.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hf {
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

// A strip of kStrip rows of W against NT vectors, read from W^T (n x ldt, row-major):
// out[t * kStrip + j] = sum_i wt[i, j] * x[t][i]. The NT x kStrip accumulators stay in registers.
template <typename T, int NT>
__attribute__((noinline)) void outer_strip(const T* __restrict wt, std::int64_t ldt, const T* const* x, std::int64_t n, T* out) {
  constexpr int B = kStrip<T>;
  T acc[NT][B] = {};
  for (std::int64_t i = 0; i < n; ++i) {
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

// W against the vectors xs[0..nx): calls epi(row, slot, dot) for every row and vector.
// Row tiles (4 rows, or a strip) are the unit of work split among the team.
template <bool Team, typename T, typename Epi>
inline void matvec(const Mat<T>& m, const T* const* xs, int nx, Epi&& epi) {
  const std::int64_t rows = m.rows, n = m.n;
  if (nx == 1 || m.wt == nullptr) {
    for_rows<Team>((rows + 3) / 4, [&](std::int64_t tile) {
      const std::int64_t r0 = tile * 4;
      if (r0 + 4 > rows) {  // ragged last tile: one row at a time
        for (std::int64_t r = r0; r < rows; ++r)
          for (int t = 0; t < nx; ++t) epi(r, t, dot_1x1(m.w + r * n, xs[t], n));
        return;
      }
      T out[4];
      for (int t = 0; t < nx; ++t) {
        dot_4x1(m.w + r0 * n, n, xs[t], n, out);
        for (int r = 0; r < 4; ++r) epi(r0 + r, t, out[r]);
      }
    });
    return;
  }
  constexpr int B = kStrip<T>;
  for_rows<Team>((rows + B - 1) / B, [&](std::int64_t strip) {
    const std::int64_t r0 = strip * B;
    const std::int64_t nr = std::min<std::int64_t>(B, rows - r0);
    const T* wt = m.wt + r0;
    T out[8 * B];
    auto emit = [&](int t0, int nt) {
      for (int t = 0; t < nt; ++t)
        for (std::int64_t j = 0; j < nr; ++j) epi(r0 + j, t0 + t, out[t * B + j]);
    };
    int t = 0;
    for (; t + 8 <= nx; t += 8) outer_strip<T, 8>(wt, m.ldt, xs + t, n, out), emit(t, 8);
    if (t + 4 <= nx) outer_strip<T, 4>(wt, m.ldt, xs + t, n, out), emit(t, 4), t += 4;
    if (t + 2 <= nx) outer_strip<T, 2>(wt, m.ldt, xs + t, n, out), emit(t, 2), t += 2;
    if (t < nx) outer_strip<T, 1>(wt, m.ldt, xs + t, n, out), emit(t, 1);
  });
}

// w (rows x n) → w^T (n x ldt), columns [rows, ldt) zero.
template <typename T>
void transpose_padded(const T* w, std::int64_t rows, std::int64_t n, std::int64_t ldt, std::vector<T>& out) {
  out.assign(static_cast<std::size_t>(n * ldt), T(0));
  T* o = out.data();
#pragma omp parallel for schedule(static) if (rows * n > (1 << 16))
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t r = 0; r < rows; ++r) o[i * ldt + r] = w[r * n + i];
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
  for (std::int64_t n = 0; n < pr.steps; ++n) {
    const int na = static_cast<int>(blk.active.size());
    if (na == 0) break;
    const std::int64_t* act = blk.active.data();
    for (int s = 0; s < S; ++s) {
      // Stage input y_s (only stages that read an earlier k).
      if (pr.c.has_a[s]) {
        for_rows<Team>(P, [&](std::int64_t p) {
          for (int t = 0; t < na; ++t) {
            const std::int64_t task = act[t];
            pr.ys[task * P + p] = drift_stage_input(pr.state + task * P, pr.k + task * S * P, P, pr.c, s, p);
          }
        });
      }
      for (int t = 0; t < na; ++t) xin[t] = (pr.c.has_a[s] ? pr.ys : pr.state) + act[t] * P;
      // h1 = silu(W_in y_s + task_bias + time_table[n, s])
      const T* tt = pr.time_table + (n * S + s) * H;
      matvec<Team>(pr.w_in, xin.data(), na, [&](std::int64_t h, int t, T acc) {
        const std::int64_t task = act[t];
        pr.h1[task * H + h] = drift_silu(acc + (pr.task_bias[task * H + h] + tt[h]));
      });
      // h2 = silu(W_mid h1 + b_mid)
      for (int t = 0; t < na; ++t) hin[t] = pr.h1 + act[t] * H;
      matvec<Team>(pr.w_mid, hin.data(), na, [&](std::int64_t h, int t, T acc) {
        pr.h2[act[t] * H + h] = drift_silu(acc + pr.b_mid[h]);
      });
      // k_s = W_out h2 + b_out; after the last stage also the increment (into the ys buffer).
      for (int t = 0; t < na; ++t) hin[t] = pr.h2 + act[t] * H;
      const bool last = s == S - 1;
      matvec<Team>(pr.w_out, hin.data(), na, [&](std::int64_t p, int t, T acc) {
        const std::int64_t task = act[t];
        T* k = pr.k + task * S * P;
        k[s * P + p] = acc + pr.b_out[p];
        if (last) pr.ys[task * P + p] = drift_increment(k, P, pr.c, p);
      });
    }
    // The guard: drop the tasks whose increment diverged, count the accepted step.
    once<Team>([&] {
      std::size_t kept = 0;
      for (int t = 0; t < na; ++t) {
        const std::int64_t task = act[t];
        const T* inc = pr.ys + task * P;
        bool ok = true;
        for (std::int64_t p = 0; p < P; ++p) ok = ok && drift_increment_ok(inc[p], pr.c.max_increment);
        if (ok) {
          blk.active[kept++] = task;
          pr.done[task] += 1;
        }
      }
      blk.active.resize(kept);
    });
    const int nk = static_cast<int>(blk.active.size());
    const std::int64_t* kept = blk.active.data();
    for_rows<Team>(P, [&](std::int64_t p) {
      for (int t = 0; t < nk; ++t) pr.state[kept[t] * P + p] += pr.ys[kept[t] * P + p];
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
  // Team mode below as many tasks as threads; otherwise blocks of up to eight tasks, at least
  // one block per thread.
  const bool team = tasks < threads || tasks == 1;
  const std::int64_t blocks = team ? 1 : std::min(tasks, std::max(threads, (tasks + 7) / 8));
  const bool multi = (tasks + blocks - 1) / blocks > 1;  // some block integrates several tasks
  // Tiny problems are not worth waking a team for.
  const bool small = tasks * S * p.steps * (2 * P * H + H * H) < (1 << 18);

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
#pragma omp parallel for schedule(dynamic, 1) if (!small)
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

}  // namespace hf
