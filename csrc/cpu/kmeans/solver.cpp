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

// ------------------------------------------------------------------- empty-cluster relocation
// scikit-learn's repair: each empty cluster takes the point farthest from its (old) center; the
// point's contribution moves from its cluster's sums to the empty one's.  Labels are left as they
// are (the next E-step reassigns).  We only take points of positive weight, at positive distance,
// whose cluster keeps some weight, and never the same coordinates twice, so relocated centers
// are distinct from each other and from the clusters they leave.  "Keeps some weight" counts the
// cluster's other members of positive weight rather than subtracting weights: a sum kept by moving
// points in and out (Yinyang, top-m) or taken as a difference of prefix sums (lloyd1d) carries
// rounding, and a lone member's cluster would seem to keep a remainder.
// `sums` may be null (the Gram solver tracks membership instead: moved[e] = point).
template <class P>
void relocate(i64 n, i64 k, i64 d, const P* X, const double* w, const i32* lab, const double* d2,
              const std::vector<i32>& empty, double* sums, double* wsum, std::vector<i64>& moved) {
  moved.assign(empty.size(), -1);
  std::vector<i64> members(k, 0);  // per cluster: its points of positive weight
  std::vector<i64> cand;
  cand.reserve(n);
  for (i64 i = 0; i < n; ++i)
    if (weight(w, i) > 0) {
      ++members[lab[i]];
      if (d2[i] > 0) cand.push_back(i);
    }
  std::sort(cand.begin(), cand.end(), [&](i64 a, i64 b) { return d2[a] > d2[b] || (d2[a] == d2[b] && a < b); });
  std::vector<i64> picked;
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
      if (dup) continue;
      const i32 to = empty[e];
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

// ------------------------------------------------------------------ direct Lloyd / Hamerly
template <class T>
void solve_direct(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, const std::vector<T>& init, int max_iter,
                  bool bounds, bool par, Run<T>& out) {
  const i64 n = ds.n, d = ds.d;
  const double* w = ds.w;
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
          // Stored as float, rounded down so it stays a lower bound.
          const double v = lbv[g] == kInf ? kInf : lbv[g] - std::abs(lbv[g]) * 0x1p-22;
          l[g] = float(v);
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
  struct Bounds {
    double far_abs;
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
  double cf = 0.0;
  auto set_wake = [&](i64 i, double gap) { wake[i] = float_below(cum[lab[i]] + cf + gap); };
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
    set_wake(i, std::min(ev[1], far) - ev[0]);
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
  auto examine = [&](i64 i) {
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
        set_wake(i, lo - e0);
        return;
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
      set_wake(i, lo - ev[0]);
      return;
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
      set_wake(i, lo2 - ev[bi]);
    } else {
      // M + 1 centers lie within emax: a slightly larger threshold keeps them all in the scan
      // whatever the rounding of its float arithmetic.
      full_scan(i, b, emax == kInf ? kInf : emax * emax * (1.0 + 1e-5) + 1e-30);
    }
  };
  // One E-step: only the points whose wake threshold the erosion has reached are examined; the
  // labels it changes are listed per chunk of 1024 (LabelMoves).
  constexpr i64 kChunk = 1024;
  LabelMoves moves((n + kChunk - 1) / kChunk);
  auto assign = [&](bool first) {
#pragma omp parallel for if (par) schedule(dynamic, 16)
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
        examine(i);
        if (lab[i] != old) mv.emplace_back(i, old);
      }
    }
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
    cf += dmax;
    for (i64 j = 0; j < k; ++j) {
      cum[j] += delta[j];
      due[j] = float_above(cum[j] + cf);
    }
    C.c.swap(cnew);
    C.refresh();
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
    if (par) {
      const int nth = omp_get_max_threads();
#pragma omp parallel num_threads(nth)
      {
        const int t = omp_get_thread_num();
        const i64 lo = n * t / nth, hi = n * (t + 1) / nth;
        for (i64 l = 0; l < n; ++l) {
          if (coef[l] == 0.0) continue;
          double* dst = &crn[size_t(eff[l]) * n];
          const double* g = G + l * n;
          const double a = coef[l];
#pragma omp simd
          for (i64 i = lo; i < hi; ++i) dst[i] += a * g[i];
        }
      }
    } else {
      for (i64 l = 0; l < n; ++l) {
        if (coef[l] == 0.0) continue;
        double* dst = &crn[size_t(eff[l]) * n];
        const double* g = G + l * n;
        const double a = coef[l];
#pragma omp simd
        for (i64 i = 0; i < n; ++i) dst[i] += a * g[i];
      }
    }
    // ||c_new||^2 and <c_new, c_old> from the members; shift = ||c_new - c_old||^2.
    std::fill(cnn.begin(), cnn.end(), 0.0);
    std::vector<double> cross_old(k, 0.0);
    for (i64 l = 0; l < n; ++l) {
      const i64 j = eff[l];
      cnn[j] += coef[l] * crn[size_t(j) * n + l];
      cross_old[j] += coef[l] * cr[size_t(j) * n + l];
    }
    double shift_tot = 0;
    for (i64 j = 0; j < k; ++j) shift_tot += std::max(0.0, cnn[j] - 2.0 * cross_old[j] + cn[j]);
    cr.swap(crn);
    cn.swap(cnn);
    // Labels unchanged: converged.  The final E-step is skipped unless a relocation moved a
    // center in this very step (the labels would not match the returned centroids otherwise).
    if (lab == lab_old) { strict = empty.empty(); break; }
    if (shift_tot <= prep.tol_abs) break;
    lab_old = lab;
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

// ------------------------------------------------------------------------------- 1-D Lloyd
// Points sorted once per dataset; with centers sorted, each cluster is an interval of the sorted
// points, found by binary search on "the right neighbour is nearer" (ties to the lower index, as
// argmin).  Sums come from prefix sums, so an iteration costs O(k log N).
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
      W[j] = prep.pw[hi[j]] - prep.pw[lo[j]];
      S[j] = prep.pwx[hi[j]] - prep.pwx[lo[j]];
      if (W[j] <= 0) empty.push_back(i32(j));
    }
    if (!empty.empty()) {
      // Rare: materialize sorted-position labels and distances for the repair.
      std::vector<i32> lab(n);
      std::vector<double> d2(n);
      for (i64 j = 0; j < k; ++j)
        for (i64 p = lo[j]; p < hi[j]; ++p) lab[p] = i32(j);
      for (i64 p = 0; p < n; ++p) d2[p] = (v[p] - c[lab[p]]) * (v[p] - c[lab[p]]);
      relocate(n, k, i64(1), v.data(), prep.sw.data(), lab.data(), d2.data(), empty, S.data(), W.data(), moved);
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
// the first i points in m clusters, with the optimal split monotone in i (divide and conquer).
//
// The split table of the exact 1-D DP for every number of clusters up to kmax: row m - 1 holds, for each
// prefix length i, where the optimal m-clustering of the first i sorted points starts its last interval.
// Level m depends only on level m - 1, never on kmax, so one table serves every k <= kmax with the very
// splits a table built for k alone would hold: a k sweep of one dataset (the element plans' elbow and
// inertia sweeps: 20 k per coordinate) costs one DP instead of one per k.
struct Exact1DTable {
  i64 kmax = 0;
  std::vector<i32> split;
};

template <class T>
void exact1d_table(const Dataset<T>& ds, const Prepared<T>& prep, i64 k, Exact1DTable& tb) {
  const i64 n = ds.n;
  const auto& v = prep.sv;
  const auto& sw = prep.sw;
  double mean = prep.pwx[n] / std::max(prep.pw[n], 1e-300);
  if (!(prep.pw[n] > 0)) mean = 0;
  std::vector<double> P1(n + 1, 0.0), P2(n + 1, 0.0);
  for (i64 i = 0; i < n; ++i) {
    const double t = v[i] - mean;
    P1[i + 1] = P1[i] + sw[i] * t;
    P2[i + 1] = P2[i] + sw[i] * t * t;
  }
  const auto& PW = prep.pw;
  auto cost = [&](i64 a, i64 b) {  // [a, b)
    const double W = PW[b] - PW[a];
    if (W <= 0) return 0.0;
    const double s = P1[b] - P1[a];
    return std::max(0.0, (P2[b] - P2[a]) - s * s / W);
  };
  std::vector<double> prev(n + 1, kInf), cur(n + 1, kInf);
  tb.kmax = k;
  tb.split.assign(size_t(k) * (n + 1), 0);
  std::vector<i32>& split = tb.split;
  for (i64 i = 1; i <= n; ++i) prev[i] = cost(0, i);
  for (i64 m = 2; m <= k; ++m) {
    std::fill(cur.begin(), cur.end(), kInf);
    i32* sp = &split[size_t(m - 1) * (n + 1)];
    // cur[i] = min_{j in [m-1, i-1]} prev[j] + cost(j, i), for i in [m, n].
    struct Frame { i64 lo, hi, olo, ohi; };
    std::vector<Frame> stack{{m, n, m - 1, n - 1}};
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
    exact1d_table(ds, prep, k, own);
    shared = &own;
  }
  const std::vector<i32>& split = shared->split;
  // Backtrack the interval ends.
  std::vector<i64> bound(k + 1);
  bound[k] = n;
  for (i64 m = k; m >= 2; --m) bound[m - 1] = split[size_t(m - 1) * (n + 1) + bound[m]];
  bound[0] = 0;
  out.centroids.resize(k);
  out.labels.assign(n, 0);
  for (i64 m = 0; m < k; ++m) {
    const i64 a = bound[m], b = bound[m + 1];
    const double W = PW[b] - PW[a];
    double c;
    if (W > 0) c = (prep.pwx[b] - prep.pwx[a]) / W;
    else {
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
  prepare_views(params, prep, want_direct, want_gram, want_sorted, par);
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
