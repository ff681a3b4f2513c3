// Initial centers: greedy k-means++ (the generic pass, the sorted 1-D one, and the direct sweeps
// over the transposed data with their 9-D vector paths) and the random init.
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "seeding.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// ----------------------------------------------------------------------------- k-means++ init
// Greedy k-means++ exactly as scikit-learn: first center drawn by weight, then for each next
// center 2 + int(ln k) candidates drawn with probability ~ weight * D(x)^2, the one that lowers
// the potential most is kept.  `pass(c, closest, out)` writes min(D(x_i, x_c)^2, closest_i) to
// out (closest == nullptr: the plain distances) and returns sum_i w_i out_i.
template <class Pass>
void kmeanspp(i64 n, i64 k, const double* w, Rng& rng, Pass&& pass, std::vector<i64>& chosen) {
  chosen.assign(k, 0);
  std::vector<double> cum(n);
  double acc = 0;
  for (i64 i = 0; i < n; ++i) cum[i] = (acc += weight(w, i));
  chosen[0] = search_cum(cum, rng.uniform() * acc);
  std::vector<double> closest(n);
  pass(chosen[0], nullptr, closest.data());
  const i64 trials = 2 + i64(std::log(double(k)));
  std::vector<double> cd(size_t(trials) * n);
  std::vector<i64> cid(trials);
  std::vector<double> cpot(trials);
  for (i64 c = 1; c < k; ++c) {
    acc = 0;
    if (w) for (i64 i = 0; i < n; ++i) cum[i] = (acc += w[i] * closest[i]);
    else for (i64 i = 0; i < n; ++i) cum[i] = (acc += closest[i]);
    for (i64 t = 0; t < trials; ++t) cid[t] = search_cum(cum, rng.uniform() * cum.back());
    for (i64 t = 0; t < trials; ++t) cpot[t] = pass(cid[t], closest.data(), &cd[size_t(t) * n]);
    const i64 best = std::min_element(cpot.begin(), cpot.end()) - cpot.begin();
    std::copy(cd.begin() + best * n, cd.begin() + (best + 1) * n, closest.begin());
    chosen[c] = cid[best];
  }
}

