// Yinyang: one lower bound per group of centers (k >= 20, D > 16).
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "yinyang.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// ------------------------------------------------------------------------------- Yinyang
// Hamerly keeps one lower bound per point, and every center's drift erodes it: with hundreds of
// centers it fails for most points.  Yinyang (Ding et al., 2015) groups the centers (k/10 groups,
// by clustering the initial centers) and keeps one lower bound per group; a point that fails the
// global test re-examines only the groups whose bound it cannot rule out.  Group bounds are
// refreshed lazily: a stored bound minus the group's drift accumulated since it was stored.
// Centroid sums are updated incrementally from the points that changed label.
template <class T>
void solve_yinyang(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<T>& init, int max_iter,
                   bool par, Run<T>& out) {
  const i64 n = ds.n, d = ds.d;
  Centers<T> C;
  C.init(k, d);
  C.c = init;
  C.refresh();
  // --- group the initial centers: a few Lloyd steps on the k centers themselves.
  i64 t = std::max<i64>(2, k / 10);
  std::vector<i32> group_of(k, 0);
  {
    std::vector<double> gc(size_t(t) * d);
    for (i64 g = 0; g < t; ++g)
      for (i64 q = 0; q < d; ++q) gc[size_t(g) * d + q] = double(C.c[size_t(g * k / t) * d + q]);
    for (int rep = 0; rep < 5; ++rep) {
      for (i64 j = 0; j < k; ++j) {
        double bd = kInf;
        for (i64 g = 0; g < t; ++g) {
          double s = 0;
          for (i64 q = 0; q < d; ++q) {
            const double u = double(C.c[size_t(j) * d + q]) - gc[size_t(g) * d + q];
            s += u * u;
          }
          if (s < bd) { bd = s; group_of[j] = i32(g); }
        }
      }
      std::vector<double> acc(size_t(t) * d, 0.0), cnt(t, 0.0);
      for (i64 j = 0; j < k; ++j) {
        cnt[group_of[j]] += 1;
        for (i64 q = 0; q < d; ++q) acc[size_t(group_of[j]) * d + q] += double(C.c[size_t(j) * d + q]);
      }
      for (i64 g = 0; g < t; ++g)
        if (cnt[g] > 0)
          for (i64 q = 0; q < d; ++q) gc[size_t(g) * d + q] = acc[size_t(g) * d + q] / cnt[g];
    }
    // Drop empty groups.
    std::vector<i32> remap(t, -1);
    i64 tt = 0;
    for (i64 j = 0; j < k; ++j)
      if (remap[group_of[j]] < 0) remap[group_of[j]] = i32(tt++);
    for (auto& g : group_of) g = remap[g];
    t = tt;
  }
  std::vector<std::vector<i32>> members(t);
  for (i64 j = 0; j < k; ++j) members[group_of[j]].push_back(i32(j));
  // Group-padded transposed centers: group g's members in lanes [off[g], off[g] + size) of each row.
  constexpr i64 L = 16;
  std::vector<i64> off(t + 1, 0);
  for (i64 g = 0; g < t; ++g) off[g + 1] = off[g] + (i64(members[g].size()) + L - 1) / L * L;
  const i64 KP = off[t];
  std::vector<T> gct(size_t(d) * KP, T(0));
  std::vector<i32> gid(KP, -1);  // center id of each padded lane
  for (i64 g = 0; g < t; ++g)
    for (size_t m = 0; m < members[g].size(); ++m) gid[off[g] + m] = members[g][m];
  auto refresh_groups = [&]() {
    for (i64 g = 0; g < t; ++g)
      for (size_t m = 0; m < members[g].size(); ++m)
        for (i64 q = 0; q < d; ++q) gct[size_t(q) * KP + off[g] + m] = C.c[size_t(members[g][m]) * d + q];
  };
  refresh_groups();

  std::vector<i32> lab(n, 0);
  std::vector<double> ub(n), glb(n), best2(n), second2(n);
  std::vector<float> lb(size_t(n) * t);
  std::vector<i32> stamp(n, 0);
  std::vector<double> sums(size_t(k) * d, 0.0), wsum(k, 0.0), delta(k, 0.0), gdelta(t, 0.0);
  std::vector<double> cum(size_t(max_iter + 1) * t, 0.0);  // cum[m][g]: drift of g over M-steps < m
  std::vector<T> cnew(size_t(k) * d);
  std::vector<double> d2own(n);
  std::vector<i32> empty;
  const int nth = ThreadCount::get(par);
  std::vector<std::vector<T>> bufs(nth);
  const i64 chunk = 256, nchunks = (n + chunk - 1) / chunk;

  // Full assignment: every distance, then per-group minima over the non-assigned centers.
  auto full_assign = [&]() {
#pragma omp parallel for if (par) schedule(dynamic, 4)
    for (i64 c = 0; c < nchunks; ++c) {
      const i64 i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      auto& buf = bufs[par ? omp_get_thread_num() : 0];
      std::vector<double> gm(t);
      for (i64 i = i0; i < i1; i += 4) {
        const i64 pb = std::min<i64>(4, i1 - i);
        distances_block(ds.x, i, pb, C, buf);
        for (i64 p = 0; p < pb; ++p) {
          const T* dist = &buf[size_t(p) * C.kp];
          const double xn = double(prep.xnorm[i + p]);
          i64 b = 0;
          for (i64 j = 1; j < k; ++j)
            if (dist[j] < dist[b]) b = j;
          std::fill(gm.begin(), gm.end(), kInf);
          for (i64 j = 0; j < k; ++j)
            if (j != b) gm[group_of[j]] = std::min(gm[group_of[j]], double(dist[j]));
          lab[i + p] = i32(b);
          ub[i + p] = std::sqrt(std::max(0.0, xn + double(dist[b])));
          double g_min = kInf;
          float* l = &lb[size_t(i + p) * t];
          for (i64 g = 0; g < t; ++g) {
            const double v = gm[g] == kInf ? kInf : std::sqrt(std::max(0.0, xn + gm[g]));
            l[g] = float_below(v);
            g_min = std::min(g_min, v);
          }
          glb[i + p] = g_min;
          stamp[i + p] = 0;
        }
      }
    }
  };
  // Filtered assignment at iteration `it` (>= 1): drifts of the last M-step are in delta/gdelta.
  LabelMoves moves(nchunks);
  auto filtered_assign = [&](int it) {
    const double* cnow = &cum[size_t(it) * t];
#pragma omp parallel for if (par) schedule(dynamic, 4)
    for (i64 c = 0; c < nchunks; ++c) {
      const i64 i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      auto& mv = moves.chunks[c];
      mv.clear();
      T dl[L];
      std::vector<double> lbv(t);
      for (i64 i = i0; i < i1; ++i) {
        if (ub[i] <= glb[i]) continue;
        const T* x = ds.x + i * d;
        i32 best = lab[i];
        double bestd = std::sqrt(sqdist(x, &C.c[size_t(best) * d], d));
        ub[i] = bestd;
        if (bestd <= glb[i]) continue;
        float* l = &lb[size_t(i) * t];
        const double* cst = &cum[size_t(stamp[i]) * t];
        // Current group bounds in one vectorized pass; only groups below the best are examined.
#pragma omp simd
        for (i64 g = 0; g < t; ++g) lbv[g] = double(l[g]) - (cnow[g] - cst[g]);
        for (i64 g = 0; g < t; ++g) {
          double lbg = lbv[g];
          if (lbg < bestd) {
            // Examine group g: exact distances to its members (except the current best).
            double m1 = kInf, m2 = kInf;
            i32 j1 = -1;
            const i64 cnt = i64(members[g].size());
            for (i64 l0 = 0; l0 < cnt; l0 += L) {
              const i64 ln = std::min(L, cnt - l0);
              for (i64 lane = 0; lane < L; ++lane) dl[lane] = T(0);
              for (i64 q = 0; q < d; ++q) {
                const T* row = &gct[size_t(q) * KP + off[g] + l0];
                const T xq = x[q];
#pragma omp simd
                for (i64 lane = 0; lane < L; ++lane) {
                  const T u = xq - row[lane];
                  dl[lane] += u * u;
                }
              }
              const i32* ids = &gid[off[g] + l0];
              for (i64 lane = 0; lane < ln; ++lane) {
                const i32 j = ids[lane];
                if (j == best) continue;
                const double v = double(dl[lane]);
                if (v < m1 || (v == m1 && j < j1)) { m2 = m1; m1 = v; j1 = j; }
                else if (v < m2) m2 = v;
              }
            }
            m1 = std::sqrt(m1);
            m2 = std::sqrt(m2);
            if (j1 >= 0 && (m1 < bestd || (m1 == bestd && j1 < best))) {
              // The old best becomes a non-assigned center of its group.
              const i32 gb = group_of[best];
              if (gb == g) lbg = std::min(m2, bestd);
              else {
                lbv[gb] = std::min(lbv[gb], bestd);
                lbg = m2;
              }
              best = j1;
              bestd = m1;
            } else {
              lbg = m1;
            }
          }
          lbv[g] = lbg;
        }
        double g_min = kInf;
#pragma omp simd reduction(min : g_min)
        for (i64 g = 0; g < t; ++g) {
          // Stored as float, rounded down so it stays a lower bound (a finite one past float's range, which
          // the data's scaling keeps it from reaching: Prepared::scale_exp).
          const double v = lbv[g] == kInf ? kInf : lbv[g] - std::abs(lbv[g]) * 0x1p-22;
          l[g] = v == kInf ? std::numeric_limits<float>::infinity()
                           : float(std::min(v, double(std::numeric_limits<float>::max())));
          g_min = std::min(g_min, v);
        }
        if (best != lab[i]) mv.emplace_back(i, lab[i]);
        lab[i] = best;
        ub[i] = bestd;
        glb[i] = g_min;
        stamp[i] = it;
      }
    }
  };

  bool strict = false;
  int it = 0;
  for (it = 0; it < max_iter; ++it) {
    if (it == 0) full_assign();
    else filtered_assign(it);
    // M-step: sums from scratch the first time, then from the points that changed label.
    const i64 changed = moves.update_sums(ds, lab.data(), it == 0, sums, wsum);
    std::vector<double> sums_m(sums), wsum_m(wsum);  // the repair edits a copy: sums track labels
    const double shift_tot = new_centers(ds, lab, C, sums_m.data(), wsum_m.data(), cnew, delta, empty, d2own, par);
    std::fill(gdelta.begin(), gdelta.end(), 0.0);
    for (i64 j = 0; j < k; ++j) gdelta[group_of[j]] = std::max(gdelta[group_of[j]], delta[j]);
    double dmax = 0;
    for (i64 g = 0; g < t; ++g) {
      cum[size_t(it + 1) * t + g] = cum[size_t(it) * t + g] + gdelta[g];
      dmax = std::max(dmax, gdelta[g]);
    }
#pragma omp parallel for if (par) schedule(static)
    for (i64 i = 0; i < n; ++i) {
      ub[i] += delta[lab[i]];
      glb[i] -= dmax;
    }
    C.c.swap(cnew);
    C.refresh();
    refresh_groups();
    if (changed == 0 && it > 0) { strict = empty.empty(); break; }
    if (shift_tot <= prep.tol_abs) break;
  }
  out.converged = it < max_iter;
  out.n_iter = i32(std::min(it + 1, max_iter));
  if (!strict) filtered_assign(std::min(it + 1, max_iter));
  out.centroids = C.c;
  out.labels.swap(lab);
  out.algo = Algo::Yinyang;
}
