// 16 float lanes for the solver's hand-vectorized paths, on AVX-512 (one register) or AVX2 (two).
// The solver's 9-D paths (k-means++ trials, top-m's first scan) are written once against this and
// run on both; without AVX2 (the generic copy) KC_SIMD16 is 0 and the solver keeps its scalar
// paths.  Included by solver.cpp inside its per-instruction-set anonymous namespace, so each copy
// gets its own definitions (no shared inline symbols between copies built with different flags).
//
// Lane l of a vector is element l of the 16 it was loaded from; masks are 16-bit, bit l for lane l.
// What is computed through these gives the same floating-point results on both: lane-wise IEEE
// operations, explicit FMAs, horizontal sums in lane order.
#pragma once
#ifndef KC_ARCH
#error "simd16.h is included by solver.cpp inside its per-instruction-set namespace, after <immintrin.h>"
#endif

#if defined(__AVX512F__)
#define KC_SIMD16 1

struct F16 {
  __m512 v;
};
struct I16 {
  __m512i v;
};
using M16 = __mmask16;  // bit l: lane l

inline M16 m16_first(int64_t m) { return m >= 16 ? M16(0xFFFF) : M16((1u << m) - 1u); }
inline unsigned m16_bits(M16 m) { return m; }
inline F16 f16_zero() { return {_mm512_setzero_ps()}; }
inline F16 f16_set1(float a) { return {_mm512_set1_ps(a)}; }
inline F16 f16_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 f16_loadz(M16 m, const float* p) { return {_mm512_maskz_loadu_ps(m, p)}; }  // off lanes: 0
inline void f16_store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline void f16_store(M16 m, float* p, F16 a) { _mm512_mask_storeu_ps(p, m, a.v); }
inline F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 f16_fmadd(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 f16_min(F16 a, F16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline M16 f16_lt(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline M16 f16_le(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ); }
inline F16 f16_blend(M16 m, F16 a, F16 b) { return {_mm512_mask_blend_ps(m, a.v, b.v)}; }  // b where m
inline I16 i16_set1(int32_t a) { return {_mm512_set1_epi32(a)}; }
inline I16 i16_blend(M16 m, I16 a, I16 b) { return {_mm512_mask_blend_epi32(m, a.v, b.v)}; }
inline void i16_store(int32_t* p, I16 a) { _mm512_storeu_si512(reinterpret_cast<void*>(p), a.v); }
// table[idx[l]] for 16 int32 indices.
inline F16 f16_gather(const float* table, const int32_t* idx) {
  return {_mm512_i32gather_ps(_mm512_loadu_si512(reinterpret_cast<const void*>(idx)), table, 4)};
}

// 16 double lanes (sums of widened float lanes).
struct D16 {
  __m512d lo, hi;
};
inline D16 d16_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
inline D16 d16_widen(F16 a) {
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(a.v)),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)))};
}
inline D16 d16_load(const double* p) { return {_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)}; }
inline D16 operator+(D16 a, D16 b) { return {_mm512_add_pd(a.lo, b.lo), _mm512_add_pd(a.hi, b.hi)}; }
inline D16 operator*(D16 a, D16 b) { return {_mm512_mul_pd(a.lo, b.lo), _mm512_mul_pd(a.hi, b.hi)}; }
inline void d16_store(double* p, D16 a) {
  _mm512_storeu_pd(p, a.lo);
  _mm512_storeu_pd(p + 8, a.hi);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define KC_SIMD16 1

struct F16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
struct I16 {
  __m256i lo, hi;
};
struct M16 {  // all-ones / all-zeros per lane, as AVX2 compares produce
  __m256 lo, hi;
};

inline M16 m16_first(int64_t m) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i n = _mm256_set1_epi32(int32_t(m < 16 ? m : 16));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(n, idx)),
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_add_epi32(idx, _mm256_set1_epi32(8))))};
}
inline unsigned m16_bits(M16 m) {
  return unsigned(_mm256_movemask_ps(m.lo)) | (unsigned(_mm256_movemask_ps(m.hi)) << 8);
}
inline F16 f16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 f16_set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F16 f16_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 f16_loadz(M16 m, const float* p) {
  return {_mm256_maskload_ps(p, _mm256_castps_si256(m.lo)), _mm256_maskload_ps(p + 8, _mm256_castps_si256(m.hi))};
}
inline void f16_store(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void f16_store(M16 m, float* p, F16 a) {
  _mm256_maskstore_ps(p, _mm256_castps_si256(m.lo), a.lo);
  _mm256_maskstore_ps(p + 8, _mm256_castps_si256(m.hi), a.hi);
}
inline F16 operator+(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F16 f16_fmadd(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 f16_min(F16 a, F16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline M16 f16_lt(F16 a, F16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)};
}
inline M16 f16_le(F16 a, F16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_LE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LE_OQ)};
}
inline F16 f16_blend(M16 m, F16 a, F16 b) {
  return {_mm256_blendv_ps(a.lo, b.lo, m.lo), _mm256_blendv_ps(a.hi, b.hi, m.hi)};
}
inline I16 i16_set1(int32_t a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
inline I16 i16_blend(M16 m, I16 a, I16 b) {
  return {_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(b.lo), m.lo)),
          _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a.hi), _mm256_castsi256_ps(b.hi), m.hi))};
}
inline void i16_store(int32_t* p, I16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), a.hi);
}
inline F16 f16_gather(const float* table, const int32_t* idx) {
  return {_mm256_i32gather_ps(table, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4),
          _mm256_i32gather_ps(table, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 8)), 4)};
}
struct D16 {
  __m256d v[4];  // lanes 0-3, 4-7, 8-11, 12-15
};
inline D16 d16_zero() { return {{_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()}}; }
inline D16 d16_widen(F16 a) {
  return {{_mm256_cvtps_pd(_mm256_castps256_ps128(a.lo)), _mm256_cvtps_pd(_mm256_extractf128_ps(a.lo, 1)),
           _mm256_cvtps_pd(_mm256_castps256_ps128(a.hi)), _mm256_cvtps_pd(_mm256_extractf128_ps(a.hi, 1))}};
}
inline D16 d16_load(const double* p) {
  return {{_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4), _mm256_loadu_pd(p + 8), _mm256_loadu_pd(p + 12)}};
}
inline D16 operator+(D16 a, D16 b) {
  for (int h = 0; h < 4; ++h) a.v[h] = _mm256_add_pd(a.v[h], b.v[h]);
  return a;
}
inline D16 operator*(D16 a, D16 b) {
  for (int h = 0; h < 4; ++h) a.v[h] = _mm256_mul_pd(a.v[h], b.v[h]);
  return a;
}
inline void d16_store(double* p, D16 a) {
  for (int h = 0; h < 4; ++h) _mm256_storeu_pd(p + 4 * h, a.v[h]);
}

