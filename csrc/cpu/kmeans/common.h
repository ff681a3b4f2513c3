// Shared by the solvers: the random stream, small numeric helpers, per-dataset state (Prepared),
// center storage, empty-cluster relocation, and the M-step (sums, new centers, label moves).
// A part of solver.cpp: included there inside the per-instruction-set anonymous namespace (after simd16.h
// and the parts listed before it), so every ISA copy compiles its own definitions.
#pragma once
#ifndef KC_ARCH
#error "common.h is part of solver.cpp, included inside its per-instruction-set namespace"
#endif

// ------------------------------------------------------------------------------------ random
// splitmix64 seeds a xoshiro256** stream; each (seed, run) pair has its own stream, the same for
// every problem of a batch, so a problem gets the same start in a batch as alone.
inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Rng {
  uint64_t s[4];
  Rng(uint64_t seed, uint64_t stream) {
    uint64_t x = seed ^ (0x6A09E667F3BCC909ull * (stream + 1));
    for (auto& v : s) v = splitmix(x);
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return r;
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

// ------------------------------------------------------------------------------ small helpers
template <class T>
inline double sqdist(const T* a, const T* b, i64 d) {
  double s = 0.0;
  for (i64 j = 0; j < d; ++j) {
    const double t = double(a[j]) - double(b[j]);
    s += t * t;
  }
  return s;
}

inline double weight(const double* w, i64 i) { return w ? w[i] : 1.0; }

// Bit l set where v[l] < th, for 16 values.  (Float scans with AVX2 or AVX-512 compare their
// registers directly: full_scan's F16 path.)
template <class T>
inline unsigned lt_mask16_scalar(const T* v, T th) {
  unsigned m = 0;
  for (int l = 0; l < 16; ++l) m |= unsigned(v[l] < th) << l;
  return m;
}
inline unsigned lt_mask16(const float* v, float th) { return lt_mask16_scalar(v, th); }
inline unsigned lt_mask16(const double* v, double th) {
#if defined(__AVX512F__)
  const __m512d t = _mm512_set1_pd(th);
  return unsigned(_mm512_cmp_pd_mask(_mm512_loadu_pd(v), t, _CMP_LT_OQ)) |
         (unsigned(_mm512_cmp_pd_mask(_mm512_loadu_pd(v + 8), t, _CMP_LT_OQ)) << 8);
#elif KC_SIMD16
  const __m256d t = _mm256_set1_pd(th);
  unsigned m = 0;
  for (int h = 0; h < 4; ++h) m |= unsigned(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(v + 4 * h), t, _CMP_LT_OQ))) << (4 * h);
  return m;
#else
  return lt_mask16_scalar(v, th);
#endif
}

// The 8 smallest (value, index) pairs inserted so far, ascending; a value equal to a kept one goes
// after it (ties keep the earlier insertion).  With AVX-512 one insertion is a compare, two lane
// shifts and four blends on registers, without the unpredictable branches of an insertion sort.
struct Top8 {
#if defined(__AVX512F__)
  __m512d v;
  __m512i j;
  explicit Top8(double init) : v(_mm512_set1_pd(init)), j(_mm512_set1_epi64(-1)) {}
  double at(int s) const { return _mm512_cvtsd_f64(_mm512_permutexvar_pd(_mm512_set1_epi64(s), v)); }
  void insert(double x, i64 id) {
    const __m512d xb = _mm512_set1_pd(x);
    const unsigned m = _mm512_cmp_pd_mask(xb, v, _CMP_LT_OQ);  // the lanes from x's place on
    if (!m) return;
    const __m512i up = _mm512_set_epi64(6, 5, 4, 3, 2, 1, 0, 0);  // lane s <- lane s - 1
    v = _mm512_mask_blend_pd(__mmask8(m), v, _mm512_permutexvar_pd(up, v));
    j = _mm512_mask_blend_epi64(__mmask8(m), j, _mm512_permutexvar_epi64(up, j));
    const __mmask8 at_x = __mmask8(m & (0u - m));  // the first of them
    v = _mm512_mask_blend_pd(at_x, v, xb);
    j = _mm512_mask_blend_epi64(at_x, j, _mm512_set1_epi64(id));
  }
  void get(double* vals, i64* ids) const {
    _mm512_storeu_pd(vals, v);
    _mm512_storeu_si512(reinterpret_cast<void*>(ids), j);
  }
#else
  double v[8];
  i64 j[8];
  explicit Top8(double init) {
    for (int s = 0; s < 8; ++s) { v[s] = init; j[s] = -1; }
  }
  double at(int s) const { return v[s]; }
  void insert(double x, i64 id) {
    if (!(x < v[7])) return;
    int s = 7;
    while (s > 0 && x < v[s - 1]) { v[s] = v[s - 1]; j[s] = j[s - 1]; --s; }
    v[s] = x;
    j[s] = id;
  }
  void get(double* vals, i64* ids) const {
    std::copy(v, v + 8, vals);
    std::copy(j, j + 8, ids);
  }
#endif
};

