// D == 1: Lloyd on the sorted values, and the exact (optimal) 1-D clustering.
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "one_d.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// ------------------------------------------------------------------------------- 1-D Lloyd
// Points sorted once per dataset; with centers sorted, each cluster is an interval of the sorted
// points, found by binary search on "the right neighbour is nearer" (ties to the lower index, as
// argmin).  Sums come from prefix sums (one- and two-point clusters' directly), so an iteration costs O(k log N).
template <class T>
void solve_1d(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<double>& init, int max_iter,
              Run<T>& out) {
  const i64 n = ds.n;
  const auto& v = prep.sv;
  std::vector<double> c = init, cnew(k), S(k), W(k);
  std::vector<i64> lo(k), hi(k), lo_old(k, -1), hi_old(k, -1), ordc(k);
  auto e_step = [&]() {
    std::iota(ordc.begin(), ordc.end(), 0);
    std::sort(ordc.begin(), ordc.end(), [&](i64 a, i64 b) { return c[a] < c[b] || (c[a] == c[b] && a < b); });
    std::fill(lo.begin(), lo.end(), 0);
    std::fill(hi.begin(), hi.end(), 0);
    i64 start = 0, prev = -1;
    for (i64 m = 0; m < k; ++m) {
      const i64 a = ordc[m];
      if (prev >= 0 && c[a] == c[prev]) continue;  // duplicate value: the lower index owns it
      // Find the next distinct center.
      i64 nb = -1;
      for (i64 m2 = m + 1; m2 < k; ++m2)
        if (c[ordc[m2]] != c[a]) { nb = ordc[m2]; break; }
      i64 end = n;
      if (nb >= 0) {
        // nb (the larger center) is nearer past the midpoint.  Comparing against the midpoint
        // keeps the predicate monotone in v; squared distances of two centers an ulp apart round
        // equal far from the boundary and would break the binary search.
        const double half = 0.5 * (c[a] + c[nb]);
        i64 L = start, R = n;  // first position where nb beats a
        while (L < R) {
          const i64 mid = (L + R) / 2;
          if (v[mid] > half || (v[mid] == half && nb < a)) R = mid;
          else L = mid + 1;
        }
        end = L;
      }
      lo[a] = start;
      hi[a] = end;
      start = end;
      prev = a;
    }
    for (i64 j = 0; j < k; ++j)
      if (lo[j] == hi[j]) lo[j] = hi[j] = 0;
  };
  std::vector<i32> empty;
  std::vector<i64> moved;
  bool strict = false;
  int it = 0;
  for (it = 0; it < max_iter; ++it) {
    e_step();
    empty.clear();
    for (i64 j = 0; j < k; ++j) {
      const i64 len = hi[j] - lo[j];
      // One- and two-point clusters are summed as Lloyd sums them (w * x accumulated in double, in
      // index order: a product fused into the add does not commute), so their centers come out
      // bit-equal to Lloyd's.  A difference of prefix sums carries the prefix's rounding (1e-13 off out
      // to +-500): enough for a two-point cluster's members, equally far from its center in exact
      // arithmetic, to order differently in the empty-cluster repair.
      // (Both sums are formed and one is selected: a branch on the length mispredicts at k near N.)
      const i64 p0 = lo[j], p1 = std::min(p0 + 1, n - 1);
      const bool two = len == 2, flip = two && prep.order[p1] < prep.order[p0];
      const i64 a = flip ? p1 : p0, b = flip ? p0 : p1;
      const double wa = len >= 1 ? prep.sw[a] : 0.0, wb = two ? prep.sw[b] : 0.0;
      double w = 0, s = 0;
      w += wa;
      s += wa * v[a];
      w += wb;
      s += wb * v[b];  // + 0 * v[b] = + 0 for one point: exact
      const double wp = prep.pw[hi[j]] - prep.pw[lo[j]], sp = prep.pwx[hi[j]] - prep.pwx[lo[j]];
      W[j] = len <= 2 ? w : wp;
      S[j] = len <= 2 ? s : sp;
      if (W[j] <= 0) empty.push_back(i32(j));
    }
    if (!empty.empty()) {
      // Rare: materialize sorted-position labels and distances for the repair.
      std::vector<i32> lab(n);
      std::vector<double> d2(n);
      for (i64 j = 0; j < k; ++j)
        for (i64 p = lo[j]; p < hi[j]; ++p) lab[p] = i32(j);
      for (i64 p = 0; p < n; ++p) d2[p] = (v[p] - c[lab[p]]) * (v[p] - c[lab[p]]);
      relocate(n, k, i64(1), v.data(), prep.sw.data(), lab.data(), d2.data(), empty, S.data(), W.data(), moved,
               prep.order.data());
    }
    double shift_tot = 0;
    for (i64 j = 0; j < k; ++j) {
      cnew[j] = W[j] > 0 ? S[j] / W[j] : c[j];
      shift_tot += (cnew[j] - c[j]) * (cnew[j] - c[j]);
    }
    c.swap(cnew);
    if (lo == lo_old && hi == hi_old) { strict = empty.empty(); break; }
    if (shift_tot <= prep.tol_abs) break;
    lo_old = lo;
    hi_old = hi;
  }
  out.converged = it < max_iter;
  out.n_iter = i32(std::min(it + 1, max_iter));
  if (!strict) e_step();
  out.centroids.resize(k);
  for (i64 j = 0; j < k; ++j) out.centroids[j] = T(c[j]);
  out.labels.assign(n, 0);
  for (i64 j = 0; j < k; ++j)
    for (i64 p = lo[j]; p < hi[j]; ++p) out.labels[prep.order[p]] = i32(j);
  out.algo = Algo::Lloyd1D;
}