#else
#define KC_SIMD16 0
#endif

#if KC_SIMD16
inline bool m16_any(M16 m) { return m16_bits(m) != 0; }
// The first min(m, 16) lanes at p, the rest 0 (m >= 1): a plain load for a whole vector, a masked one
// for a tail; the store writes only those lanes.
inline F16 f16_load_first(const float* p, int64_t m) { return m >= 16 ? f16_load(p) : f16_loadz(m16_first(m), p); }
inline void f16_store_first(float* p, int64_t m, F16 a) {
  if (m >= 16) f16_store(p, a);
  else f16_store(m16_first(m), p, a);
}
// The 16 lanes summed in lane order (0, 1, ..., 15): a fixed order, whatever the compiler would do.
inline double d16_sum_lanes(D16 a) {
  double lanes[16];
  d16_store(lanes, a);
  double s = 0;
  for (double v : lanes) s += v;
  return s;
}
inline double f16_sum_lanes(F16 a) { return d16_sum_lanes(d16_widen(a)); }
// Squared distances from 16 points to the point c in D dimensions: xv[q] holds coordinate q of the
// 16 points (one per lane); summed over q in order.
template <int D>
inline F16 sqdist16_to(const F16* xv, const float* c) {
  F16 sd = f16_zero();
  for (int q = 0; q < D; ++q) {
    const F16 u = xv[q] - f16_set1(c[q]);
    sd = f16_fmadd(u, u, sd);
  }
  return sd;
}
#endif