// Greedy k-means++ on sorted 1-D data, in O(N log N) per pass over the data instead of O(N k).
// The same procedure as kmeanspp() -- first point by weight, then per step 2 + ln k candidates drawn by
// weight x squared distance to the nearest chosen point, the one leaving the least potential kept -- with
// three changes of bookkeeping (not of distribution):
// * the draw searches a Fenwick tree of the potentials in sorted order (kmeanspp scans a cumulative sum in
//   the caller's order): the same probabilities, another point for the same uniform number;
// * a candidate at value c improves exactly the points around it whose current distance exceeds |v - c|,
//   a contiguous run of the sorted values (left of c the improved points are those past the midpoint to
//   the nearest chosen value below, right of it likewise), found by walking out from the candidate until a
//   point does not improve: a candidate costs its run, not N;
// * the potentials left are summed by the tree; it is rebuilt from the points whenever the total has halved
//   since the last build, so its rounding stays relative to the current total (which falls like 1/k^2).
// Used where N k is large (kernel granularity of 1x1 convs asks for k = N/2 of a million values: hours as
// a scan per step).  Returns original indices, like kmeanspp().
template <class T>
void kmeanspp_1d(const Prepared<T>& prep, i64 n, i64 k, Rng& rng, std::vector<i64>& chosen) {
  const std::vector<double>& v = prep.sv;
  const std::vector<double>& w = prep.sw;
  std::vector<double> tree(size_t(n) + 1), closest(n), pot(n);
  i64 top = 1;
  while (top * 2 <= n) top *= 2;
  auto build = [&]() {
    for (i64 p = 0; p < n; ++p) tree[p + 1] = pot[p];
    for (i64 i = 1; i <= n; ++i) {
      const i64 up = i + (i & -i);
      if (up <= n) tree[up] += tree[i];
    }
  };
  auto add = [&](i64 p, double delta) {
    for (i64 i = p + 1; i <= n; i += i & -i) tree[i] += delta;
  };
  auto total = [&]() {
    double t = 0;
    for (i64 i = n; i > 0; i -= i & -i) t += tree[i];
    return t;
  };
  // The first sorted position whose prefix of potentials exceeds r (the tree's search), moved to the nearest
  // point of positive potential should rounding have landed on one without; -1 when there is none.
  auto draw = [&](double r) -> i64 {
    i64 pos = 0;
    for (i64 step = top; step > 0; step >>= 1)
      if (pos + step <= n && tree[pos + step] <= r) {
        pos += step;
        r -= tree[pos];
      }
    pos = std::min(pos, n - 1);
    if (pot[pos] > 0) return pos;
    for (i64 a = pos + 1, b = pos - 1; a < n || b >= 0; ++a, --b) {
      if (a < n && pot[a] > 0) return a;
      if (b >= 0 && pot[b] > 0) return b;
    }
    return -1;
  };
  // Sum of w (closest - d2) over the run of points a center at sorted position q improves; with `apply`,
  // also makes d2 their distance.
  auto improve = [&](i64 q, bool apply) -> double {
    const double c = v[q];
    double gain = 0;
    auto visit = [&](i64 p) -> bool {
      const double d2 = (v[p] - c) * (v[p] - c);
      if (!(d2 < closest[p])) return false;
      gain += w[p] * (closest[p] - d2);
      if (apply) {
        const double np = w[p] * d2;
        add(p, np - pot[p]);
        pot[p] = np;
        closest[p] = d2;
      }
      return true;
    };
    for (i64 p = q; p < n && visit(p); ++p) {}
    for (i64 p = q - 1; p >= 0 && visit(p); --p) {}
    return gain;
  };

  chosen.assign(k, 0);
  // The first point: by weight alone (every closest infinite), as kmeanspp draws it.
  for (i64 p = 0; p < n; ++p) pot[p] = w[p];
  build();
  i64 q0 = draw(rng.uniform() * total());
  if (q0 < 0) q0 = n - 1;  // no positive weight: cannot come from the API's checks; stay well formed
  chosen[0] = prep.order[q0];
  for (i64 p = 0; p < n; ++p) {
    closest[p] = (v[p] - v[q0]) * (v[p] - v[q0]);
    pot[p] = w[p] * closest[p];
  }
  build();
  double built = total();
  const i64 trials = 2 + i64(std::log(double(k)));
  for (i64 c = 1; c < k; ++c) {
    double tot = total();
    if (tot < 0.5 * built) {
      build();
      built = tot = total();
    }
    i64 best = -1;
    double best_gain = -1;
    for (i64 t = 0; t < trials; ++t) {
      const i64 q = tot > 0 ? draw(rng.uniform() * tot) : -1;
      if (q < 0) continue;
      const double g = improve(q, false);
      if (g > best_gain) {  // the least potential left: the largest gain, the first trial on a tie
        best_gain = g;
        best = q;
      }
    }
    if (best < 0) {  // every point sits on a chosen value (fewer distinct values than k): as kmeanspp, the last
      chosen[c] = n - 1;
      continue;
    }
    improve(best, true);
    chosen[c] = prep.order[best];
  }
}

// Above this many point-center pairs, 1-D k-means++ runs kmeanspp_1d (the scan per step is N k).
constexpr double kSeed1DFast = double(1 << 22);

// The candidate pass for one chunk of points: out = min(d2, closest), returns sum w * out.
inline double fuse_min_pot(i64 i0, i64 i1, const double* d2, const double* closest, const double* w, double* out) {
  double pot = 0;
  if (closest == nullptr) {
    for (i64 i = i0; i < i1; ++i) out[i] = d2[i - i0];
  } else {
#pragma omp simd
    for (i64 i = i0; i < i1; ++i) out[i] = std::min(d2[i - i0], closest[i]);
  }
  if (w) {
#pragma omp simd reduction(+ : pot)
    for (i64 i = i0; i < i1; ++i) pot += w[i] * out[i];
  } else {
#pragma omp simd reduction(+ : pot)
    for (i64 i = i0; i < i1; ++i) pot += out[i];
  }
  return pot;
}