// ------------------------------------------------------------------------------- exact 1-D
// Optimal k-means in 1-D: clusters are intervals of the sorted points; dp[m][i] = best cost of
// the first i points in m clusters, with the optimal split monotone in i (divide and conquer, or
// Knuth's bounds where k is large for n: see exact1d_table).
//
// The split table of the exact 1-D DP for every number of clusters up to kmax: row m - 1 holds, for each
// prefix length i, where the optimal m-clustering of the first i sorted points starts its last interval.
// Level m depends only on level m - 1, never on kmax, so one table serves every k <= kmax, each with its
// optimum (the splits of a table built for k alone, unless two splits cost exactly the same): a k sweep of
// one dataset (the element plans' elbow and inertia sweeps: 20 k per coordinate) costs one DP instead of
// one per k.
struct Exact1DTable {
  i64 kmax = 0;
  std::vector<i32> split;
};

// Double-double numbers (a value as an unevaluated sum hi + lo, about 106 bits): the interval costs of data
// whose double sums cannot resolve them (below).  Error-free sums and products; no fast-math here.
struct DD {
  double hi = 0.0, lo = 0.0;
};
inline DD dd_fast_sum(double a, double b) {  // |a| >= |b|
  const double s = a + b;
  return {s, b - (s - a)};
}
inline DD dd_sum(double a, double b) {
  const double s = a + b, bb = s - a;
  return {s, (a - (s - bb)) + (b - bb)};
}
inline DD dd_add(DD a, DD b) {
  DD s = dd_sum(a.hi, b.hi);
  const DD t = dd_sum(a.lo, b.lo);
  s = dd_fast_sum(s.hi, s.lo + t.hi);
  return dd_fast_sum(s.hi, s.lo + t.lo);
}
inline DD dd_neg(DD a) { return {-a.hi, -a.lo}; }
inline DD dd_mul(DD a, DD b) {
  const double p = a.hi * b.hi;
  return dd_fast_sum(p, std::fma(a.hi, b.hi, -p) + (a.hi * b.lo + a.lo * b.hi));
}
inline DD dd_div(DD a, DD b) {  // two Newton-like correction steps: about 100 bits
  const double q1 = a.hi / b.hi;
  DD r = dd_add(a, dd_neg(dd_mul(b, {q1, 0.0})));
  const double q2 = r.hi / b.hi;
  r = dd_add(r, dd_neg(dd_mul(b, {q2, 0.0})));
  return dd_add(dd_fast_sum(q1, q2), {r.hi / b.hi, 0.0});
}

