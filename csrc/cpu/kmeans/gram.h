// Lloyd through the N x N Gram matrix (D large against N).
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "gram.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// --------------------------------------------------------------------------- Gram-matrix Lloyd
// Centers are represented by their members: c_j = sum_{l in S_j} w_l x_l / W_j, so
// <x_i, c_j> = sum_l (w_l / W_j) G[l, i] and ||c_j||^2 = sum_{l in S_j} (w_l / W_j) <x_l, c_j>.
// An iteration costs O(N^2 + N k) instead of O(N k D).  Returns false (caller falls back to the
// direct solver) in the one case membership cannot represent: an empty cluster with no point to
// take.
template <class T>
bool solve_gram(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<i64>* init_idx,
                const T* init_c, int max_iter, bool par, Run<T>& out) {
  const i64 n = ds.n, d = ds.d;
  const double* w = ds.w;
  const double* G = prep.gram.data();
  std::vector<double> cr(size_t(k) * n), crn(size_t(k) * n), cn(k), cnn(k);
  if (init_idx) {
    for (i64 j = 0; j < k; ++j) {
      const i64 p = (*init_idx)[j];
      std::copy(G + p * n, G + (p + 1) * n, &cr[size_t(j) * n]);
      cn[j] = G[p * n + p];
    }
  } else {
    for (i64 j = 0; j < k; ++j) {
      const T* c = init_c + j * d;
      double s = 0;
      for (i64 q = 0; q < d; ++q) s += double(c[q]) * double(c[q]);
      cn[j] = s;
#pragma omp parallel for if (par) schedule(static)
      for (i64 i = 0; i < n; ++i) {
        double dot = 0;
        const T* x = ds.x + i * d;
        for (i64 q = 0; q < d; ++q) dot += double(x[q]) * double(c[q]);
        cr[size_t(j) * n + i] = dot;
      }
    }
  }
  std::vector<i32> lab(n), lab_old(n, -1), eff(n);
  std::vector<double> best(n), d2own(n), wsum(k), coef(n);
  std::vector<i32> empty;
  std::vector<i64> moved;
  auto e_step = [&]() {
    std::fill(best.begin(), best.end(), kInf);
    for (i64 j = 0; j < k; ++j) {
      const double* row = &cr[size_t(j) * n];
      const double c = cn[j];
      for (i64 i = 0; i < n; ++i) {
        const double v = c - 2.0 * row[i];
        if (v < best[i]) { best[i] = v; lab[i] = i32(j); }
      }
    }
  };
  std::vector<i32> eff_old(n);  // the previous M-step's members and weights, for exact_shift
  std::vector<double> coef_old(n);
  // The shift sum_j ||c_new_j - c_old_j||^2 from the centers themselves, rounded to T as the direct solvers'
  // are.  Only the clusters whose members changed are built (from their members, in index order, as the
  // returned centroids are): the others' centers are the same sums, so their shift is 0.  first: the old centers are
  // the starts (a start at point p is that row exactly, and so is the mean of p alone).
  std::vector<char> changed(k);
  std::vector<i64> slot(k), lone(k);
  auto exact_shift = [&](bool first) {
    std::fill(changed.begin(), changed.end(), char(0));
    if (first) {
      std::fill(lone.begin(), lone.end(), i64(-1));  // the one member of positive coef, -2: more than one
      for (i64 l = 0; l < n; ++l)
        if (coef[l] != 0.0) lone[eff[l]] = lone[eff[l]] == -1 ? l : -2;
      for (i64 j = 0; j < k; ++j) changed[j] = !(init_idx && lone[j] >= 0 && lone[j] == (*init_idx)[j]);
    } else {
      for (i64 l = 0; l < n; ++l)
        if (eff[l] != eff_old[l] || coef[l] != coef_old[l]) changed[eff[l]] = changed[eff_old[l]] = 1;
    }
    i64 m = 0;
    for (i64 j = 0; j < k; ++j) slot[j] = changed[j] ? m++ : -1;
    std::vector<double> an(size_t(m) * d, 0.0), ao(size_t(m) * d, 0.0);
    auto add = [&](const std::vector<i32>& members, const std::vector<double>& cf, std::vector<double>& a) {
      for (i64 l = 0; l < n; ++l) {
        const i64 s = slot[members[l]];
        if (s < 0 || cf[l] == 0.0) continue;
        const T* x = ds.x + l * d;
        for (i64 q = 0; q < d; ++q) a[size_t(s) * d + q] += cf[l] * double(x[q]);
      }
    };
    add(eff, coef, an);
    if (!first) add(eff_old, coef_old, ao);
    double tot = 0;
    for (i64 j = 0; j < k; ++j) {
      if (slot[j] < 0) continue;
      const double* cn_j = &an[size_t(slot[j]) * d];
      const double* co_j = &ao[size_t(slot[j]) * d];
      for (i64 q = 0; q < d; ++q) {
        const double old = first ? double(init_idx ? ds.x[(*init_idx)[j] * d + q] : init_c[j * d + q])
                                 : double(T(co_j[q]));
        const double u = double(T(cn_j[q])) - old;
        tot += u * u;
      }
    }
    return tot;
  };
  bool strict = false;
  int it = 0;
  for (it = 0; it < max_iter; ++it) {
    e_step();
    std::fill(wsum.begin(), wsum.end(), 0.0);
    for (i64 i = 0; i < n; ++i) wsum[lab[i]] += weight(w, i);
    eff = lab;
    empty.clear();
    for (i64 j = 0; j < k; ++j)
      if (wsum[j] <= 0) empty.push_back(i32(j));
    if (!empty.empty()) {
      for (i64 i = 0; i < n; ++i) d2own[i] = std::max(0.0, G[i * n + i] + best[i]);
      relocate(n, k, d, ds.x, w, lab.data(), d2own.data(), empty, nullptr, wsum.data(), moved);
      for (size_t e = 0; e < empty.size(); ++e) {
        if (moved[e] < 0) return false;
        eff[moved[e]] = empty[e];
      }
    }
    // New cross products <x_i, c_j> for every i: one pass over G's rows.
    for (i64 l = 0; l < n; ++l) coef[l] = weight(w, l) / wsum[eff[l]];
    std::fill(crn.begin(), crn.end(), 0.0);
    auto add_columns = [&](i64 lo, i64 hi) {  // columns [lo, hi) of every member's weighted Gram row
      for (i64 l = 0; l < n; ++l) {
        if (coef[l] == 0.0) continue;
        double* dst = &crn[size_t(eff[l]) * n];
        const double* g = G + l * n;
        const double a = coef[l];
#pragma omp simd
        for (i64 i = lo; i < hi; ++i) dst[i] += a * g[i];
      }
    };
    if (par) {
      const int nth = omp_get_max_threads();
#pragma omp parallel num_threads(nth)
      {
        const int t = omp_get_thread_num();
        add_columns(n * t / nth, n * (t + 1) / nth);
      }
    } else {
      add_columns(0, n);
    }
    // ||c_new||^2 and <c_new, c_old> from the members; shift = ||c_new - c_old||^2.
    std::fill(cnn.begin(), cnn.end(), 0.0);
    std::vector<double> cross_old(k, 0.0);
    for (i64 l = 0; l < n; ++l) {
      const i64 j = eff[l];
      cnn[j] += coef[l] * crn[size_t(j) * n + l];
      cross_old[j] += coef[l] * cr[size_t(j) * n + l];
    }
    double shift_tot = 0, scale = 0;
    for (i64 j = 0; j < k; ++j) {
      shift_tot += std::max(0.0, cnn[j] - 2.0 * cross_old[j] + cn[j]);
      scale += std::abs(cnn[j]) + 2.0 * std::abs(cross_old[j]) + std::abs(cn[j]);
    }
    cr.swap(crn);
    cn.swap(cnn);
    // Labels unchanged: converged.  The final E-step is skipped unless a relocation moved a
    // center in this very step (the labels would not match the returned centroids otherwise).
    if (lab == lab_old) { strict = empty.empty(); break; }
    // The expansion's shift carries the rounding of its three terms, which are large beside a small shift
    // (at a standstill it read a few ulps of ||c||^2 above 0, so tol = 0 never stopped on it; in thousands
    // of dimensions the rounding reaches tol itself).  Within that rounding of tol the shift is taken again
    // from the centers, the way the direct solvers and scikit-learn take it.
    if (shift_tot <= prep.tol_abs + 64.0 * double(n + 1) * 0x1p-52 * scale) shift_tot = exact_shift(it == 0);
    if (shift_tot <= prep.tol_abs) break;
    lab_old = lab;
    eff_old = eff;
    coef_old = coef;
  }
  out.converged = it < max_iter;
  out.n_iter = i32(std::min(it + 1, max_iter));
  if (!strict) e_step();
  // Materialize the centroids from the members of the last M-step.
  out.centroids.assign(size_t(k) * d, T(0));
  std::vector<double> acc(size_t(k) * d, 0.0);
  for (i64 l = 0; l < n; ++l) {
    if (coef[l] == 0.0) continue;
    double* a = &acc[size_t(eff[l]) * d];
    const T* x = ds.x + l * d;
    for (i64 q = 0; q < d; ++q) a[q] += coef[l] * double(x[q]);
  }
  for (size_t q = 0; q < acc.size(); ++q) out.centroids[q] = T(acc[q]);
  out.labels.swap(lab);
  out.algo = Algo::Gram;
  return true;
}
