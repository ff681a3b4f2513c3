// Top-m bounds: each point's nearest competitors plus one bound for the rest (k >= 20, D <= 16).
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "topm.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// --------------------------------------------------------------------------------- top-m bounds
// For low D and many centers (3x3 kernels as 9-D points, k = 256) late Lloyd iterations move every
// center a little, and Hamerly/Yinyang bounds, eroded by the largest (group) drift, fail for a
// large share of points each iteration.  Here every point lists its M nearest competitors (M = 2
// or 4, below) and keeps one lower bound for all other centers, which starts at the (M+2)-th
// nearest distance.
// Nothing is updated per point per iteration: a point's gap (its nearest competitor or far bound
// minus its own distance) is turned into a wake threshold on the accumulated drifts, and an
// E-step streams the 4-byte thresholds and examines only the points that are due (recomputing
// their own and listed distances exactly).  A due point whose listed competitors or far bound
// undercut it re-labels among them, and scans all k centers only when the far bound gives way.
// The few centers that moved most in an M-step (the movers, below) are checked against every
// point's bounds exactly instead of eroding them all.
// On resnet18's 512x512 layers 15-30% of the points are due in a late iteration and 2-5% scan.
// DC > 0: the dimension as a compile-time constant (3x3 kernels: 9), so the distance loops unroll
// and a block's 16 partial sums stay in registers.  M: the listed competitors.  Few points per
// cluster and few iterations (resnet20's layers, at most 4096 kernels at k = 256) favour a short
// list: a due point's check is cheaper, and a longer list saves few scans (M = 2 took 7-13% less
// time there than M = 4 in an interleaved A/B); the long runs of large layers (resnet18's, up to
// 262144 kernels and 300 iterations) favour M = 4 (7% faster than M = 2 over resnet18's 3x3 layers).
constexpr i64 kShortListN = 8192;  // up to this many points top-m lists M = 2 competitors, else 4
template <class T, int DC, int M>
void solve_topm(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<T>& init, int max_iter,
                bool par, Run<T>& out) {
  constexpr int L = 16;  // lt_mask16's width
  const i64 n = ds.n, d = DC > 0 ? DC : ds.d;
  if (sizeof(T) == 4) {  // the scan's float distances must not overflow: huge data goes to Yinyang
    float amax = 0.0f;
    for (i64 q = 0; q < n * d; ++q) amax = std::max(amax, std::abs(float(ds.x[q])));
    if (!(amax <= 1e18f)) {
      solve_yinyang(ds, prep, k, init, max_iter, par, out);
      return;
    }
  }
  static_assert(Centers<T>::JB == L, "the scan reads Centers::ct in blocks of L");
  Centers<T> C;  // the centers [k, d] and their transpose ct [d, kp] (k rounded up to L)
  C.init(k, d);
  C.c = init;
  C.refresh();
  const std::vector<T>& c = C.c;
  const std::vector<T>& ct = C.ct;
  const i64 kp = C.kp;
  std::vector<T> cnew(size_t(k) * d);
  // Per point: its M listed competitors and a lower bound on the distance to every other center,
  // stored plus the erosion `cf` at the time it was set (the bound now is far_abs - cf).  The
  // distances to the own center and the listed ones are recomputed exactly whenever the point is
  // examined, so they need no storage.
  // The movers (below) run in the vector copies on float 9-D data; only there is their bookkeeping kept.
  constexpr bool kUseMovers = DC == 9 && std::is_same_v<T, float> && KC_SIMD16;
  struct Bounds {
    double far_abs;
    double near_abs;  // movers: the bound the wake rests on plus cf when it was set (their test of listed ones)
    i32 cid[M];       // -1: no competitor in this slot (k <= M)
  };
  std::vector<Bounds> bd(n);
  // A point is examined only once its bounds may have stopped proving its label: each M-step
  // moves its own center j away by at most drift[j] and every other center closer by at most
  // the largest drift.  With cum[j] the sum of center j's drifts and cf the sum of the largest
  // drifts so far, a point whose nearest listed/far bound exceeded its own distance by `gap`
  // when cum[j] + cf was v stays settled while cum[j] + cf < v + gap.  `wake` holds v + gap
  // (rounded down to float: 4 bytes a point, 16 per compare), `due` the current cum[j] + cf
  // (rounded up); labels and wake are padded to whole vectors (wake with +inf).
  const i64 nw = (n + L - 1) / L * L;
  std::vector<i32> lab(nw, 0);
  std::vector<double> sums(size_t(k) * d, 0.0), wsum(k, 0.0), delta(k, 0.0), d2own(n), cum(k, 0.0);
  std::vector<float> wake(nw, std::numeric_limits<float>::infinity()), due(kp, 0.0f);
  std::vector<float> farf(kUseMovers ? nw : 0, 0.0f);  // movers: far_abs rounded up to float, for their vector test
  double cf = 0.0;
  // lo: the lower bound on every competitor's distance the wake rests on, own: the own distance.
  auto set_wake = [&](i64 i, double lo, double own) {
    wake[i] = float_below(cum[lab[i]] + cf + (lo - own));
    if constexpr (kUseMovers) bd[i].near_abs = lo + cf;
  };
  auto dist2 = [d](const T* x, const T* cj) {  // squared, in double
#if defined(__AVX512F__)
    if constexpr (DC == 9 && std::is_same_v<T, float>) {  // 8 coordinates in one vector, in double
      const __m512d u = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x)), _mm512_cvtps_pd(_mm256_loadu_ps(cj)));
      const double t = double(x[8]) - double(cj[8]);
      return _mm512_reduce_add_pd(_mm512_mul_pd(u, u)) + t * t;
    }