// The DP over the split table, for any interval cost cost(a, b) of the sorted points [a, b).
template <class Cost>
void exact1d_dp(i64 n, i64 k, const Cost& cost, Exact1DTable& tb, bool only_k) {
  std::vector<double> prev(n + 1, kInf), cur(n + 1, kInf);
  tb.kmax = k;
  tb.split.assign(size_t(k) * (n + 1), 0);
  std::vector<i32>& split = tb.split;
  for (i64 i = 1; i <= n; ++i) prev[i] = cost(0, i);
  // Many clusters for the points (2 k log2 n > n: k = n/2 for the element plans) take Knuth's bounds,
  // split(m - 1, i) <= split(m, i) <= split(m, i + 1), which leave about n / k candidates per prefix:
  // O(n^2) for the whole table against the O(k n log n) of divide and conquer (the same optimum, ties
  // aside).  A table for k alone (`only_k`) fills at level m the prefixes that leave a point for each of
  // the k - m clusters after it, i <= n - (k - m), and no more.  4000 problems of n = 512 at k = 256:
  // 5.2 s -> 3.1 s with Knuth's bounds, 1.6 s with the prefixes and the reciprocals too.
  const bool knuth = 2.0 * double(k) * std::log2(double(std::max<i64>(n, 2))) > double(n);
  for (i64 m = 2; m <= k; ++m) {
    std::fill(cur.begin(), cur.end(), kInf);
    i32* sp = &split[size_t(m - 1) * (n + 1)];
    const i64 imax = only_k ? n - (k - m) : n;  // the last prefix level m fills
    if (knuth) {
      // split(m - 1, i) bounds from below where level m - 1 was filled; past it, its last value does
      // (splits grow with i)
      const i32* sq = &split[size_t(m - 2) * (n + 1)];
      const i64 iprev = only_k ? imax - 1 : n;
      for (i64 i = imax; i >= m; --i) {
        const i64 hi = i == imax ? i - 1 : std::min<i64>(i - 1, sp[i + 1]);
        const i64 lo = std::min<i64>(hi, std::max<i64>(m - 1, sq[std::min(i, iprev)]));
        double bestv = kInf;
        i64 bestj = lo;
        for (i64 j = lo; j <= hi; ++j) {
          const double val = prev[j] + cost(j, i);
          if (val < bestv) { bestv = val; bestj = j; }
        }
        cur[i] = bestv;
        sp[i] = i32(bestj);
      }
      prev.swap(cur);
      continue;
    }
    // cur[i] = min_{j in [m-1, i-1]} prev[j] + cost(j, i), for i in [m, imax].
    struct Frame { i64 lo, hi, olo, ohi; };
    std::vector<Frame> stack{{m, imax, m - 1, imax - 1}};
    while (!stack.empty()) {
      const Frame f = stack.back();
      stack.pop_back();
      if (f.lo > f.hi) continue;
      const i64 mid = (f.lo + f.hi) / 2;
      double bestv = kInf;
      i64 bestj = f.olo;
      for (i64 j = f.olo; j <= std::min(mid - 1, f.ohi); ++j) {
        const double val = prev[j] + cost(j, mid);
        if (val < bestv) { bestv = val; bestj = j; }
      }
      cur[mid] = bestv;
      sp[mid] = i32(bestj);
      stack.push_back({f.lo, mid - 1, f.olo, bestj});
      stack.push_back({mid + 1, f.hi, bestj, f.ohi});
    }
    prev.swap(cur);
  }
}