// k distinct points drawn by weight without replacement (zero-weight points only if needed): each draw
// picks the first point whose running sum of the untaken weights exceeds u * their total.  A Fenwick
// tree over the weights finds that point and removes it in O(log N), so the whole init costs
// O(N + k log N) (a scan per draw was O(k N): seconds for k = 4096 on a million points).
inline void random_init(i64 n, i64 k, const double* w, Rng& rng, std::vector<i64>& chosen) {
  chosen.clear();
  std::vector<double> tree(size_t(n) + 1, 0.0);  // tree[i]: sum of the weights of (i - lowbit(i), i]
  std::vector<char> taken(n, 0);
  i64 npos = 0;
  for (i64 i = 0; i < n; ++i)
    if (weight(w, i) > 0) {
      tree[i + 1] = weight(w, i);
      ++npos;
    }
  for (i64 i = 1; i <= n; ++i) {
    const i64 up = i + (i & -i);
    if (up <= n) tree[up] += tree[i];
  }
  i64 top = 1;
  while (top * 2 <= n) top *= 2;
  auto usable = [&](i64 i) { return i >= 0 && i < n && !taken[i] && weight(w, i) > 0; };
  for (i64 c = 0; c < std::min(k, npos); ++c) {
    double tot = 0.0;
    for (i64 i = n; i > 0; i -= i & -i) tot += tree[i];
    double rem = rng.uniform() * tot;
    i64 pick = 0;  // descends to the first point whose prefix sum exceeds the draw
    for (i64 step = top; step > 0; step >>= 1)
      if (pick + step <= n && tree[pick + step] <= rem) {
        pick += step;
        rem -= tree[pick];
      }
    if (!usable(pick)) {  // rounding of the removals landed past the end or on a taken point: the nearest usable
      i64 j = std::min(pick, n - 1);
      while (j >= 0 && !usable(j)) --j;
      if (j < 0)
        for (j = pick; !usable(j); ++j) {}
      pick = j;
    }
    taken[pick] = 1;
    chosen.push_back(pick);
    const double v = weight(w, pick);
    for (i64 i = pick + 1; i <= n; i += i & -i) tree[i] -= v;
  }
  if (i64(chosen.size()) < k) {  // only zero-weight points are left: uniform among them
    std::vector<i64> left;
    for (i64 i = 0; i < n; ++i)
      if (!taken[i]) left.push_back(i);
    for (i64 t = 0; i64(chosen.size()) < k; ++t) {
      const i64 r = t + std::min<i64>(i64(left.size()) - 1 - t, i64(rng.uniform() * double(i64(left.size()) - t)));
      std::swap(left[t], left[r]);
      chosen.push_back(left[t]);
    }
  }
}