#if KC_SIMD16
// Top8 for float values and int indices in one AVX2 register each (both SIMD copies have AVX2): an
// insertion is a compare, two lane shifts and four blends, with no branch.  Same order and ties as
// Top8.  (The scalar Top8's insertion loop, of unpredictable length, cost more than the distances in
// the top-m scans of resnet18's 262,144-point layers.)
struct Top8f {
  __m256 v;
  __m256i j;
  explicit Top8f(float init) : v(_mm256_set1_ps(init)), j(_mm256_set1_epi32(-1)) {}
  float at(int s) const { return _mm256_cvtss_f32(_mm256_permutevar8x32_ps(v, _mm256_set1_epi32(s))); }
  void insert(float x, i32 id) {
    const __m256i up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);  // lane s <- lane s - 1
    const __m256 first = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, -1, -1, -1, -1, -1, -1));
    const __m256 xb = _mm256_set1_ps(x);
    const __m256 m = _mm256_cmp_ps(xb, v, _CMP_LT_OQ);  // the lanes from x's place on
    const __m256 at_x = _mm256_andnot_ps(_mm256_and_ps(_mm256_permutevar8x32_ps(m, up), first), m);
    v = _mm256_blendv_ps(_mm256_blendv_ps(v, _mm256_permutevar8x32_ps(v, up), m), xb, at_x);
    const __m256 js = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(j, up));
    j = _mm256_castps_si256(_mm256_blendv_ps(_mm256_blendv_ps(_mm256_castsi256_ps(j), js, m),
                                             _mm256_castsi256_ps(_mm256_set1_epi32(id)), at_x));
  }
  // As Top8::get, a slot never filled reading `init` (the double the selection started from).
  void get(double init, double* vals, i64* ids) const {
    alignas(32) float fv[8];
    alignas(32) i32 fj[8];
    _mm256_store_ps(fv, v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(fj), j);
    for (int s = 0; s < 8; ++s) {
      ids[s] = fj[s];
      vals[s] = fj[s] < 0 ? init : double(fv[s]);
    }
  }
};
#endif

// The 16 values v[0..16) set in `mask` and their indices base + lane, packed to the front of ov/oj
// (each must have room for 16); returns how many.
template <class T>
inline int compress16(const T* v, unsigned mask, i32 base, T* ov, i32* oj) {
  int n = 0;
  for (; mask; mask &= mask - 1) {
    const int l = __builtin_ctz(mask);
    ov[n] = v[l];
    oj[n++] = base + l;
  }
  return n;
}

// v rounded to a float no greater (below) / no smaller (above) than v: a stored lower / upper bound.
// (The step to the neighbouring float is taken on the bits, as std::nextafter takes it: that is a libm
// call, and the top-m solver rounds a bound for every point it examines.)
inline float float_step(float f, bool down) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f == 0.0f) u = down ? 0x80000001u : 0x00000001u;  // the smallest subnormal of the needed sign
  else u = (f > 0.0f) == down ? u - 1 : u + 1;            // toward zero / away from zero
  std::memcpy(&f, &u, 4);
  return f;
}
inline float float_below(double v) {
  const float f = float(v);
  return double(f) > v ? float_step(f, true) : f;
}
inline float float_above(double v) {
  const float f = float(v);
  return double(f) < v ? float_step(f, false) : f;
}