template <class T>
void exact1d_table(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, Exact1DTable& tb, bool only_k = false,
                   bool precise = false) {
  const i64 n = ds.n;
  const auto& v = prep.sv;
  const auto& sw = prep.sw;
  double mean = prep.pwx[n] / std::max(prep.pw[n], 1e-300);
  if (!(prep.pw[n] > 0)) mean = 0;
  if (precise) {  // every sum in double-double: an interval's cost keeps ~1e-32 of the data's spread, not ~1e-16
    std::vector<DD> P1(n + 1), P2(n + 1), PW(n + 1);
    for (i64 i = 0; i < n; ++i) {
      const DD t = dd_sum(v[i], -mean), wt = dd_mul(t, {sw[i], 0.0});
      P1[i + 1] = dd_add(P1[i], wt);
      P2[i + 1] = dd_add(P2[i], dd_mul(wt, t));
      PW[i + 1] = dd_add(PW[i], {sw[i], 0.0});
    }
    auto cost = [&](i64 a, i64 b) {  // [a, b)
      const DD W = dd_add(PW[b], dd_neg(PW[a]));
      if (!(W.hi > 0)) return 0.0;
      const DD s = dd_add(P1[b], dd_neg(P1[a]));
      const DD c = dd_add(dd_add(P2[b], dd_neg(P2[a])), dd_neg(dd_div(dd_mul(s, s), W)));
      return std::max(0.0, c.hi + c.lo);
    };
    exact1d_dp(n, k, cost, tb, only_k);
    return;
  }
  std::vector<double> P1(n + 1, 0.0), P2(n + 1, 0.0);
  for (i64 i = 0; i < n; ++i) {
    const double t = v[i] - mean;
    P1[i + 1] = P1[i] + sw[i] * t;
    P2[i + 1] = P2[i] + sw[i] * t * t;
  }
  const auto& PW = prep.pw;
  // Unweighted points: an interval's weight is its length, and a table of reciprocals replaces the
  // division (the inner loops wait on it: 1.2x faster at n = 512, k = 256).
  std::vector<double> inv(ds.w == nullptr ? n + 1 : 0);
  for (i64 c = 1; c < i64(inv.size()); ++c) inv[c] = 1.0 / double(c);
  const double* rcp = ds.w == nullptr ? inv.data() : nullptr;
  auto cost = [&](i64 a, i64 b) {  // [a, b)
    const double s = P1[b] - P1[a];
    if (rcp) return std::max(0.0, (P2[b] - P2[a]) - s * s * rcp[b - a]);
    const double W = PW[b] - PW[a];
    if (W <= 0) return 0.0;
    return std::max(0.0, (P2[b] - P2[a]) - s * s / W);
  };
  exact1d_dp(n, k, cost, tb, only_k);
}