// Greedy k-means++ on [N, D] data, specialized for the direct solvers: the same draws and
// choices as kmeanspp(), but every trial of a step is evaluated in ONE sweep over the transposed
// data (each column loaded once for all trials), distances stay in the data's precision, and the
// D^2 sampling walks per-block sums instead of a serial cumulative sum.  Reductions use the
// fixed chunks of chunked_sum: the result does not depend on the thread count.
template <class T>
void kmeanspp_direct(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, Rng& rng, std::vector<i64>& chosen,
                     bool par) {
  const i64 n = ds.n, d = ds.d;
  const double* w = ds.w;
  constexpr i64 B = 256;           // points per block (sampling and the sweep)
  constexpr i64 TMAX = 16;         // trials per step: 2 + ln k <= 16 for any k < 1.2e6
  const i64 nb = (n + B - 1) / B;
  const i64 ld = prep.xt_ld;  // row stride of prep.xt
  const i64 trials = std::min<i64>(TMAX, 2 + i64(std::log(double(k))));
  const i64 cs = chunk_size(n), nc = (n + cs - 1) / cs;
  std::vector<T> closest(n);
  std::vector<double> bsum(nb), part(size_t(nc) * TMAX);
  std::vector<i64> cid(TMAX);
  chosen.assign(k, 0);

  auto sample = [&](double u) -> i64 {  // first index whose cumulative weight*closest exceeds u*total
    double total = 0;
    for (i64 b = 0; b < nb; ++b) total += bsum[b];
    double r = u * total;
    i64 b = 0;
    for (; b < nb - 1 && bsum[b] <= r; ++b) r -= bsum[b];
    const i64 i0 = b * B, i1 = std::min(n, i0 + B);
    // Whole groups of 16 are skipped on their (vectorized) sums; only the last group is walked
    // point by point.  (A serial walk of the block, a dependent add per point, cost about as much
    // as the sweep itself on small problems: 7 trials x 256 points every step.)
    constexpr i64 G = 16;
    i64 i = i0;
    for (; i + G <= i1; i += G) {
      double g = 0;
      if (w) {
#pragma omp simd reduction(+ : g)
        for (i64 l = 0; l < G; ++l) g += w[i + l] * double(closest[i + l]);
      } else {
#pragma omp simd reduction(+ : g)
        for (i64 l = 0; l < G; ++l) g += double(closest[i + l]);
      }
      if (g > r) break;
      r -= g;
    }
    double acc = 0;
    for (; i < i1; ++i) {
      acc += weight(w, i) * double(closest[i]);
      if (acc > r) return i;
    }
    return i1 - 1;
  };
  auto block_sums = [&]() {
    for (i64 b = 0; b < nb; ++b) {
      const i64 i0 = b * B, i1 = std::min(n, i0 + B);
      double s = 0;
      if (w) {
#pragma omp simd reduction(+ : s)
        for (i64 i = i0; i < i1; ++i) s += w[i] * double(closest[i]);
      } else {
#pragma omp simd reduction(+ : s)
        for (i64 i = i0; i < i1; ++i) s += double(closest[i]);
      }
      bsum[b] = s;
    }
  };
#if KC_SIMD16
  // The sweep of one block for float data of low D (3x3 kernels: 9): each trial's distances to 16
  // points are summed over the coordinates in a register (the block's columns, 16 x 256 floats at
  // most, stay in L1), instead of an accumulator row loaded and stored once per coordinate, and the
  // min with `closest` and the potential follow on the register.  Same modes and distances as the
  // sweep's generic block; the 16 potential lanes take a partial last vector by lane position (the
  // generic block adds it to lane 0) and are summed in order.
  auto sweep_block_low_d = [&](i64 i0, i64 m, i64 nt, int mode, double* pot) {
    if constexpr (std::is_same_v<T, float>) {
      float cq[TMAX][16];
      for (i64 t = 0; t < nt; ++t)
        for (i64 q = 0; q < d; ++q) cq[t][q] = ds.x[cid[t] * d + q];
      const float* xb = &prep.xt[size_t(i0)];
      float* cl = &closest[size_t(i0)];
      for (i64 t = 0; t < nt; ++t) {
        D16 lp = d16_zero();
        for (i64 i = 0; i < m; i += 16) {
          F16 sd = f16_zero();
          for (i64 q = 0; q < d; ++q) {
            const F16 u = f16_load_first(xb + size_t(q) * ld + i, m - i) - f16_set1(cq[t][q]);
            sd = f16_fmadd(u, u, sd);
          }
          if (mode == 0) {
            f16_store_first(cl + i, m - i, sd);
            continue;
          }
          sd = f16_min(sd, f16_load_first(cl + i, m - i));  // lanes past m: 0
          if (mode == 2) {
            f16_store_first(cl + i, m - i, sd);
            continue;
          }
          D16 v = d16_widen(sd);
          if (w) {
            if (m - i >= 16) {
              v = v * d16_load(w + i0 + i);
            } else {
              double wl[16] = {};
              std::copy(w + i0 + i, w + i0 + m, wl);
              v = v * d16_load(wl);
            }
          }
          lp = lp + v;
        }
        if (mode != 1) break;  // modes 0 and 2 have one trial
        pot[t] += d16_sum_lanes(lp);
      }
    }
  };
  // The trials of one step on unweighted float 3x3 kernels (D = 9, the commonest low-D problem), a
  // block of up to B points: with AVX-512 each 16-point chunk's 9 columns are loaded into registers
  // once for all trials (with AVX2 each trial reads them from L1, see there), and each trial's min(d2, closest) is summed in
  // float lanes over the block (at most B / 16 values per lane) and turned into double once per block
  // rather than once per chunk.  Profiled on resnet20's 4096-point layers at k = 256: seeding was
  // about three quarters of the whole k-means call.
  auto sweep_block_trials_d9 = [&](i64 i0, i64 m, i64 nt, double* pot) {
    if constexpr (std::is_same_v<T, float>) {
      constexpr int D9 = 9;
      float cq[TMAX][D9];
      for (i64 t = 0; t < nt; ++t)
        for (int q = 0; q < D9; ++q) cq[t][q] = ds.x[cid[t] * D9 + q];
      const float* xb = &prep.xt[size_t(i0)];
      const float* cl = &closest[size_t(i0)];
#if defined(__AVX512F__)
      F16 acc[TMAX];
      for (i64 t = 0; t < nt; ++t) acc[t] = f16_zero();
      for (i64 i = 0; i < m; i += 16) {
        const M16 mk = m16_first(m - i);
        F16 xv[D9];
        for (int q = 0; q < D9; ++q) xv[q] = f16_loadz(mk, xb + size_t(q) * ld + i);
        const F16 c = f16_loadz(mk, cl + i);  // masked-off lanes: 0, so they add 0
        for (i64 t = 0; t < nt; ++t) acc[t] = acc[t] + f16_min(sqdist16_to<D9>(xv, cq[t]), c);
      }
      for (i64 t = 0; t < nt; ++t) pot[t] += f16_sum_lanes(acc[t]);
#else
      // AVX2 has 16 vector registers: 16 points' 9 columns (18) and the trials' sums (2 per trial)
      // do not fit.  So trial by trial over runs of 32 points: the trial's 9 coordinates in
      // registers, four groups of 8 points as four independent FMA chains (their columns read from
      // L1 as they are used), and the 16 lanes' sums in two registers; the last run's points past m
      // are masked off (loaded as 0 with `closest` 0, so they add +0).  Every lane gets the same values
      // in the same order as with AVX-512 (c - x squares to the same value as x - c), so the sums are
      // identical.  (One group of 8 at a time, 2 trials a pass, left the FMAs waiting on their
      // latency: interleaved in one process, seeding a resnet20 4096-point layer at k = 256 took 8-17%
      // less time with the runs, and c_kernels on resnet20 ~10% less; same sums, bit for bit.)
      alignas(32) float acc[TMAX][16];
      for (i64 t = 0; t < nt; ++t) {
        __m256 cv[D9];
        for (int q = 0; q < D9; ++q) cv[q] = _mm256_set1_ps(cq[t][q]);
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7 and 8-15
        for (i64 i = 0; i < m; i += 32) {
          const bool full = m - i >= 32;
          __m256i mk[4];  // the live lanes of each group (a partial last run only)
          if (!full) {
            const M16 a = m16_first(m - i), b = m16_first(m - i - 16);
            mk[0] = _mm256_castps_si256(a.lo), mk[1] = _mm256_castps_si256(a.hi);
            mk[2] = _mm256_castps_si256(b.lo), mk[3] = _mm256_castps_si256(b.hi);
          }
          auto load = [&](const float* p, int g) {
            return full ? _mm256_loadu_ps(p + 8 * g) : _mm256_maskload_ps(p + 8 * g, mk[g]);
          };
          __m256 s[4];
          for (int g = 0; g < 4; ++g) s[g] = _mm256_setzero_ps();
          for (int q = 0; q < D9; ++q) {
            const float* col = xb + size_t(q) * ld + i;
            for (int g = 0; g < 4; ++g) {
              const __m256 u = _mm256_sub_ps(cv[q], load(col, g));
              s[g] = _mm256_fmadd_ps(u, u, s[g]);
            }
          }
          lo = _mm256_add_ps(lo, _mm256_min_ps(s[0], load(cl + i, 0)));
          hi = _mm256_add_ps(hi, _mm256_min_ps(s[1], load(cl + i, 1)));
          lo = _mm256_add_ps(lo, _mm256_min_ps(s[2], load(cl + i, 2)));
          hi = _mm256_add_ps(hi, _mm256_min_ps(s[3], load(cl + i, 3)));
        }
        _mm256_store_ps(acc[t], lo);
        _mm256_store_ps(acc[t] + 8, hi);
      }
      for (i64 t = 0; t < nt; ++t) pot[t] += f16_sum_lanes(f16_load(acc[t]));
#endif
    }
  };
  // Modes 0 and 2 on float 3x3 kernels (one trial: the first center, then each step's winner):
  // sweep_block_low_d with D fixed at 9, so the coordinate loop unrolls.  The same distances, so the
  // same `closest`.
  auto sweep_block_apply_d9 = [&](i64 i0, i64 m, int mode) {
    if constexpr (std::is_same_v<T, float>) {
      constexpr int D9 = 9;
      float cq[D9];
      for (int q = 0; q < D9; ++q) cq[q] = ds.x[cid[0] * D9 + q];
      const float* xb = &prep.xt[size_t(i0)];
      float* cl = &closest[size_t(i0)];
      for (i64 i = 0; i < m; i += 16) {
        F16 xv[D9];
        for (int q = 0; q < D9; ++q) xv[q] = f16_load_first(xb + size_t(q) * ld + i, m - i);
        F16 sd = sqdist16_to<D9>(xv, cq);
        if (mode == 2) sd = f16_min(sd, f16_load_first(cl + i, m - i));
        f16_store_first(cl + i, m - i, sd);
      }
    }
  };
#endif
  // One sweep: distances from the nt candidate points to every point.  mode 0: they become
  // `closest`; mode 1: part[chunk][t] = sum w * min(d2, closest) (nothing stored: writing nt
  // rows per step costs more than computing the winner's row again); mode 2 (nt = 1): closest =
  // min(d2, closest), the winner applied.
  auto sweep = [&](i64 nt, int mode) {
#pragma omp parallel for if (par) schedule(static)
    for (i64 ch = 0; ch < nc; ++ch) {
      const i64 a = ch * cs, bnd = std::min(n, a + cs);
      double pot[TMAX] = {};
      T acc[TMAX][B];
      T cq[TMAX];
      for (i64 i0 = a; i0 < bnd; i0 += B) {
        const i64 m = std::min(B, bnd - i0);
#if KC_SIMD16
        if constexpr (std::is_same_v<T, float>) {
          if (d == 9 && mode == 1 && !w) {  // 3x3 kernels: see sweep_block_trials_d9
            sweep_block_trials_d9(i0, m, nt, pot);
            continue;
          }
          if (d == 9 && mode != 1) {
            sweep_block_apply_d9(i0, m, mode);
            continue;
          }
          if (d <= 16) {  // low D: see sweep_block_low_d
            sweep_block_low_d(i0, m, nt, mode, pot);
            continue;
          }
        }
#endif
        for (i64 t = 0; t < nt; ++t)
          for (i64 i = 0; i < m; ++i) acc[t][i] = T(0);
        for (i64 q = 0; q < d; ++q) {
          const T* col = &prep.xt[size_t(q) * ld + i0];
          for (i64 t = 0; t < nt; ++t) cq[t] = ds.x[cid[t] * d + q];
          for (i64 t = 0; t < nt; ++t) {
            const T c = cq[t];
            T* at = acc[t];
#pragma omp simd
            for (i64 i = 0; i < m; ++i) {
              const T u = col[i] - c;
              at[i] += u * u;
            }
          }
        }
        if (mode == 0) {
          std::copy(acc[0], acc[0] + m, &closest[i0]);
          continue;
        }
        if (mode == 2) {
          T* cl = &closest[i0];
#pragma omp simd
          for (i64 i = 0; i < m; ++i) cl[i] = std::min(acc[0][i], cl[i]);
          continue;
        }
        for (i64 t = 0; t < nt; ++t) {
          T* out = acc[t];
          const T* cl = &closest[i0];
#pragma omp simd
          for (i64 i = 0; i < m; ++i) out[i] = std::min(out[i], cl[i]);
          // Partial sums in 16 fixed lanes (kept in registers; an omp simd reduction spills).
          double lanes[16] = {};
          i64 i = 0;
          if (w) {
            for (; i + 16 <= m; i += 16)
              for (i64 l = 0; l < 16; ++l) lanes[l] += w[i0 + i + l] * double(out[i + l]);
            for (; i < m; ++i) lanes[0] += w[i0 + i] * double(out[i]);
          } else {
            for (; i + 16 <= m; i += 16)
              for (i64 l = 0; l < 16; ++l) lanes[l] += double(out[i + l]);
            for (; i < m; ++i) lanes[0] += double(out[i]);
          }
          double p = 0;
          for (double v : lanes) p += v;
          pot[t] += p;
        }
      }
      for (i64 t = 0; t < nt; ++t) part[size_t(ch) * TMAX + t] = pot[t];
    }
  };

  double acc0 = 0;
  std::vector<double> cumw(n);
  for (i64 i = 0; i < n; ++i) cumw[i] = (acc0 += weight(w, i));
  chosen[0] = search_cum(cumw, rng.uniform() * acc0);
  cid[0] = chosen[0];
  sweep(1, 0);
  for (i64 c = 1; c < k; ++c) {
    block_sums();
    for (i64 t = 0; t < trials; ++t) cid[t] = sample(rng.uniform());
    sweep(trials, 1);
    i64 best = 0;
    double bestpot = kInf;
    for (i64 t = 0; t < trials; ++t) {
      double pt = 0;
      for (i64 ch = 0; ch < nc; ++ch) pt += part[size_t(ch) * TMAX + t];
      if (pt < bestpot) { bestpot = pt; best = t; }
    }
    chosen[c] = cid[best];
    cid[0] = cid[best];
    sweep(1, 2);
  }
}