// Bit l set where wake[l] <= due[lab[l]], for 16 points (one AVX-512 or two AVX2 gathers per 16).
inline unsigned due_mask16(const float* wake, const i32* lab, const float* due) {
#if KC_SIMD16
  return m16_bits(f16_le(f16_load(wake), f16_gather(due, lab)));
#else
  unsigned m = 0;
  for (int l = 0; l < 16; ++l) m |= unsigned(wake[l] <= due[lab[l]]) << l;
  return m;
#endif
}

// First index whose cumulative weight exceeds r (never a zero-weight point while r < total).
inline i64 search_cum(const std::vector<double>& cum, double r) {
  i64 idx = std::upper_bound(cum.begin(), cum.end(), r) - cum.begin();
  return std::min<i64>(idx, i64(cum.size()) - 1);
}

struct ThreadCount {
  static int get(bool par) { return par ? omp_get_max_threads() : 1; }
};

// Reductions over points go through fixed chunks whose size depends on N alone, summed in chunk
// order: results are bitwise the same whatever the thread count, so a problem solved alone (all
// threads) equals the same problem solved inside a batch (one thread).
inline i64 chunk_size(i64 n) { return std::max<i64>(4096, (n + 15) / 16); }

template <class F>
double chunked_sum(i64 n, bool par, F&& f) {
  const i64 cs = chunk_size(n), nc = (n + cs - 1) / cs;
  if (nc <= 1) return f(i64(0), n);
  std::vector<double> part(nc);
#pragma omp parallel for if (par) schedule(static)
  for (i64 c = 0; c < nc; ++c) part[c] = f(c * cs, std::min(n, (c + 1) * cs));
  double s = 0;
  for (double v : part) s += v;
  return s;
}

// ------------------------------------------------------------------------- per-dataset state
template <class T>
struct Prepared {
  double tol_abs = 0.0;
  // Data that sits farther from the origin than its spread (|mean|^2 > the summed per-feature variances)
  // is clustered centered, as scikit-learn always does: the solvers' float distances and centroids keep
  // their precision where an offset would eat it (points a few ulps apart around 1e4 never converged).
  // `shift` is the mean taken off (empty: not centered), `xc` the centered copy; `data` is what the
  // solvers see: the dataset or that copy.  Given starts lose the shift, results get it back.
  std::vector<double> shift;
  std::vector<T> xc;
  // Data whose spread is so small that squared distances near it reach the dtype's smallest normal numbers
  // (float32 values of 1e-20 and below: their squares underflow, and every point read as one cluster) is
  // clustered multiplied by 2^scale_exp, which brings its largest |value| into [0.5, 1).  A power of two
  // scales every sum, product and comparison of the solvers exactly: the iterates are those of the data at
  // its own scale with an unbounded exponent; centroids and inertia are scaled back.  Float64 data beyond
  // 2^64 in magnitude is scaled the same way (exact but for values some 2^-960 below the largest, which go
  // subnormal, at distances far below the data's rounding): the top-m and Yinyang solvers keep their bounds in float32,
  // which holds distances up to about 3.4e38 (past it top-m examined its padding points, out of bounds, and
  // Yinyang's group bounds read +inf, a lower bound too high, so labels were not the nearest).
  int scale_exp = 0;
  Dataset<T> data;
  std::vector<T> xt;         // [d, xt_ld] transposed copy (direct k-means++), when needed
  i64 xt_ld = 0;
  std::vector<T> xnorm;      // [n] squared norms (direct solvers)
  std::vector<double> gram;  // [n, n] (gram solver)
  // 1-D: values sorted ascending, their weights and original positions, prefix sums.
  std::vector<double> sv, sw, pw, pwx;
  std::vector<i64> order;
  bool has_direct = false, has_gram = false, has_sorted = false;
};

