// Batched k-means solver.  This file is compiled once per instruction set (KC_ARCH = generic,
// avx2, avx512) and the bindings pick one copy at load time from the CPU's features, so the
// distributed build is portable and still vectorized for the machine it runs on.  The hand-vectorized
// 9-D paths (k-means++ sweeps, top-m's scans) run in both the AVX2 and AVX-512 copies, mostly written
// once against simd16.h (16 float lanes in one AVX-512 register or two AVX2 ones); the AVX2 k-means++
// trial sweep, top-m's double-precision distance and Top8 have their own per-ISA code, and the generic
// copy keeps scalar loops.
//
// Semantics follow scikit-learn's Lloyd (greedy k-means++, tol relative to the data's mean
// variance, strict convergence when no label changes, empty clusters moved to far points, a final
// E-step so labels match the returned centroids).  Exact solvers give the same iterates as plain
// Lloyd with far less work, chosen per problem:
//   * hamerly  - triangle-inequality bounds skip most distance computations (k < 20);
//   * yinyang  - one bound per group of centers (k >= 20, D > 16);
//   * topm     - each point's 2 or 4 nearest competitors plus one bound for the rest, the point looked
//                at only once the drifts may have closed its gap (k >= 20, D <= 16: 3x3 kernels);
//   * gram     - distances through the N x N Gram matrix when D is large against N: centroids are
//                weighted means of points, so every distance is a combination of Gram entries;
//   * lloyd1d  - D == 1: points sorted once, clusters are intervals, an iteration is O(k log N).
// plus exact1d, the globally optimal 1-D clustering (dynamic programming, divide and conquer), and
// distinct: k == N distinct points, each its own centroid.
//
// Layout: this file holds the driver (per-problem algorithm choice, per-dataset preparation, one
// problem's runs, the batch schedule); the solvers live in fragments it includes inside its
// per-ISA namespace: common.h (random stream, helpers, Prepared, Centers, relocation, M-step),
// seeding.h (k-means++, random init), lloyd.h (Lloyd, Hamerly), yinyang.h, topm.h, gram.h,
// one_d.h (1-D Lloyd, exact 1-D); simd16.h is the 16-lane vector layer the 9-D paths use.
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "batch.h"

#ifndef KC_ARCH
#define KC_ARCH generic
#endif

