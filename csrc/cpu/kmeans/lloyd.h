// Direct Lloyd and Hamerly (k < 20).
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "lloyd.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// ------------------------------------------------------------------ direct Lloyd / Hamerly
template <class T>
void solve_direct(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<T>& init, int max_iter,
                  bool bounds, bool par, Run<T>& out) {
  const i64 n = ds.n, d = ds.d;
  Centers<T> C;
  C.init(k, d);
  C.c = init;
  C.refresh();
  std::vector<i32> lab(n, 0), lab_old(n, -1);
  std::vector<double> u(n), l(n);  // distances (not squared): upper bound to own, lower to others
  std::vector<double> d2own(n);
  std::vector<double> sums(size_t(k) * d), wsum(k), shift(k), s_half(k);
  std::vector<T> cnew(size_t(k) * d);
  const int nth = ThreadCount::get(par);
  std::vector<std::vector<T>> bufs(nth);
  const i64 chunk_m = chunk_size(n), nchunk_m = (n + chunk_m - 1) / chunk_m;
  std::vector<double> tsums(nchunk_m > 1 ? size_t(nchunk_m) * k * d : 0), twsum(nchunk_m > 1 ? size_t(nchunk_m) * k : 0);
  std::vector<i32> empty;
  bool strict = false;
  int it = 0;
  const i64 chunk = 256;
  const i64 nchunks = (n + chunk - 1) / chunk;

  auto full_assign = [&]() {
#pragma omp parallel for if (par) schedule(dynamic, 4)
    for (i64 c = 0; c < nchunks; ++c) {
      const i64 i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      auto& buf = bufs[par ? omp_get_thread_num() : 0];
      assign_range(ds.x, prep.xnorm.data(), i0, i1, C, lab.data(), u.data(), l.data(), buf);
      for (i64 i = i0; i < i1; ++i) { u[i] = std::sqrt(u[i]); l[i] = std::sqrt(l[i]); }
    }
  };
  auto bounded_assign = [&]() {
    // s_half[j]: half the distance from center j to its nearest other center.
    std::fill(s_half.begin(), s_half.end(), kInf);
    for (i64 a = 0; a < k; ++a)
      for (i64 b = a + 1; b < k; ++b) {
        const double dd = std::sqrt(sqdist(&C.c[size_t(a) * d], &C.c[size_t(b) * d], d));
        s_half[a] = std::min(s_half[a], dd);
        s_half[b] = std::min(s_half[b], dd);
      }
    for (auto& s : s_half) s *= 0.5;
#pragma omp parallel for if (par) schedule(dynamic, 4)
    for (i64 c = 0; c < nchunks; ++c) {
      const i64 i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      auto& buf = bufs[par ? omp_get_thread_num() : 0];
      for (i64 i = i0; i < i1; ++i) {
        const double m = std::max(s_half[lab[i]], l[i]);
        if (u[i] <= m) continue;
        u[i] = std::sqrt(sqdist(ds.x + i * d, &C.c[size_t(lab[i]) * d], d));
        if (u[i] <= m) continue;
        assign_range(ds.x, prep.xnorm.data(), i, i + 1, C, lab.data(), u.data(), l.data(), buf);
        u[i] = std::sqrt(u[i]);
        l[i] = std::sqrt(l[i]);
      }
    }
  };
  auto e_step = [&](int iter) {
    if (!bounds || iter == 0) full_assign();
    else bounded_assign();
  };

  for (it = 0; it < max_iter; ++it) {
    e_step(it);
    // M-step: weighted sums per cluster.
    if (nchunk_m <= 1) {
      sums_of_labels(ds, lab.data(), sums, wsum);
    } else {  // per-chunk partial sums, added in chunk order (thread-count independent)
      std::fill(sums.begin(), sums.end(), 0.0);
      std::fill(wsum.begin(), wsum.end(), 0.0);
      std::fill(tsums.begin(), tsums.end(), 0.0);
      std::fill(twsum.begin(), twsum.end(), 0.0);
#pragma omp parallel for if (par) schedule(static)
      for (i64 c = 0; c < nchunk_m; ++c)
        add_to_sums(ds, lab.data(), c * chunk_m, std::min(n, (c + 1) * chunk_m), &tsums[size_t(c) * k * d],
                    &twsum[size_t(c) * k]);
      for (i64 c = 0; c < nchunk_m; ++c) {
        for (size_t q = 0; q < sums.size(); ++q) sums[q] += tsums[size_t(c) * k * d + q];
        for (i64 j = 0; j < k; ++j) wsum[j] += twsum[size_t(c) * k + j];
      }
    }
    const double shift_tot = new_centers(ds, lab, C, sums.data(), wsum.data(), cnew, shift, empty, d2own, par);
    double pmax = 0, pmax2 = 0;
    i64 jmax = -1;
    for (i64 j = 0; j < k; ++j) {
      if (shift[j] > pmax) { pmax2 = pmax; pmax = shift[j]; jmax = j; }
      else if (shift[j] > pmax2) pmax2 = shift[j];
    }
    if (bounds) {
#pragma omp parallel for if (par) schedule(static)
      for (i64 i = 0; i < n; ++i) {
        u[i] += shift[lab[i]];
        l[i] -= (lab[i] == jmax ? pmax2 : pmax);
      }
    }
    C.c.swap(cnew);
    C.refresh();
    // Labels unchanged: converged.  The final E-step is skipped unless a relocation moved a
    // center in this very step (the labels would not match the returned centroids otherwise).
    if (lab == lab_old) { strict = empty.empty(); break; }
    if (shift_tot <= prep.tol_abs) break;
    lab_old = lab;
  }
  out.converged = it < max_iter;
  out.n_iter = i32(std::min(it + 1, max_iter));
  if (!strict) e_step(1);  // bounds are valid here: at least one iteration ran
  out.centroids = C.c;
  out.labels.swap(lab);
  out.algo = bounds ? Algo::Hamerly : Algo::Lloyd;
}