// The per-feature mean of the points (unweighted, as scikit-learn's tolerance and centering) and the sum of
// the per-feature variances.
template <class T>
double feature_moments(const Dataset<T>& ds, std::vector<double>& mean) {
  const i64 n = ds.n, d = ds.d;
  std::vector<double> var(d, 0.0);
  mean.assign(d, 0.0);
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < d; ++j) mean[j] += double(ds.x[i * d + j]);
  for (auto& m : mean) m /= double(n);
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < d; ++j) {
      const double t = double(ds.x[i * d + j]) - mean[j];
      var[j] += t * t;
    }
  double s = 0.0;
  for (auto v : var) s += v / double(n);
  return s;
}

// G = X X^T in double, from dot products accumulated in T over cache-sized chunks of D.
template <class T>
void compute_gram(const Dataset<T>& ds, std::vector<double>& G, bool par) {
  const i64 n = ds.n, d = ds.d;
  G.assign(size_t(n) * n, 0.0);
  constexpr i64 PB = 4, JB = 16, DB = 256;
  const i64 np = (n + JB - 1) / JB * JB;
  std::vector<T> xt(size_t(d) * np, T(0));
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < d; ++j) xt[size_t(j) * np + i] = ds.x[i * d + j];
  const i64 nblocks = (n + PB - 1) / PB;
#pragma omp parallel for if (par) schedule(dynamic, 1)
  for (i64 b = 0; b < nblocks; ++b) {
    const i64 i0 = b * PB, pb = std::min(PB, n - i0);
    // Only tiles on or above the diagonal: the lower triangle is mirrored afterwards.
    for (i64 j0 = (i0 / JB) * JB; j0 < n; j0 += JB) {
      for (i64 d0 = 0; d0 < d; d0 += DB) {
        const i64 d1 = std::min(d, d0 + DB);
        T acc[PB][JB] = {};
        for (i64 dd = d0; dd < d1; ++dd) {
          const T* col = &xt[size_t(dd) * np + j0];
          for (i64 p = 0; p < PB; ++p) {
            const T xv = p < pb ? ds.x[(i0 + p) * d + dd] : T(0);
#pragma omp simd
            for (i64 jj = 0; jj < JB; ++jj) acc[p][jj] += xv * col[jj];
          }
        }
        for (i64 p = 0; p < pb; ++p)
          for (i64 jj = 0; jj < JB && j0 + jj < n; ++jj) G[size_t(i0 + p) * n + j0 + jj] += double(acc[p][jj]);
      }
    }
  }
  // Row block b computed columns from the start of the JB-tile holding its first row on; the
  // rest of the row is the mirror of entries computed for earlier rows.
  for (i64 i = 0; i < n; ++i) {
    const i64 jlim = ((i / PB) * PB / JB) * JB;
    for (i64 j = 0; j < jlim; ++j) G[size_t(i) * n + j] = G[size_t(j) * n + i];
  }
}

// ---------------------------------------------------------------------------- center storage
// Centers kept row-major in T for output, and transposed + padded for the distance kernel.
template <class T>
struct Centers {
  i64 k = 0, d = 0, kp = 0;
  std::vector<T> c;   // [k, d]
  std::vector<T> ct;  // [d, kp]
  std::vector<T> cn;  // [k] squared norms
  static constexpr i64 JB = 16;
  void init(i64 k_, i64 d_) {
    k = k_; d = d_; kp = (k + JB - 1) / JB * JB;
    c.assign(size_t(k) * d, T(0)); ct.assign(size_t(d) * kp, T(0)); cn.assign(k, T(0));
  }
  void refresh() {
    for (i64 j = 0; j < k; ++j) {
      double s = 0.0;
      for (i64 t = 0; t < d; ++t) {
        const T v = c[size_t(j) * d + t];
        ct[size_t(t) * kp + j] = v;
        s += double(v) * double(v);
      }
      cn[j] = T(s);
    }
  }
};