#elif KC_SIMD16
    // 8 coordinates in two vectors, in double.  (Summed in another order than the AVX-512 reduction:
    // a distance may differ in its last bit between the copies, a label only at such a tie.)
    if constexpr (DC == 9 && std::is_same_v<T, float>) {
      const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x)), _mm256_cvtps_pd(_mm_loadu_ps(cj)));
      const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 4)), _mm256_cvtps_pd(_mm_loadu_ps(cj + 4)));
      const __m256d s4 = _mm256_fmadd_pd(b, b, _mm256_mul_pd(a, a));
      const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
      const double t = double(x[8]) - double(cj[8]);
      return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2))) + t * t;
    }
#endif
    return sqdist(x, cj, d);
  };
  auto dist = [&](const T* x, const T* cj) { return std::sqrt(dist2(x, cj)); };
  std::vector<i32> empty;
  // The end of a scan of point i: tv/tj64 hold its M + 2 nearest (squared, ascending; index -1 where
  // fewer centers or where float distances overflowed).
  auto settle = [&](i64 i, Bounds& b, double* tv, i64* tj64) {
    const T* x = ds.x + i * d;
    if (tj64[0] < 0) {  // float distances overflowed (|x| ~ 1e20 and up): the whole scan in double
      Top8 top2(kInf);
      for (i64 j = 0; j < k; ++j) {
        const double v = dist(x, &c[size_t(j) * d]);
        top2.insert(v * v, j);
      }
      top2.get(tv, tj64);
      if (tj64[0] < 0) tj64[0] = 0;  // NaN everywhere cannot come from finite input; stay well formed
    }
    i32 tj[M + 2];
    for (int s = 0; s < M + 2; ++s) tj[s] = i32(tj64[s]);
    // The listed ones again in double (as every other distance here), re-sorted: the label is
    // decided in double precision whichever path found it.  The far bound stays the float one.
    double ev[M + 1];
    for (int s = 0; s <= M; ++s) ev[s] = tj[s] < 0 ? kInf : dist(x, &c[size_t(tj[s]) * d]);
    for (int s = 1; s <= M; ++s)
      for (int r = s; r > 0 && (ev[r] < ev[r - 1] || (ev[r] == ev[r - 1] && tj[r] < tj[r - 1])); --r) {
        std::swap(ev[r], ev[r - 1]);
        std::swap(tj[r], tj[r - 1]);
      }
    const double far = std::sqrt(tv[M + 1]);
    lab[i] = tj[0];
    for (int s = 0; s < M; ++s) b.cid[s] = tj[s + 1];
    b.far_abs = far + cf;
    if constexpr (kUseMovers) farf[i] = float_above(b.far_abs);
    set_wake(i, std::min(ev[1], far), ev[0]);
  };
  // All distances of point i (squared, in T as the scan computes them) below `thr2`: the nearest
  // becomes its label, the next M its competitors, the (M+2)-th its far bound.  A finite thr2
  // (a distance known to be reached by M + 1 centers) lets most blocks skip the selection; when
  // fewer than M + 2 centers fall below it, thr2 itself bounds the unlisted ones.  Ties go to the
  // lower center index, as in every other solver.
  auto full_scan = [&](i64 i, Bounds& b, double thr2) {  // sets b and lab[i]
    static_assert(M + 2 <= 8, "the scan keeps its top M + 2 in a Top8");
    const T* x = ds.x + i * d;
    const bool fixed = thr2 < kInf;
    T tf = T(thr2);
    auto live = [&](i64 j0) -> unsigned { return j0 + L > k ? (1u << (k - j0)) - 1u : 0xFFFFu; };  // past k: padding
#if KC_SIMD16
    // Float SIMD: the squared distances to the 16 centers of the block at j0, in registers.  (Generic, so
    // that only the float instantiation, the one that calls it, compiles its body.)
    auto dist16 = [&](auto j0) {
      F16 acc = f16_zero();
      for (i64 q = 0; q < d; ++q) {
        const F16 u = f16_set1(x[q]) - f16_load(&ct[size_t(q) * kp + j0]);
        acc = f16_fmadd(u, u, acc);
      }
      return acc;
    };
    if constexpr (std::is_same_v<T, float>) {
      // Float SIMD with a finite threshold: the distances of 4 blocks (64 centers) are stored whole,
      // their masks joined in one word, and its few set bits inserted after the 4 blocks, the
      // threshold tightened to the selection's.  (Packing each block's admitted lanes as they came,
      // permuted by a table on AVX2, cost about as much as the distances themselves and chained each
      // block's store address on the previous count: 5% of resnet18's 262,144-point layers.)
      if (fixed) {
        Top8f topf(tf);
        alignas(64) float seg[4 * L];
        for (i64 s0 = 0; s0 < kp; s0 += 4 * L) {
          const F16 th = f16_set1(tf);
          const int nb = int(std::min<i64>(4, (kp - s0) / L));
          uint64_t word = 0;
          for (int bq = 0; bq < nb; ++bq) {
            const i64 j0 = s0 + bq * L;
            const F16 acc = dist16(j0);
            f16_store(seg + bq * L, acc);
            word |= uint64_t(m16_bits(f16_lt(acc, th)) & live(j0)) << (bq * L);
          }
          for (; word; word &= word - 1) {
            const int l = __builtin_ctzll(word);
            topf.insert(seg[l], i32(s0 + l));
          }
          tf = topf.at(M + 1);
        }
        double tv[8];
        i64 tj64[8];
        topf.get(thr2, tv, tj64);
        settle(i, b, tv, tj64);
        return;
      }
    }
#endif
    Top8 top(thr2);
    // Double data and the generic copy, with a finite threshold: the centers under it are gathered
    // without branches (a handful, typically) and selected at the end, the buffer emptied into the
    // selection when full.  (A branch on whether a block admits any center mispredicted for the
    // handful that do; 3-5% of resnet18's 262,144-point layers.)
    constexpr int kCand = 64;
    T cv[kCand + L];
    i32 cx[kCand + L];
    int nc = 0;
    alignas(64) T dl[L];
    for (i64 j0 = 0; j0 < kp; j0 += L) {
      unsigned mask;
#if KC_SIMD16
      if constexpr (std::is_same_v<T, float>) {  // the 16 sums in registers (not dl) until compared
        const F16 acc = dist16(j0);
        mask = m16_bits(f16_lt(acc, f16_set1(T(top.at(M + 1))))) & live(j0);  // not fixed: that returned above
        if (mask) f16_store(dl, acc);  // dl is read only for the lanes a mask admits
      } else
#endif
      {
#pragma omp simd
        for (int lane = 0; lane < L; ++lane) dl[lane] = T(0);
        for (i64 q = 0; q < d; ++q) {
          const T* row = &ct[size_t(q) * kp + j0];
          const T xq = x[q];
#pragma omp simd
          for (int lane = 0; lane < L; ++lane) {
            const T u = xq - row[lane];
            dl[lane] += u * u;
          }
        }
        mask = lt_mask16(dl, fixed ? tf : T(top.at(M + 1))) & live(j0);
        if (fixed) nc += compress16(dl, mask, i32(j0), cv + nc, cx + nc);
      }
      if (fixed) {  // the candidates are packed: empty the buffer into the selection when full
        if (nc > kCand) {
          for (int t = 0; t < nc; ++t) top.insert(double(cv[t]), cx[t]);
          nc = 0;
          tf = T(top.at(M + 1));
        }
        continue;
      }
      while (mask) {
        const int lane = __builtin_ctz(mask);
        mask &= mask - 1;
        top.insert(double(dl[lane]), j0 + lane);
      }
    }
    for (int t = 0; t < nc; ++t) top.insert(double(cv[t]), cx[t]);
    double tv[8];
    i64 tj64[8];
    top.get(tv, tj64);
    settle(i, b, tv, tj64);
  };
  // The first E-step (no bounds yet) for float 9-D data: 16 points at once, one per lane, against
  // every center in turn, each lane keeping its M + 2 nearest (value, index) sorted in registers; a
  // center no lane admits costs one compare.  The same list as full_scan(kInf) -- centers come in
  // index order and an equal value goes after the kept one -- whose one-at-a-time insertions cost
  // several times the distances (perf on resnet20's 4096-point layers at k = 256).  Returns false
  // where it does not apply (the caller runs full_scan).
  auto first_scan16 = [&](i64 i0, i64 cnt) -> bool {
#if KC_SIMD16
    if constexpr (DC == 9 && std::is_same_v<T, float>) {
      constexpr int S = M + 2;
      alignas(64) float xs[DC][L] = {};
      for (i64 l = 0; l < cnt; ++l)
        for (int q = 0; q < DC; ++q) xs[q][l] = ds.x[(i0 + l) * DC + q];
      F16 xv[DC];
      for (int q = 0; q < DC; ++q) xv[q] = f16_load(xs[q]);
      F16 tv[S];
      I16 tj[S];
      for (int s = 0; s < S; ++s) {
        tv[s] = f16_set1(std::numeric_limits<float>::infinity());
        tj[s] = i16_set1(-1);
      }
      for (i64 j = 0; j < k; ++j) {
        const F16 dd = sqdist16_to<DC>(xv, &c[size_t(j) * DC]);
        if (!m16_any(f16_lt(dd, tv[S - 1]))) continue;
        F16 cv = dd;
        I16 cx = i16_set1(i32(j));
        for (int s = 0; s < S; ++s) {  // carry (cv, cx) moves down past the slots it undercuts
          const M16 lt = f16_lt(cv, tv[s]);
          const F16 keep = tv[s];
          const I16 keepj = tj[s];
          tv[s] = f16_blend(lt, tv[s], cv);
          tj[s] = i16_blend(lt, tj[s], cx);
          cv = f16_blend(lt, cv, keep);
          cx = i16_blend(lt, cx, keepj);
        }
      }
      alignas(64) float vals[S][L];
      alignas(64) i32 ids[S][L];
      for (int s = 0; s < S; ++s) {
        f16_store(vals[s], tv[s]);
        i16_store(ids[s], tj[s]);
      }
      for (i64 l = 0; l < cnt; ++l) {
        double v8[8];
        i64 j8[8];
        for (int s = 0; s < 8; ++s) {
          v8[s] = s < S ? double(vals[s][l]) : kInf;
          j8[s] = s < S ? i64(ids[s][l]) : -1;
        }
        settle(i0 + l, bd[i0 + l], v8, j8);
      }
      return true;
    }
#endif
    (void)i0;
    (void)cnt;
    return false;
  };
  // A point due: its own and listed distances exactly; the label stands if none of them nor the
  // far bound undercuts the own distance, else the best listed center wins unless the far bound
  // says an unlisted one may be nearer (then a full scan).
  auto examine = [&](i64 i) -> bool {  // true: it took a full scan
    Bounds& b = bd[i];
    const T* x = ds.x + i * d;
    const double far = b.far_abs - cf;
    // Squared distances first: when the own center is the nearest of the listed ones (most due points)
    // two square roots settle the point, with the wake the distances below would give (sqrt is
    // monotone); otherwise, and where distinct squares round to one distance, the distances decide.
    double ev[M + 1];
    i32 ej[M + 1];
    ej[0] = lab[i];
    ev[0] = dist2(x, &c[size_t(lab[i]) * d]);
    double qlo = kInf;
    for (int s = 0; s < M; ++s) {
      ej[s + 1] = b.cid[s];
      ev[s + 1] = b.cid[s] < 0 ? kInf : dist2(x, &c[size_t(b.cid[s]) * d]);
      qlo = std::min(qlo, ev[s + 1]);
    }
    if (ev[0] <= qlo) {
      const double e0 = std::sqrt(ev[0]), lo = std::min(far, std::sqrt(qlo));
      if (e0 <= lo) {
        set_wake(i, lo, e0);
        return false;
      }
    }
    double lo = far;
    for (int s = 0; s <= M; ++s) ev[s] = std::sqrt(ev[s]);
    double emax = ev[0];
    for (int s = 1; s <= M; ++s) {
      lo = std::min(lo, ev[s]);
      emax = std::max(emax, ev[s]);
    }
    if (ev[0] <= lo) {
      set_wake(i, lo, ev[0]);
      return false;
    }
    int bi = 0;
    for (int s = 1; s <= M; ++s)
      if (ev[s] < ev[bi] || (ev[s] == ev[bi] && ej[s] < ej[bi])) bi = s;
    if (ev[bi] <= far) {
      lab[i] = ej[bi];
      double lo2 = far;
      int s2 = 0;
      for (int s = 0; s <= M; ++s) {
        if (s == bi) continue;
        b.cid[s2++] = ej[s];
        lo2 = std::min(lo2, ev[s]);
      }
      set_wake(i, lo2, ev[bi]);
    } else {
      // M + 1 centers lie within emax: a slightly larger threshold keeps them all in the scan
      // whatever the rounding of its float arithmetic.
      full_scan(i, b, emax == kInf ? kInf : emax * emax * (1.0 + 1e-5) + 1e-30);
      return true;
    }
    return false;
  };
  // One E-step: only the points whose wake threshold the erosion has reached are examined; the
  // labels it changes are listed per chunk of 1024 (LabelMoves).
  constexpr i64 kChunk = 1024;
  LabelMoves moves((n + kChunk - 1) / kChunk);
  i64 last_due = n, last_scans = n;  // the last E-step's examined points and full scans
  double last_inc = 0.0, last_davg = 0.0;  // the last increment of cf
  auto assign = [&](bool first) {
    i64 n_due = 0, n_scan = 0;
#pragma omp parallel for if (par) schedule(dynamic, 16) reduction(+ : n_due, n_scan)
    for (i64 i0 = 0; i0 < n; i0 += kChunk) {
      const i64 i1 = std::min(n, i0 + kChunk);
      auto& mv = moves.chunks[i0 / kChunk];
      mv.clear();
      if (first) {
        for (i64 i = i0; i < i1; i += L) {
          const i64 cnt = std::min<i64>(L, i1 - i);
          if (!first_scan16(i, cnt))
            for (i64 p = i; p < i + cnt; ++p) full_scan(p, bd[p], kInf);
        }
        continue;
      }
      // The due points of the chunk first, then examined with their data prefetched a few
      // points ahead: due points are scattered, and one at a time each would wait on memory.
      i32 list[kChunk];
      int nd = 0;
      for (i64 j0 = i0; j0 < i1; j0 += L) {
        unsigned mask = due_mask16(&wake[j0], &lab[j0], due.data());
        if (j0 + L > i1) mask &= (1u << (i1 - j0)) - 1u;  // padding (wake +inf) is never due, even where due is
        while (mask) {
          list[nd++] = i32(j0 - i0 + __builtin_ctz(mask));
          mask &= mask - 1;
        }
      }
      constexpr int kAhead = 8;
      for (int p = 0; p < nd; ++p) {
        if (p + kAhead < nd) {
          const i64 q = i0 + list[p + kAhead];
          __builtin_prefetch(&bd[q]);
          __builtin_prefetch(ds.x + q * d);
          __builtin_prefetch(ds.x + q * d + d - 1);
        }
        const i64 i = i0 + list[p];
        const i32 old = lab[i];
        n_scan += examine(i);
        if (lab[i] != old) mv.emplace_back(i, old);
      }
      n_due += nd;
    }
    last_due = first ? n : n_due;
    last_scans = first ? n : n_scan;
  };

  // Movers (float 9-D data, the vector copies): late iterations move a few centers and leave the rest
  // where they were, yet the largest drift erodes every point's far bound.  So the centers that moved
  // most in an M-step (up to kMovers, how many chosen below) are kept out of cf, which grows by the
  // largest drift of the others, and checked exactly instead: each one's distance to every point (16
  // points a vector) against the point's far bound, lowered where it came closer, or, where it is one of
  // the point's listed competitors, against the bound its wake rests on (Bounds::near_abs); a point whose bound
  // gave way is made due.  The iterates are the same whatever the movers (resnet20's 3x3 kernels at
  // k = 256: a fifth of the whole call less; with 32 movers every step the due points were 65 -> 44% of
  // the point-iterations and the full scans 48 -> 20%, and the chosen counts below run as fast; resnet18's
  // large layers, whose late drifts are spread out, choose few and gain nothing measurable).
  constexpr int kMovers = kUseMovers ? 32 : 0;  // at most 32 (mover_pass keeps a mask each)
  std::vector<i32> movers;  // this M-step's
  std::vector<double> dsort;
  std::vector<float> xt_own;  // the points transposed, [DC][xld], when the seeding did not make prep.xt
  const float* xt = nullptr;
  i64 xld = 0;
  if constexpr (kUseMovers) {
    if (!prep.xt.empty()) {
      xt = prep.xt.data();
      xld = prep.xt_ld;
    } else {
      xld = nw;
      xt_own.assign(size_t(DC) * xld, 0.0f);
      for (i64 i = 0; i < n; ++i)
        for (int q = 0; q < DC; ++q) xt_own[size_t(q) * xld + i] = ds.x[i * DC + q];
      xt = xt_own.data();
    }
  }
  auto mover_pass = [&]() {
#if KC_SIMD16
    if constexpr (kUseMovers) {
      const int nm = int(movers.size());
      const float cff = float_below(cf);
#pragma omp parallel for if (par) schedule(static)
      for (i64 i0 = 0; i0 < n; i0 += L) {
        const M16 live = m16_first(n - i0);
        F16 xv[DC];
        for (int q = 0; q < DC; ++q) xv[q] = f16_loadz(live, xt + size_t(q) * xld + i0);
        // the far bound now, rounded up (relative and absolute margins cover the float arithmetic)
        const F16 fa = f16_load(&farf[i0]);
        F16 thr = f16_fmadd(fa - f16_set1(cff), f16_set1(1.0f + 1e-5f), f16_fmadd(fa, f16_set1(1e-6f), f16_zero()));
        const F16 thr2 = f16_blend(f16_lt(thr, f16_zero()), f16_fmadd(thr, thr, f16_zero()), f16_zero());
        unsigned masks[32];  // kMovers at most
        unsigned any = 0;
        const unsigned lv = m16_bits(live);
        for (int t = 0; t < nm; ++t) {
          const unsigned mk = m16_bits(f16_lt(sqdist16_to<DC>(xv, &c[size_t(movers[t]) * DC]), thr2)) & lv;
          masks[t] = mk;
          any |= mk;
        }
        for (; any; any &= any - 1) {
          const int l = __builtin_ctz(any);
          const i64 i = i0 + l;
          for (int t = 0; t < nm; ++t) {
            if (!(masks[t] >> l & 1u)) continue;
            const i32 j = movers[t];
            const double dm = dist(ds.x + i * DC, &c[size_t(j) * DC]);
            bool listed = false;
            for (int s = 0; s < M; ++s) listed |= bd[i].cid[s] == j;
            if (listed) {  // the wake assumed it no nearer than near_abs - cf
              if (dm < bd[i].near_abs - cf) wake[i] = -std::numeric_limits<float>::infinity();
            } else if (dm < bd[i].far_abs - cf) {
              bd[i].far_abs = dm + cf;
              farf[i] = float_above(bd[i].far_abs);
              wake[i] = -std::numeric_limits<float>::infinity();
            }
          }
        }
      }
    }
#endif
  };

  bool strict = false;
  int it = 0;
  for (it = 0; it < max_iter; ++it) {
    assign(it == 0);
    // M-step: sums from scratch the first time, then from the points that changed label (listing
    // them in the E-step instead of comparing all labels took 5% off resnet18's 262,144-point layers).
    const i64 changed = moves.update_sums(ds, lab.data(), it == 0, sums, wsum);
    std::vector<double> sums_m(sums), wsum_m(wsum);  // the repair edits a copy: sums track labels
    const double shift_tot = new_centers(ds, lab, C, sums_m.data(), wsum_m.data(), cnew, delta, empty, d2own, par);
    double dmax = 0.0;
    for (i64 j = 0; j < k; ++j) dmax = std::max(dmax, delta[j]);
    movers.clear();
    double davg = 0.0;  // the points' mean own-center drift
    if (kMovers > 0) {
      double dw = 0.0, ww = 0.0;
      for (i64 j = 0; j < k; ++j) {
        dw += wsum[j] * delta[j];
        ww += wsum[j];
      }
      davg = ww > 0.0 ? dw / ww : 0.0;
    }
    if (kMovers > 0 && k > 1 && dmax > 0.0) {
      // How many: an E-step's cost per point is modelled as proportional to how fast the points' gaps
      // close, the mean own-center drift plus cf's increment (the last E-step's cost, 4 cycles + 60 per
      // due point + 400 per full scan, per unit of the last closing; the first E-step scanned
      // everything), a mover's pass as 2 cycles per point (both measured on resnet18's 262,144-point
      // layers, where the movers about pay for themselves); 0, 4, 8, 16 and 32 movers are weighed on
      // this M-step's drifts.
      const int top = int(std::min<i64>(kMovers + 1, k));
      dsort.assign(delta.begin(), delta.end());
      std::partial_sort(dsort.begin(), dsort.begin() + top, dsort.end(), std::greater<double>());
      const double est = 4.0 + (60.0 * double(last_due) + 400.0 * double(last_scans)) / double(n);
      const double unit = est / std::max(last_davg + last_inc, 1e-3 * dmax);
      int r = 0;
      double best = unit * dmax;
      for (int cand : {4, 8, 16, 32}) {
        if (cand >= top) break;
        const double cost = unit * dsort[cand] + 2.0 * cand;
        if (cost < best) {
          best = cost;
          r = cand;
        }
      }
      if (r > 0) {  // the centers whose drift exceeds the (r + 1)-th largest
        const double rest = dsort[r];
        for (i64 j = 0; j < k; ++j)
          if (delta[j] > rest) movers.push_back(i32(j));
        dmax = rest;
      }
    }
    last_inc = dmax;
    last_davg = davg;
    cf += dmax;
    for (i64 j = 0; j < k; ++j) {
      cum[j] += delta[j];
      due[j] = float_above(cum[j] + cf);
    }
    C.c.swap(cnew);
    C.refresh();
    if (!movers.empty()) mover_pass();
    if (changed == 0 && it > 0) { strict = empty.empty(); break; }
    if (shift_tot <= prep.tol_abs) break;
  }
  out.converged = it < max_iter;
  out.n_iter = i32(std::min(it + 1, max_iter));
  if (!strict) assign(false);
  out.centroids = C.c;
  lab.resize(n);
  out.labels.swap(lab);
  out.algo = Algo::TopM;
}