namespace kcengine::km::KC_ARCH {
namespace {

#include "simd16.h"

using i64 = int64_t;
using i32 = int32_t;
constexpr double kInf = std::numeric_limits<double>::infinity();

// The solver in parts, in dependency order (each a fragment of this file, see its first lines):
#include "common.h"
#include "seeding.h"
#include "lloyd.h"
#include "yinyang.h"
#include "topm.h"
#include "gram.h"
#include "one_d.h"

// ------------------------------------------------------------------------------ the driver
// k == N points, all distinct and of positive weight: the one clustering of inertia 0 has every point
// its own centroid, and every seeding reaches it (k-means++ and random draws take each point once, as
// scikit-learn's do), so "auto" returns it without a seeding and Lloyd iterations that would cost
// O(k N D) for nothing (resnet20's 16x16 layers as 3x3 kernels at k = 256 are such problems).
template <class T>
bool all_distinct(const Dataset<T>& ds) {
  const i64 n = ds.n, d = ds.d;
  for (i64 i = 0; i < n; ++i)
    if (!(weight(ds.w, i) > 0)) return false;
  std::vector<i64> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto row = [&](i64 i) { return ds.x + i * d; };
  std::sort(order.begin(), order.end(), [&](i64 a, i64 b) {
    return std::lexicographical_compare(row(a), row(a) + d, row(b), row(b) + d);
  });
  for (i64 p = 1; p < n; ++p)  // == on values: 0.0 and -0.0 count as the same point
    if (std::equal(row(order[p - 1]), row(order[p - 1]) + d, row(order[p]))) return false;
  return true;
}

template <class T>
void solve_distinct(const Dataset<T>& ds, Problem<T>& pr) {
  std::copy(ds.x, ds.x + ds.n * ds.d, pr.centroids);
  for (i64 i = 0; i < ds.n; ++i) pr.labels[i] = i;
  pr.inertia = 0.0;
  pr.n_iter = 0;
  pr.converged = true;
  pr.algo = Algo::Distinct;
}

// `distinct()`: whether the dataset's points are all distinct and of positive weight (asked only for
// k == N; the caller computes it once per dataset).
template <class T, class DistinctFn>
Algo choose_algo(const Dataset<T>& ds, i64 k, const Params& params, DistinctFn&& distinct) {
  const Algo requested = params.algorithm;
  if (requested != Algo::Auto) return requested;
  if (k == ds.n && params.init != Init::Given && distinct()) return Algo::Distinct;
  if (ds.d == 1) return Algo::Lloyd1D;
  const double n = double(ds.n), d = double(ds.d), kk = double(k);
  if (ds.n <= 4096 && ds.d >= 16 && 2.0 * (n + kk) < kk * d) return Algo::Gram;
  if (k < 20) return Algo::Hamerly;
  return ds.d <= 16 ? Algo::TopM : Algo::Yinyang;
}

template <class T>
double est_cost(const Dataset<T>& ds, i64 k, Algo a) {
  const double n = double(ds.n), d = double(ds.d), kk = double(k);
  switch (a) {
    case Algo::Gram: return 20.0 * (n * n + n * kk) + kk * 8.0 * n;
    case Algo::Lloyd1D: return kk * 8.0 * n;
    case Algo::Exact1D: return kk * n * std::log2(n + 2.0);
    case Algo::Lloyd: return 30.0 * n * kk * d;
    case Algo::Distinct: return n * d;
    default: return 5.0 * n * kk * d + kk * 8.0 * n * d;
  }
}

// `rows` points of dimension d minus `shift`, rounded once to T.
template <class T>
void center_rows(const T* x, i64 rows, i64 d, const std::vector<double>& shift, T* out) {
  for (i64 i = 0; i < rows; ++i)
    for (i64 q = 0; q < d; ++q) out[i * d + q] = T(double(x[i * d + q]) - shift[q]);
}

// The solvers' per-dataset arrays, from the data they see (`prep.data`).
template <class T>
void prepare_views(const Params& params, Prepared<T>& prep, bool want_direct, bool want_gram, bool want_sorted,
                   bool par) {
  const Dataset<T>& ds = prep.data;
  const i64 n = ds.n, d = ds.d;
  if (want_direct && !prep.has_direct) {
    prep.xnorm.resize(n);
    for (i64 i = 0; i < n; ++i) {
      double s = 0;
      for (i64 q = 0; q < d; ++q) s += double(ds.x[i * d + q]) * double(ds.x[i * d + q]);
      prep.xnorm[i] = T(s);
    }
    if (params.init == Init::KMeansPP) {
      // Rows 16 values past a multiple of 16 apart (a cache line of floats, two of doubles): at n = 1024,
      // 2048, 4096 rows n apart start 4 KiB multiples apart, so the sweep's d column streams share an L1 set.
      prep.xt_ld = (n + 15) / 16 * 16 + 16;
      prep.xt.assign(size_t(d) * prep.xt_ld, T(0));
      for (i64 i = 0; i < n; ++i)
        for (i64 q = 0; q < d; ++q) prep.xt[size_t(q) * prep.xt_ld + i] = ds.x[i * d + q];
    }
    prep.has_direct = true;
  }
  if (want_gram && !prep.has_gram) {
    compute_gram(ds, prep.gram, par);
    prep.has_gram = true;
  }
  if (want_sorted && !prep.has_sorted) {
    prep.order.resize(n);
    std::iota(prep.order.begin(), prep.order.end(), 0);
    std::stable_sort(prep.order.begin(), prep.order.end(), [&](i64 a, i64 b) { return ds.x[a] < ds.x[b]; });
    prep.sv.resize(n);
    prep.sw.resize(n);
    prep.pw.assign(n + 1, 0.0);
    prep.pwx.assign(n + 1, 0.0);
    for (i64 p = 0; p < n; ++p) {
      prep.sv[p] = double(ds.x[prep.order[p]]);
      prep.sw[p] = weight(ds.w, prep.order[p]);
      prep.pw[p + 1] = prep.pw[p] + prep.sw[p];
      prep.pwx[p + 1] = prep.pwx[p] + prep.sw[p] * prep.sv[p];
    }
    prep.has_sorted = true;
  }
}

template <class T>
void prepare(const Dataset<T>& ds, const Params& params, Prepared<T>& prep, bool want_direct, bool want_gram,
             bool want_sorted, bool par) {
  const i64 n = ds.n, d = ds.d;
  std::vector<double> mean;
  const double var_sum = feature_moments(ds, mean);
  prep.tol_abs = params.tol * (var_sum / double(d));
  double m2 = 0.0;
  for (double m : mean) m2 += m * m;
  prep.data = ds;
  if (m2 > var_sum) {
    prep.shift = mean;
    prep.xc.resize(size_t(n) * d);
    center_rows(ds.x, n, d, mean, prep.xc.data());
    prep.data.x = prep.xc.data();
  }
  // Tiny spread (Prepared::scale_exp): float32 squares reach FLT_MIN (2^-126) near 2^-63; the margin keeps
  // squared distances of a thousandth of the spread normal.  (Zero variance: identical points, nothing to do.)
  // Huge float64 data (see there too): beyond 2^64 the solvers' float32 bounds come near their range.
  constexpr double kTinyVar = sizeof(T) == 4 ? 0x1p-60 : 0x1p-500;
  const bool tiny = var_sum < kTinyVar;
  if (tiny || sizeof(T) == 8) {
    double amax = 0.0;
    for (i64 q = 0; q < n * d; ++q) amax = std::max(amax, std::abs(double(prep.data.x[q])));
    if (amax > 0.0 && (tiny || amax > 0x1p64)) {
      std::frexp(amax, &prep.scale_exp);
      prep.scale_exp = -prep.scale_exp;
      if (prep.xc.empty()) prep.xc.assign(ds.x, ds.x + n * d);
      for (auto& v : prep.xc) v = std::ldexp(v, prep.scale_exp);
      prep.data.x = prep.xc.data();
      std::vector<double> scaled_mean;  // the tolerance from the scaled data: its variance may be 0 unscaled
      prep.tol_abs = params.tol * (feature_moments(prep.data, scaled_mean) / double(d));
    }
  }
  prepare_views(params, prep, want_direct, want_gram, want_sorted, par);
}

// Centroids in the caller's coordinates: the centered ones plus the shift, except that a coordinate all of
// a cluster's members share comes back as that very value when the centroid lies within the round trip's
// rounding of it (a singleton cluster is its point exactly, as without centering; the trip through the
// centered copy could miss it by a few ulps of the shift).  The labels are the final E-step's: where that
// step moved points the centroid is the mean of the members before, and stays as computed.
template <class T>
void shift_back(const Dataset<T>& src, const Prepared<T>& prep, const Run<T>& run, T* out) {
  const i64 n = src.n, d = src.d, kd = i64(run.centroids.size());
  constexpr T inf = std::numeric_limits<T>::infinity();  // an empty cluster keeps lo > hi
  std::vector<T> lo(kd, inf), hi(kd, -inf);
  for (i64 i = 0; i < n; ++i) {
    const T* x = src.x + i * d;
    T* l = &lo[size_t(run.labels[i]) * d];
    T* h = &hi[size_t(run.labels[i]) * d];
    for (i64 q = 0; q < d; ++q) {
      l[q] = std::min(l[q], x[q]);
      h[q] = std::max(h[q], x[q]);
    }
  }
  constexpr double eps = std::numeric_limits<T>::epsilon();
  for (i64 o = 0; o < kd; ++o) {
    const double shift = prep.shift[o % d];
    const double c = double(run.centroids[o]) + shift;
    const double v = double(lo[o]);
    const bool shared = lo[o] == hi[o] && std::abs(v - c) <= 4.0 * eps * std::max(std::abs(v), std::abs(shift));
    out[o] = shared ? lo[o] : T(c);
  }
}

template <class T>
// `src`: the caller's dataset; the solvers see `prep.data` (maybe its centered copy).
void solve_problem(const Dataset<T>& src, const Prepared<T>& prep, Problem<T>& pr, const Params& params, Algo algo,
                   bool par, const Exact1DTable* exact_table = nullptr) {
  if (algo == Algo::Distinct) {  // the caller's points as they are (their dataset may not be prepared)
    solve_distinct(src, pr);
    return;
  }
  const Dataset<T>& ds = prep.data;
  const i64 n = ds.n, d = ds.d, k = pr.k;
  // Inner parallel loops pay a barrier each: only worth it when one pass has real work.
  par = par && (algo == Algo::Gram ? n >= 1024 : n * std::max<i64>(d, 4) >= (i64(1) << 17));
  Run<T> best, run;
  const int runs = params.init == Init::Given ? 1 : params.n_init;
  for (int r = 0; r < runs; ++r) {
    Rng rng(params.seed, uint64_t(r));
    std::vector<i64> idx;
    if (params.init == Init::KMeansPP && algo != Algo::Exact1D) {
      std::vector<double> d2(n);
      if (algo == Algo::Gram) {
        const double* G = prep.gram.data();
        kmeanspp(n, k, ds.w, rng, [&](i64 c, const double* closest, double* o) {
          for (i64 i = 0; i < n; ++i) d2[i] = std::max(0.0, G[i * n + i] + G[c * n + c] - 2.0 * G[c * n + i]);
          return fuse_min_pot(0, n, d2.data(), closest, ds.w, o);
        }, idx);
      } else if (algo == Algo::Lloyd1D && double(n) * double(k) > kSeed1DFast) {
        kmeanspp_1d(prep, n, k, rng, idx);
      } else if (algo == Algo::Lloyd1D) {
        kmeanspp(n, k, ds.w, rng, [&](i64 c, const double* closest, double* o) {
          const double xc = double(ds.x[c]);
          for (i64 i = 0; i < n; ++i) d2[i] = (double(ds.x[i]) - xc) * (double(ds.x[i]) - xc);
          return fuse_min_pot(0, n, d2.data(), closest, ds.w, o);
        }, idx);
      } else {
        kmeanspp_direct(ds, prep, k, rng, idx, par);
      }
    } else if (params.init == Init::Random && algo != Algo::Exact1D) {
      random_init(n, k, ds.w, rng, idx);
    }
    std::vector<T> init_c(size_t(k) * d);
    if (params.init == Init::Given) {  // in the coordinates of the data the solvers see
      if (prep.shift.empty()) std::copy(pr.init, pr.init + k * d, init_c.begin());
      else center_rows(pr.init, k, d, prep.shift, init_c.data());
      if (prep.scale_exp != 0)
        for (auto& v : init_c) v = std::ldexp(v, prep.scale_exp);
    } else if (!idx.empty())
      for (i64 j = 0; j < k; ++j) std::copy(ds.x + idx[j] * d, ds.x + (idx[j] + 1) * d, &init_c[size_t(j) * d]);

    switch (algo) {
      case Algo::Exact1D: solve_exact1d(ds, prep, k, run, exact_table); break;
      case Algo::Lloyd1D: {
        std::vector<double> c0(init_c.begin(), init_c.end());
        solve_1d(ds, prep, k, c0, params.max_iter, run);
        break;
      }
      case Algo::Gram:
        if (solve_gram(ds, prep, k, idx.empty() ? nullptr : &idx, init_c.data(), params.max_iter, par, run)) break;
        throw std::runtime_error("gram fallback");  // handled by the caller: re-run direct
      case Algo::Yinyang: solve_yinyang(ds, prep, k, init_c, params.max_iter, par, run); break;
      case Algo::TopM:
        if (ds.d == 9 && ds.n <= kShortListN) solve_topm<T, 9, 2>(ds, prep, k, init_c, params.max_iter, par, run);
        else if (ds.d == 9) solve_topm<T, 9, 4>(ds, prep, k, init_c, params.max_iter, par, run);
        else solve_topm<T, 0, 4>(ds, prep, k, init_c, params.max_iter, par, run);
        break;
      default: solve_direct(ds, prep, k, init_c, params.max_iter, algo == Algo::Hamerly, par, run); break;
    }
    run.inertia = inertia_of(ds, run.centroids, run.labels, par);
    if (r == 0 || run.inertia < best.inertia) std::swap(best, run);
    if (algo == Algo::Exact1D) break;  // deterministic: one run is the optimum
  }
  if (prep.scale_exp != 0) {  // back to the caller's scale (rounded once where that is subnormal)
    for (auto& v : best.centroids) v = std::ldexp(v, -prep.scale_exp);
    best.inertia = std::ldexp(best.inertia, -2 * prep.scale_exp);
  }
  if (prep.shift.empty()) {
    std::copy(best.centroids.begin(), best.centroids.end(), pr.centroids);
  } else {
    shift_back(src, prep, best, pr.centroids);
  }
  for (i64 i = 0; i < n; ++i) pr.labels[i] = best.labels[i];
  pr.inertia = best.inertia;
  pr.n_iter = best.n_iter;
  pr.converged = best.converged;
  pr.algo = best.algo;
}

template <class T>
void run_batch(Batch<T>& batch) {
  const Params& params = batch.params;
  const i64 B = i64(batch.problems.size());
  const i64 nd = i64(batch.datasets.size());
  if (B == 0) return;
  std::vector<Algo> algo(B);
  std::vector<double> cost(B);
  std::vector<char> ds_direct(nd, 0), ds_gram(nd, 0), ds_sorted(nd, 0);
  std::vector<signed char> ds_distinct(nd, -1);  // all_distinct per dataset, once asked
  for (i64 p = 0; p < B; ++p) {
    const auto& pr = batch.problems[p];
    const auto& ds = batch.datasets[pr.data];
    algo[p] = choose_algo(ds, pr.k, params, [&] {
      signed char& known = ds_distinct[pr.data];
      if (known < 0) known = all_distinct(ds) ? 1 : 0;
      return known == 1;
    });
    if (algo[p] == Algo::Gram && int64_t(ds.n) * ds.n * 8 > params.gram_budget_bytes) algo[p] = Algo::Hamerly;
    cost[p] = est_cost(ds, pr.k, algo[p]);
    switch (algo[p]) {  // what each dataset needs prepared
      case Algo::Gram: ds_gram[pr.data] = ds_direct[pr.data] = 1; break;  // direct: the fallback path
      case Algo::Lloyd1D:
      case Algo::Exact1D: ds_sorted[pr.data] = 1; break;
      case Algo::Lloyd:
      case Algo::Hamerly:
      case Algo::Yinyang:
      case Algo::TopM: ds_direct[pr.data] = 1; break;
      case Algo::Auto:
      case Algo::Distinct: break;  // nothing: the points are the answer
    }
  }
  // A batch with little work in all runs on one thread: waking a team and meeting at barriers
  // costs more than it saves (milliseconds on a busy machine).
  double work = 0;
  for (i64 p = 0; p < B; ++p) work += cost[p];
  for (i64 j = 0; j < nd; ++j)
    if (ds_gram[j]) work += 0.5 * double(batch.datasets[j].n) * double(batch.datasets[j].n) * double(batch.datasets[j].d);
  const int nth = work < 2e7 ? 1 : omp_get_max_threads();
  const bool team = nth > 1;
  // Datasets are processed in chunks whose Gram matrices fit the memory budget; within a chunk
  // per-dataset preparation runs first, then the problems (large ones alone with every thread,
  // the rest spread over threads, most expensive first).
  std::vector<i64> ds_order(nd);
  std::iota(ds_order.begin(), ds_order.end(), 0);
  std::vector<std::vector<i64>> by_ds(nd);
  for (i64 p = 0; p < B; ++p) by_ds[batch.problems[p].data].push_back(p);
  std::string error;
  i64 start = 0;
  while (start < nd) {
    i64 end = start;
    int64_t bytes = 0;
    while (end < nd) {
      const auto& ds = batch.datasets[ds_order[end]];
      const int64_t b = ds_gram[ds_order[end]] ? int64_t(ds.n) * ds.n * 8 : 0;
      if (end > start && bytes + b > params.gram_budget_bytes) break;
      bytes += b;
      ++end;
    }
    std::vector<Prepared<T>> prep(end - start);
    const i64 nchunk = end - start;
    const bool inner_prep = team && nchunk < 2 * nth;
    auto do_prep = [&](i64 q, bool par) {
      const i64 j = ds_order[start + q];
      if (!(ds_direct[j] || ds_gram[j] || ds_sorted[j])) return;  // no problems, or only Distinct ones
      prepare(batch.datasets[j], params, prep[q], ds_direct[j], ds_gram[j], ds_sorted[j], par);
    };
    if (inner_prep) {
      for (i64 q = 0; q < nchunk; ++q) do_prep(q, true);
    } else {
#pragma omp parallel for if (team) schedule(dynamic, 1)
      for (i64 q = 0; q < nchunk; ++q) {
        try { do_prep(q, false); } catch (const std::exception& e) {
#pragma omp critical
          error = e.what();
        }
      }
      if (!error.empty()) throw std::runtime_error(error);
    }
    std::vector<i64> local_of(nd, -1);
    for (i64 q = 0; q < nchunk; ++q) local_of[ds_order[start + q]] = q;
    std::vector<i64> probs;
    double total = 0;
    for (i64 q = start; q < end; ++q)
      for (i64 p : by_ds[ds_order[q]]) { probs.push_back(p); total += cost[p]; }
    std::sort(probs.begin(), probs.end(), [&](i64 a, i64 b) { return cost[a] > cost[b] || (cost[a] == cost[b] && a < b); });
    // Tasks: one problem each, except the exact 1-D problems of one dataset (a k sweep), which form one task
    // sharing one DP table built for their largest k; a task sits where its costliest problem sorts.
    std::vector<std::vector<i64>> tasks;
    {
      std::vector<i64> exact_count(nd, 0), exact_task(nd, -1);
      for (i64 p : probs)
        if (algo[p] == Algo::Exact1D) ++exact_count[batch.problems[p].data];
      for (i64 p : probs) {
        const i64 j = batch.problems[p].data;
        if (algo[p] != Algo::Exact1D || exact_count[j] < 2) {
          tasks.push_back({p});
        } else if (exact_task[j] < 0) {
          exact_task[j] = i64(tasks.size());
          tasks.push_back({p});
        } else {
          tasks[exact_task[j]].push_back(p);
        }
      }
    }
    auto solve = [&](i64 p, bool par, const Exact1DTable* table) {
      auto& pr = batch.problems[p];
      auto& pp = prep[local_of[pr.data]];
      const auto& ds = batch.datasets[pr.data];
      try {
        solve_problem(ds, pp, pr, params, algo[p], par, table);
      } catch (const std::runtime_error& e) {
        if (std::string(e.what()) != "gram fallback") throw;
        solve_problem(ds, pp, pr, params, Algo::Hamerly, par);
      }
    };
    auto run_task = [&](const std::vector<i64>& task, bool par) {
      if (task.size() == 1) {
        solve(task[0], par, nullptr);
        return;
      }
      const auto& pr0 = batch.problems[task[0]];
      i64 kmax = 0;
      for (i64 p : task) kmax = std::max<i64>(kmax, batch.problems[p].k);
      Exact1DTable table;
      exact1d_table(prep[local_of[pr0.data]].data, prep[local_of[pr0.data]], kmax, table);
      for (i64 p : task) solve(p, par, &table);
    };
    size_t big = 0;
    while (big < tasks.size() && nth > 1 && cost[tasks[big][0]] * nth > total) ++big;
    for (size_t q = 0; q < big; ++q) run_task(tasks[q], true);
    const i64 rest = i64(tasks.size() - big);
#pragma omp parallel for if (team) schedule(dynamic, 1)
    for (i64 q = 0; q < rest; ++q) {
      try { run_task(tasks[big + q], false); } catch (const std::exception& e) {
#pragma omp critical
        error = e.what();
      }
    }
    if (!error.empty()) throw std::runtime_error(error);
    start = end;
  }
}

}  // namespace

void run(Batch<float>& batch) { run_batch(batch); }
void run(Batch<double>& batch) { run_batch(batch); }

}  // namespace kcengine::km::KC_ARCH