// Nearest and second-nearest center of points [i0, i1): squared distances (dot form, as
// scikit-learn) written to best2/second2, labels to lab.  `buf` holds 4 * kp values.
// dist[p * kp + j] = ||c_j||^2 - 2 <x_{i+p}, c_j> for pb <= 4 points starting at i (buf: 4 * kp).
template <class T>
void distances_block(const T* X, i64 i, i64 pb, const Centers<T>& C, std::vector<T>& buf) {
  constexpr i64 PB = 4, JB = Centers<T>::JB;
  const i64 d = C.d, k = C.k, kp = C.kp;
  buf.resize(size_t(PB) * kp);
  for (i64 j0 = 0; j0 < kp; j0 += JB) {
    T acc[PB][JB] = {};
    const T* xr = X + i * d;
    if (pb == PB) {
      for (i64 t = 0; t < d; ++t) {
        const T* col = &C.ct[size_t(t) * kp + j0];
        const T x0 = xr[t], x1 = xr[d + t], x2 = xr[2 * d + t], x3 = xr[3 * d + t];
#pragma omp simd
        for (i64 jj = 0; jj < JB; ++jj) {
          acc[0][jj] += x0 * col[jj];
          acc[1][jj] += x1 * col[jj];
          acc[2][jj] += x2 * col[jj];
          acc[3][jj] += x3 * col[jj];
        }
      }
    } else {
      for (i64 p = 0; p < pb; ++p)
        for (i64 t = 0; t < d; ++t) {
          const T* col = &C.ct[size_t(t) * kp + j0];
          const T xv = xr[p * d + t];
#pragma omp simd
          for (i64 jj = 0; jj < JB; ++jj) acc[p][jj] += xv * col[jj];
        }
    }
    const i64 jn = std::min(JB, k - j0);
    for (i64 p = 0; p < pb; ++p)
      for (i64 jj = 0; jj < jn; ++jj) buf[size_t(p) * kp + j0 + jj] = C.cn[j0 + jj] - T(2) * acc[p][jj];
  }
}

// Nearest and second-nearest center of points [i0, i1): squared distances (dot form, as
// scikit-learn) written to best2/second2, labels to lab.  `buf` holds 4 * kp values.
template <class T>
void assign_range(const T* X, const T* xnorm, i64 i0, i64 i1, const Centers<T>& C, i32* lab, double* best2,
                  double* second2, std::vector<T>& buf) {
  constexpr i64 PB = 4;
  const i64 k = C.k, kp = C.kp;
  for (i64 i = i0; i < i1; i += PB) {
    const i64 pb = std::min(PB, i1 - i);
    distances_block(X, i, pb, C, buf);
    for (i64 p = 0; p < pb; ++p) {
      const T* dist = &buf[size_t(p) * kp];
      T m = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : m)
      for (i64 j = 0; j < k; ++j) m = std::min(m, dist[j]);
      // First index holding the minimum; none matches only when distances overflowed to NaN
      // (float32 data near its range limit): then the label stays 0, never out of range.
      i64 b = 0;
      while (b < k && dist[b] != m) ++b;
      if (b == k) b = 0;
      T m2 = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : m2)
      for (i64 j = 0; j < k; ++j) m2 = std::min(m2, j == b ? std::numeric_limits<T>::infinity() : dist[j]);
      const double xn = double(xnorm[i + p]);
      lab[i + p] = i32(b);
      best2[i + p] = std::max(0.0, xn + double(m));
      second2[i + p] = k > 1 ? std::max(0.0, xn + double(m2)) : kInf;
    }
  }
}

// x (finite, >= 0) with the low 20 of its 52 mantissa bits cleared: values that agree to about 32 bits
// (2e-10 relative) mostly come out equal; two that differ by d relative straddle a boundary with
// probability about d / 2e-10.
inline double round_low_bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  u &= ~uint64_t(0xFFFFF);
  std::memcpy(&x, &u, sizeof u);
  return x;
}