// The optimal k-clustering of 1-D data (dynamic programming over the sorted values), from `shared` when it
// was built for at least k clusters, else from a table of its own.
template <class T>
void solve_exact1d(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, Run<T>& out,
                   const Exact1DTable* shared = nullptr) {
  const i64 n = ds.n;
  const auto& v = prep.sv;
  const auto& PW = prep.pw;
  Exact1DTable own;
  if (shared == nullptr || shared->kmax < k) {
    exact1d_table(ds, prep, k, own, true);
    shared = &own;
  }
  std::vector<i64> bound(k + 1);
  auto backtrack = [&](const Exact1DTable& tb) {  // the interval ends
    bound[k] = n;
    for (i64 m = k; m >= 2; --m) bound[m - 1] = tb.split[size_t(m - 1) * (n + 1) + bound[m]];
    bound[0] = 0;
  };
  backtrack(*shared);
  // The weighted mean of the sorted points [a, b) and their summed squares about it, from their offsets to
  // v[a] (no cancellation against the data's distance from 0 or from other intervals); W: their weight.
  const auto& sw = prep.sw;
  auto interval = [&](i64 a, i64 b, double& mean, double& W) {
    double s1 = 0.0, w = 0.0;
    for (i64 p = a; p < b; ++p) {
      s1 += sw[p] * (v[p] - v[a]);
      w += sw[p];
    }
    W = w;
    mean = w > 0 ? v[a] + s1 / w : v[a];
    double ss = 0.0;
    for (i64 p = a; p < b; ++p) ss += sw[p] * (v[p] - mean) * (v[p] - mean);
    return ss;
  };
  // The double table's interval costs come from prefix sums about the data's mean: each is exact to about
  // 6 eps S (S: the summed squares about that mean), so its k intervals may miss the optimum by up to
  // 12 k eps S.  Clusters far narrower than the data's range make that bound large against the inertia
  // (values near +-1e6 in clusters 1e-3 wide chose wrong intervals, 3x the optimum).  The table is built
  // again in double-double, whose costs hold ~1e-32 of S, where the bound exceeds a millionth of the
  // partition's own inertia and either the partition is not a Lloyd fixed point (an optimum is: each point
  // of positive weight as near its interval's mean as a neighbour's) or the bound exceeds a thousandth.
  // (Fixed points within that thousandth are kept: the bound adds up k worst cases, and a double-double
  // table costs about 12x a double one, which 2048 normal values at k = 1024 would pay for nothing.)
  bool precise = false;
  {
    double m_all, w_all, inertia = 0.0, W;
    const double S = interval(0, n, m_all, w_all);
    std::vector<double> mu(k);
    std::vector<char> has(k);
    for (i64 m = 0; m < k; ++m) {
      inertia += interval(bound[m], bound[m + 1], mu[m], W);
      has[m] = W > 0;
    }
    const double err = 12.0 * double(k) * std::numeric_limits<double>::epsilon() * S;
    bool fixed = true;
    for (i64 m = 0; m < k && fixed; ++m) {
      if (!has[m]) continue;
      for (i64 p = bound[m]; p < bound[m + 1] && fixed; ++p) {
        if (!(sw[p] > 0)) continue;
        const double own = std::abs(v[p] - mu[m]);
        if (m > 0 && has[m - 1] && std::abs(v[p] - mu[m - 1]) < own) fixed = false;
        if (m + 1 < k && has[m + 1] && std::abs(v[p] - mu[m + 1]) < own) fixed = false;
      }
    }
    if (inertia > 0 && err > 1e-6 * inertia && (!fixed || err > 1e-3 * inertia)) {
      exact1d_table(ds, prep, k, own, true, true);
      backtrack(own);
      precise = true;
    }
  }
  out.centroids.resize(k);
  out.labels.assign(n, 0);
  for (i64 m = 0; m < k; ++m) {
    const i64 a = bound[m], b = bound[m + 1];
    double c = 0.0, W = PW[b] - PW[a];
    if (precise) interval(a, b, c, W);  // the mean without the prefix sums' cancellation either
    else if (W > 0) c = (prep.pwx[b] - prep.pwx[a]) / W;
    if (!(W > 0)) {  // weightless points: their plain mean
      c = 0;
      for (i64 p = a; p < b; ++p) c += v[p];
      c /= double(std::max<i64>(1, b - a));
    }
    // Interval means of sorted data never decrease; rounding can make two means of equal values
    // differ by an ulp in the wrong order; the binary search below needs them sorted.
    out.centroids[m] = m > 0 ? std::max(T(c), out.centroids[m - 1]) : T(c);
  }
  // Labels: the nearest centroid (ties to the lower index).  For points of positive weight this is
  // their optimal interval; a weightless point may sit in any interval at no cost, so it is
  // labelled by distance instead.
  std::vector<double> cs(k);
  for (i64 m = 0; m < k; ++m) cs[m] = double(out.centroids[m]);
  for (i64 p = 0; p < n; ++p) {  // cs is sorted: the nearest is next to v's insertion point
    const i64 j = std::lower_bound(cs.begin(), cs.end(), v[p]) - cs.begin();
    i64 m = j < k ? j : k - 1;
    if (j > 0 && (j == k || std::abs(v[p] - cs[j - 1]) <= std::abs(v[p] - cs[j]))) m = j - 1;
    m = std::lower_bound(cs.begin(), cs.end(), cs[m]) - cs.begin();  // first of a run of equal centroids
    out.labels[prep.order[p]] = i32(m);
  }
  out.n_iter = 0;
  out.converged = true;
  out.algo = Algo::Exact1D;
}