// ------------------------------------------------------------------- empty-cluster relocation
// scikit-learn's repair: each empty cluster takes the point farthest from its (old) center; the
// point's contribution moves from its cluster's sums to the empty one's.  Labels are left as they
// are (the next E-step reassigns).  We only take points of positive weight, at positive distance,
// whose cluster keeps some weight, never the same coordinates twice, and never a point whose copies
// make up a whole cluster (its own or another: that cluster's center is the point, or becomes it once the
// point leaves), so relocated centers are distinct from each other and from every other center made of
// copies.  (Taking such a point put two centers on one spot: the copies then went to the lower index, a
// cluster came back empty, and Yinyang and top-m moved centers between copies until max_iter.)
// "Keeps some weight" counts the
// cluster's other members of positive weight rather than subtracting weights: a sum kept by moving
// points in and out (Yinyang, top-m) or taken as a difference of prefix sums (lloyd1d) carries
// rounding, and a lone member's cluster would seem to keep a remainder.
// `sums` may be null (the Gram solver tracks membership instead: moved[e] = point).  `index`, when given,
// is each row's index in the caller's data (lloyd1d passes its sorted values): ties go by it, not by row.
template <class P>
void relocate(i64 n, i64 k, i64 d, const P* X, const double* w, const i32* lab, const double* d2,
              const std::vector<i32>& empty, double* sums, double* wsum, std::vector<i64>& moved,
              const i64* index = nullptr) {
  moved.assign(empty.size(), -1);
  std::vector<i64> members(k, 0);  // per cluster: its points of positive weight
  std::vector<i64> cand;
  cand.reserve(n);
  for (i64 i = 0; i < n; ++i)
    if (weight(w, i) > 0) {
      ++members[lab[i]];
      if (d2[i] > 0) cand.push_back(i);
    }
  // Farthest first, distances equal to about 32 bits counting as a tie that the lower index wins: solvers
  // whose centers or distances differ in the last bits (running sums against fresh ones, differences of
  // prefix sums, a center (a + b) / 2 rounded) then repair alike where the distances are equal in exact
  // arithmetic -- the two members of a two-point cluster always are, yet come out up to 1e-13 apart.
  // (Compared exactly, such a tie went by the rounding: Yinyang and top-m parted from Lloyd on 2 of 3000
  // fuzzed problems of 1-3-D points at k near N; at 40 bits one 1-D problem in 5000 still straddled.)
  auto idx = [&](i64 i) { return index ? index[i] : i; };
  std::sort(cand.begin(), cand.end(), [&](i64 a, i64 b) {
    const double ka = round_low_bits(d2[a]), kb = round_low_bits(d2[b]);  // distances to 32 bits
    return ka > kb || (ka == kb && idx(a) < idx(b));
  });
  // Clusters made of copies of one point (their members of positive weight all equal; a single member counts),
  // found by their first member; looked up by a hash of the coordinates (-0 read as +0, as == compares).
  std::vector<i64> first(k, -1);
  std::vector<char> copies(k, 1);
  for (i64 i = 0; i < n; ++i) {
    if (!(weight(w, i) > 0)) continue;
    const i32 c = lab[i];
    if (first[c] < 0) first[c] = i;
    else if (copies[c] && !std::equal(X + first[c] * d, X + (first[c] + 1) * d, X + i * d)) copies[c] = 0;
  }
  auto row_hash = [&](i64 i) {
    uint64_t h = 1469598103934665603ull;
    for (i64 t = 0; t < d; ++t) {
      const double v = double(X[i * d + t]) + 0.0;
      uint64_t u;
      std::memcpy(&u, &v, sizeof u);
      h = (h ^ u) * 1099511628211ull;
    }
    return h;
  };
  std::unordered_multimap<uint64_t, i64> copy_rows;
  for (i64 c = 0; c < k; ++c)
    if (first[c] >= 0 && copies[c]) copy_rows.emplace(row_hash(first[c]), first[c]);
  auto copies_a_cluster = [&](i64 i) {
    auto range = copy_rows.equal_range(row_hash(i));
    for (auto it = range.first; it != range.second; ++it)
      if (std::equal(X + it->second * d, X + (it->second + 1) * d, X + i * d)) return true;
    return false;
  };
  std::vector<i64> picked;
  std::vector<char> taken(n, 0);
  size_t pos = 0;
  for (size_t e = 0; e < empty.size(); ++e) {
    for (; pos < cand.size(); ++pos) {
      const i64 i = cand[pos];
      const double wi = weight(w, i);
      const i32 from = lab[i];
      if (members[from] <= 1) continue;
      bool dup = false;
      for (i64 q : picked)
        if (std::equal(X + q * d, X + (q + 1) * d, X + i * d)) { dup = true; break; }
      if (dup || copies_a_cluster(i)) continue;
      const i32 to = empty[e];
      taken[i] = 1;
      if (!copies[from]) {  // the cluster left behind may be copies of one point now
        i64 f0 = -1;
        bool same = true;
        for (i64 q = 0; q < n && same; ++q) {
          if (lab[q] != from || taken[q] || !(weight(w, q) > 0)) continue;
          if (f0 < 0) f0 = q;
          else same = std::equal(X + f0 * d, X + (f0 + 1) * d, X + q * d);
        }
        if (f0 >= 0 && same) {
          copies[from] = 1;
          copy_rows.emplace(row_hash(f0), f0);
        }
      }
      if (sums) {
        for (i64 t = 0; t < d; ++t) {
          sums[size_t(from) * d + t] -= wi * double(X[i * d + t]);
          sums[size_t(to) * d + t] = wi * double(X[i * d + t]);
        }
      }
      wsum[from] -= wi;
      wsum[to] = wi;
      --members[from];
      members[to] = 1;
      moved[e] = i;
      picked.push_back(i);
      ++pos;
      break;
    }
  }
}

// One run's outcome (before the best of n_init is kept).
template <class T>
struct Run {
  std::vector<T> centroids;  // [k, d]
  std::vector<i32> labels;   // [n]
  double inertia = kInf;
  i32 n_iter = 0;
  bool converged = false;
  Algo algo = Algo::Lloyd;
};

template <class T>
double inertia_of(const Dataset<T>& ds, const std::vector<T>& C, const std::vector<i32>& lab, bool par) {
  const i64 d = ds.d;
  return chunked_sum(ds.n, par, [&](i64 i0, i64 i1) {
    double s = 0;
    for (i64 i = i0; i < i1; ++i) s += weight(ds.w, i) * sqdist(ds.x + i * d, &C[size_t(lab[i]) * d], d);
    return s;
  });
}

// The M-step's end, shared by the direct solvers: repair empty clusters (from the sums of the
// current labels), new centers = sums / weights, drift of each center.  Returns the total squared
// drift (the tol test).  `sums`/`wsum` are modified by the repair.
template <class T>
double new_centers(const Dataset<T>& ds, const std::vector<i32>& lab, const Centers<T>& C, double* sums,
                   double* wsum, std::vector<T>& cnew, std::vector<double>& drift, std::vector<i32>& empty,
                   std::vector<double>& d2own, bool par) {
  const i64 n = ds.n, d = ds.d, k = C.k;
  empty.clear();
  for (i64 j = 0; j < k; ++j)
    if (wsum[j] <= 0) empty.push_back(i32(j));
  if (!empty.empty()) {
    std::vector<i64> moved;
#pragma omp parallel for if (par) schedule(static)
    for (i64 i = 0; i < n; ++i) d2own[i] = sqdist(ds.x + i * d, &C.c[size_t(lab[i]) * d], d);
    relocate(n, k, d, ds.x, ds.w, lab.data(), d2own.data(), empty, sums, wsum, moved);
  }
  double shift_tot = 0;
  for (i64 j = 0; j < k; ++j) {
    T* cj = &cnew[size_t(j) * d];
    const T* co = &C.c[size_t(j) * d];
    if (wsum[j] > 0)
      for (i64 q = 0; q < d; ++q) cj[q] = T(sums[size_t(j) * d + q] / wsum[j]);
    else
      std::copy(co, co + d, cj);
    const double s2 = sqdist(cj, co, d);
    shift_tot += s2;
    drift[j] = std::sqrt(s2);
  }
  return shift_tot;
}

// The M-step's sums.  add_to_sums: points [i0, i1) added to su / ws under their labels, in index
// order.  Solvers that track labels start from all points once, then move only the weight of the
// points whose label changed (LabelMoves).
template <class T>
void add_to_sums(const Dataset<T>& ds, const i32* lab, i64 i0, i64 i1, double* su, double* ws) {
  const i64 d = ds.d;
  for (i64 i = i0; i < i1; ++i) {
    const double wi = weight(ds.w, i);
    double* sj = su + size_t(lab[i]) * d;
    const T* x = ds.x + i * d;
    for (i64 q = 0; q < d; ++q) sj[q] += wi * double(x[q]);
    ws[lab[i]] += wi;
  }
}

template <class T>
void sums_of_labels(const Dataset<T>& ds, const i32* lab, std::vector<double>& sums, std::vector<double>& wsum) {
  std::fill(sums.begin(), sums.end(), 0.0);
  std::fill(wsum.begin(), wsum.end(), 0.0);
  add_to_sums(ds, lab, 0, ds.n, sums.data(), wsum.data());
}

// The points whose label an E-step changed, with their old label, listed per chunk of points (each
// chunk written by the one thread that assigns it, in index order).  apply moves their weight from
// the old cluster to the new, chunk after chunk: the order a scan of all labels against the previous
// ones would take, without that scan and the copy of the labels each iteration.  Returns the count.
// With non-integer weights, sums moved in and out of a cluster need not cancel exactly: a cluster
// whose last member of positive weight left would keep a residue of rounding in its weight and sums
// (a center at residue / residue, and no repair, since only a weight of exactly 0 is empty).  So the
// members of positive weight are counted per cluster, and a cluster with none gets exact zeros, as a
// solver that sums from scratch each iteration finds it (unit weights cancel exactly, the coordinate
// sums need not).
struct LabelMoves {
  std::vector<std::vector<std::pair<i64, i32>>> chunks;
  std::vector<i64> members;  // per cluster: how many points of positive weight it holds
  explicit LabelMoves(i64 nchunks) : chunks(nchunks) {}
  template <class T>
  i64 apply(const Dataset<T>& ds, const i32* lab, std::vector<double>& sums, std::vector<double>& wsum) {
    const i64 d = ds.d;
    i64 changed = 0;
    bool emptied = false;
    for (const auto& mv : chunks) {
      changed += i64(mv.size());
      for (const auto& [i, from] : mv) {
        const i32 to = lab[i];
        const double wi = weight(ds.w, i);
        if (wi > 0) {
          emptied |= --members[from] == 0;
          ++members[to];
        }
        double* so = &sums[size_t(from) * d];
        double* sn = &sums[size_t(to) * d];
        const T* x = ds.x + i * d;
        for (i64 q = 0; q < d; ++q) {
          so[q] -= wi * double(x[q]);
          sn[q] += wi * double(x[q]);
        }
        wsum[from] -= wi;
        wsum[to] += wi;
      }
    }
    if (emptied)
      for (size_t j = 0; j < members.size(); ++j)
        if (members[j] == 0) {
          wsum[j] = 0.0;
          std::fill(sums.begin() + j * d, sums.begin() + (j + 1) * d, 0.0);
        }
    return changed;
  }
  // The M-step's sums: from scratch after the first E-step (every point counts as changed), then by
  // the moves.  Returns the number of changed labels.
  template <class T>
  i64 update_sums(const Dataset<T>& ds, const i32* lab, bool first, std::vector<double>& sums,
                  std::vector<double>& wsum) {
    if (!first) return apply(ds, lab, sums, wsum);
    sums_of_labels(ds, lab, sums, wsum);
    members.assign(wsum.size(), 0);
    for (i64 i = 0; i < ds.n; ++i)
      if (weight(ds.w, i) > 0) ++members[lab[i]];
    return ds.n;
  }
};
