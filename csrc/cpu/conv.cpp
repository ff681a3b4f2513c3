// Centroid-indexed convolution kernels (CPU): the memory-bound halves of the op.
//
// The compute-bound half (convolving with the K unique filters, or depthwise with the codebook
// kernels) runs in torch/oneDNN; these kernels take its output and produce the layer's output in
// one pass over memory:
//
//   gather_epilogue  (filter granularity)
//       out[n, o, s] = act(u[n, index[o], s] * scale[o] + shift[o] (+ residual[n, o, s]))
//
// act is the identity or ReLU.  It takes numpy buffers (torch CPU tensors pass zero-copy through
// .numpy()), float32 or float64, and write into a caller-allocated `out`.  Every size, dtype and
// index is checked here too: a bad call raises ValueError, never reads out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "registration.h"

namespace py = pybind11;

namespace kcengine {
namespace {

// ---------------------------------------------------------------------------------------------
// Validation helpers.
// ---------------------------------------------------------------------------------------------
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void check_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
}

void check_ndim(const py::array& a, const char* name, int ndim) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          shape_str(a));
}

void check_dim(const py::array& a, const char* name, int d, py::ssize_t want, const char* what) {
  if (a.shape(d) != want)
    throw py::value_error(std::string(name) + " has shape " + shape_str(a) + " but dimension " + std::to_string(d) +
                          " must be " + what + "=" + std::to_string(want));
}

// The optional per-channel epilogue vectors: scale (default 1) and shift (default 0).
template <typename T>
std::vector<T> affine_or(const py::object& v, py::ssize_t c, T fill, const char* name) {
  std::vector<T> out(static_cast<size_t>(c), fill);
  if (v.is_none()) return out;
  py::array a = py::array::ensure(v);
  if (!a) throw py::value_error(std::string(name) + " must be an array or None");
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(std::string(name) + " must have the dtype of u, got " + std::string(py::str(a.dtype())));
  check_ndim(a, name, 1);
  check_dim(a, name, 0, c, "C_out");
  auto r = a.unchecked<T, 1>();
  for (py::ssize_t i = 0; i < c; ++i) out[static_cast<size_t>(i)] = r(i);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Hot loops.  Written per dtype (target_clones does not combine with templates in GCC), each
// cloned for AVX-512 / AVX2 / baseline and chosen at load time.
// ---------------------------------------------------------------------------------------------
#define KC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// ReLU everywhere below is max(0, v) with v as the operand that wins when unordered (`v < 0 ? 0 : v`,
// `max_ps(zero, v)`): a NaN passes through, as torch.relu passes it (a NaN turned into 0 hides a diverged
// model).

#define KC_DEFINE_ROW_KERNELS(T, SUFFIX)                                                                   \
  /* out[s] = act(src[s] * a + b (+ res[s])) over one contiguous row. */                                   \
  KC_CLONES void affine_row_##SUFFIX(const T* __restrict src, const T* __restrict res, T* __restrict dst,  \
                                     int64_t n, T a, T b, bool relu) {                                     \
    if (res) {                                                                                             \
      if (relu) {                                                                                          \
        for (int64_t s = 0; s < n; ++s) {                                                                  \
          T v = src[s] * a + b + res[s];                                                                   \
          dst[s] = v < T(0) ? T(0) : v;                                                                    \
        }                                                                                                  \
      } else {                                                                                             \
        for (int64_t s = 0; s < n; ++s) dst[s] = src[s] * a + b + res[s];                                  \
      }                                                                                                    \
    } else if (relu) {                                                                                     \
      for (int64_t s = 0; s < n; ++s) {                                                                    \
        T v = src[s] * a + b;                                                                              \
        dst[s] = v < T(0) ? T(0) : v;                                                                      \
      }                                                                                                    \
    } else {                                                                                               \
      for (int64_t s = 0; s < n; ++s) dst[s] = src[s] * a + b;                                             \
    }                                                                                                      \
  }                                                                                                        \
  /* Channels-last pixel: dst[o] = act(src[idx[o]] * a[o] + b[o] (+ res[o])). */                           \
  KC_CLONES void gather_pixels_##SUFFIX(const T* __restrict u, int64_t K, const int32_t* __restrict idx,  \
                                        const T* __restrict a, const T* __restrict b,                      \
                                        const T* __restrict res, T* __restrict out, int64_t C,             \
                                        int64_t m0, int64_t m1, bool relu) {                               \
    for (int64_t m = m0; m < m1; ++m) {                                                                    \
      const T* __restrict src = u + m * K;                                                                 \
      T* __restrict dst = out + m * C;                                                                     \
      if (res) {                                                                                           \
        const T* __restrict r = res + m * C;                                                               \
        for (int64_t o = 0; o < C; ++o) dst[o] = src[idx[o]] * a[o] + b[o] + r[o];                         \
      } else {                                                                                             \
        for (int64_t o = 0; o < C; ++o) dst[o] = src[idx[o]] * a[o] + b[o];                                \
      }                                                                                                    \
      if (relu)                                                                                            \
        for (int64_t o = 0; o < C; ++o) dst[o] = dst[o] < T(0) ? T(0) : dst[o];                            \
    }                                                                                                      \
  }

KC_DEFINE_ROW_KERNELS(float, f32)
KC_DEFINE_ROW_KERNELS(double, f64)

#define KC_DEFINE_AFFINE_VEC(T, SUFFIX)                                                                    \
  /* dst[o] = act(src[o] * a[o] + b[o] (+ res[o])) */                                                      \
  KC_CLONES void affine_row_vec_##SUFFIX(const T* __restrict src, const T* __restrict res, T* __restrict dst, \
                                         int64_t n, const T* __restrict a, const T* __restrict b, bool relu) { \
    if (res) {                                                                                             \
      for (int64_t o = 0; o < n; ++o) dst[o] = src[o] * a[o] + b[o] + res[o];                              \
    } else {                                                                                               \
      for (int64_t o = 0; o < n; ++o) dst[o] = src[o] * a[o] + b[o];                                       \
    }                                                                                                      \
    if (relu)                                                                                              \
      for (int64_t o = 0; o < n; ++o) dst[o] = dst[o] < T(0) ? T(0) : dst[o];                              \
  }
KC_DEFINE_AFFINE_VEC(float, f32)
KC_DEFINE_AFFINE_VEC(double, f64)
inline void affine_row_vec(const float* s, const float* r, float* d, int64_t n, const float* a, const float* b,
                           bool relu) {
  affine_row_vec_f32(s, r, d, n, a, b, relu);
}
inline void affine_row_vec(const double* s, const double* r, double* d, int64_t n, const double* a,
                           const double* b, bool relu) {
  affine_row_vec_f64(s, r, d, n, a, b, relu);
}

inline void affine_row(const float* s, const float* r, float* d, int64_t n, float a, float b, bool relu) {
  affine_row_f32(s, r, d, n, a, b, relu);
}
inline void affine_row(const double* s, const double* r, double* d, int64_t n, double a, double b, bool relu) {
  affine_row_f64(s, r, d, n, a, b, relu);
}
inline void gather_pixels(const float* u, int64_t K, const int32_t* idx, const float* a, const float* b,
                          const float* res, float* out, int64_t C, int64_t m0, int64_t m1, bool relu) {
  gather_pixels_f32(u, K, idx, a, b, res, out, C, m0, m1, relu);
}
inline void gather_pixels(const double* u, int64_t K, const int32_t* idx, const double* a, const double* b,
                          const double* res, double* out, int64_t C, int64_t m0, int64_t m1, bool relu) {
  gather_pixels_f64(u, K, idx, a, b, res, out, C, m0, m1, relu);
}

// Channels-last float32 gather for K <= 128 with AVX-512: the K values of a pixel sit in NSEG pairs of
// registers (32 values per pair) and each 16 outputs are one two-source permute (vpermt2ps) per pair,
// blended by the index's segment (idx >> 5), then the FMA (+ residual) (+ max) -- instead of a 16-lane
// memory gather, which is several times slower on this kind of CPU (measured: the K = 64 and 128
// gathers of resnet18's layer3/4 ran at a quarter of a plain copy's speed).  Chosen at run time where
// pick_isa() says "avx512".
template <int NSEG>
__attribute__((target("avx512f"))) void gather_pixels_perm_f32_t(const float* __restrict u, int64_t K,
                                                                  const int32_t* __restrict idx,
                                                                  const float* __restrict a, const float* __restrict b,
                                                                  const float* __restrict res, float* __restrict out,
                                                                  int64_t C, int64_t m0, int64_t m1, bool relu) {
  const int64_t nchunks = (C + 15) / 16;
  __mmask16 kmask[2 * NSEG];
  for (int r = 0; r < 2 * NSEG; ++r) {
    const int64_t left = K - 16 * r;
    kmask[r] = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (left > 0 ? ((1u << left) - 1u) : 0u));
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const float* src = u + m * K;
    __m512 reg[2 * NSEG];
    for (int r = 0; r < 2 * NSEG; ++r) reg[r] = _mm512_maskz_loadu_ps(kmask[r], src + 16 * r);
    float* dst = out + m * C;
    const float* rr = res ? res + m * C : nullptr;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t o = c * 16;
      const __mmask16 mk = static_cast<__mmask16>(C - o >= 16 ? 0xFFFF : ((1u << (C - o)) - 1u));
      const __m512i ix = _mm512_maskz_loadu_epi32(mk, idx + o);
      __m512 v = _mm512_permutex2var_ps(reg[0], ix, reg[1]);
      if constexpr (NSEG > 1) {
        const __m512i seg = _mm512_srli_epi32(ix, 5);
        for (int s = 1; s < NSEG; ++s) {
          const __mmask16 in_s = _mm512_cmpeq_epi32_mask(seg, _mm512_set1_epi32(s));
          v = _mm512_mask_mov_ps(v, in_s, _mm512_permutex2var_ps(reg[2 * s], ix, reg[2 * s + 1]));
        }
      }
      v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mk, a + o), _mm512_maskz_loadu_ps(mk, b + o));
      if (rr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, rr + o));
      if (relu) v = _mm512_max_ps(zero, v);
      _mm512_mask_storeu_ps(dst + o, mk, v);
    }
  }
}

constexpr int64_t kPermGatherMaxK = 128;

// Channels-last float32 gather with AVX2 + FMA (the same contract as gather_pixels).  Chosen at run time
// on CPUs with AVX2 but without AVX-512 (and on AVX-512 CPUs for K above the permute copy's 128, up to
// 1024, by the transpose), where the compiler's vectorized loop uses vgatherdps, which
// costs several times a permute here (measured on Zen 3: the gather of resnet18's layer1 at batch 32,
// K = 16, took 2.1 ms against 0.9-1.3 ms permuted, a 25.7 MB output; layer4's K = 128, 0.28 ms against
// 0.09 ms transposed).  Two ways, by K:
//   K <= 32:  the pixel's K values sit in NREG registers of 8; each 8 outputs are one lane permute per
//             register (vpermps), blended by the index's register (idx >> 3).
//   K > 32:   8 pixels at a time, transposed into a [K][8] scratch block (8x8 register transposes), so
//             that output channel o of the 8 pixels is one aligned load of row idx[o]; 8 such rows
//             transpose back into 8 pixels x 8 channels, then the affine, residual, ReLU and store.
//             A tail of fewer than 8 pixels takes the plain loop.
constexpr int64_t kPermAvx2MaxK = 32;
constexpr int64_t kTransAvx2MaxK = 1024;  // the [K][8] scratch block lives on the stack (32 KiB at most)

__attribute__((target("avx2,fma"))) inline __m256i lane_mask(int64_t left) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), lanes);
}

// The 8 outputs idx[0..7] of one pixel whose K values sit in reg (one lane permute per register, blended
// by the index's register idx >> 3).
template <int NREG>
__attribute__((target("avx2,fma"))) inline __m256 permute_pick(const __m256 (&reg)[NREG], __m256i ix) {
  __m256 v = _mm256_permutevar8x32_ps(reg[0], ix);
  if constexpr (NREG > 1) {
    const __m256i which = _mm256_srli_epi32(ix, 3);
    for (int r = 1; r < NREG; ++r) {
      const __m256 in_r = _mm256_castsi256_ps(_mm256_cmpeq_epi32(which, _mm256_set1_epi32(r)));
      v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(reg[r], ix), in_r);
    }
  }
  return v;
}

template <int NREG, bool RES, bool RELU>
__attribute__((target("avx2,fma"))) void gather_pixels_perm_avx2_t(const float* __restrict u, int64_t K,
                                                                   const int32_t* __restrict idx,
                                                                   const float* __restrict a,
                                                                   const float* __restrict b,
                                                                   const float* __restrict res,
                                                                   float* __restrict out, int64_t C, int64_t m0,
                                                                   int64_t m1) {
  const bool kfull = K == 8 * NREG;
  const __m256i klast = lane_mask(K - 8 * (NREG - 1));
  const int64_t cfull = C / 8 * 8;
  const __m256i ctail = lane_mask(C - cfull);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const float* src = u + m * K;
    __m256 reg[NREG];
    for (int r = 0; r < NREG - 1; ++r) reg[r] = _mm256_loadu_ps(src + 8 * r);
    reg[NREG - 1] = kfull ? _mm256_loadu_ps(src + 8 * (NREG - 1)) : _mm256_maskload_ps(src + 8 * (NREG - 1), klast);
    float* dst = out + m * C;
    const float* rr = RES ? res + m * C : nullptr;
    for (int64_t o = 0; o < cfull; o += 8) {
      __m256 v = permute_pick<NREG>(reg, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + o)));
      v = _mm256_fmadd_ps(v, _mm256_loadu_ps(a + o), _mm256_loadu_ps(b + o));
      if constexpr (RES) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + o));
      if constexpr (RELU) v = _mm256_max_ps(zero, v);
      _mm256_storeu_ps(dst + o, v);
    }
    if (cfull < C) {  // the last C % 8 channels, masked
      const int64_t o = cfull;
      __m256 v = permute_pick<NREG>(reg, _mm256_maskload_epi32(idx + o, ctail));
      v = _mm256_fmadd_ps(v, _mm256_maskload_ps(a + o, ctail), _mm256_maskload_ps(b + o, ctail));
      if constexpr (RES) v = _mm256_add_ps(v, _mm256_maskload_ps(rr + o, ctail));
      if constexpr (RELU) v = _mm256_max_ps(zero, v);
      _mm256_maskstore_ps(dst + o, ctail, v);
    }
  }
}

template <int NREG>
void gather_pixels_perm_avx2(const float* u, int64_t K, const int32_t* idx, const float* a, const float* b,
                             const float* res, float* out, int64_t C, int64_t m0, int64_t m1, bool relu) {
  if (res)
    relu ? gather_pixels_perm_avx2_t<NREG, true, true>(u, K, idx, a, b, res, out, C, m0, m1)
         : gather_pixels_perm_avx2_t<NREG, true, false>(u, K, idx, a, b, res, out, C, m0, m1);
  else
    relu ? gather_pixels_perm_avx2_t<NREG, false, true>(u, K, idx, a, b, res, out, C, m0, m1)
         : gather_pixels_perm_avx2_t<NREG, false, false>(u, K, idx, a, b, res, out, C, m0, m1);
}

// In place: rows r0..r7 (8 floats each) become their transpose (also used by conv_pixvec.h's tiles).
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], q[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    q[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    q[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    q[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    q[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x31);
  }
}

__attribute__((target("avx2,fma"))) void gather_pixels_trans_avx2(const float* __restrict u, int64_t K,
                                                                  const int32_t* __restrict idx,
                                                                  const float* __restrict a, const float* __restrict b,
                                                                  const float* __restrict res, float* __restrict out,
                                                                  int64_t C, int64_t m0, int64_t m1, bool relu) {
  alignas(32) float ut[kTransAvx2MaxK * 8];  // ut[k * 8 + p] = u[m + p, k]
  const int64_t kfull = K / 8 * 8, cfull = C / 8 * 8;
  const __m256i ktail = lane_mask(K - kfull);
  int64_t m = m0;
  for (; m + 8 <= m1; m += 8) {
    const float* src = u + m * K;
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      __m256 r[8];
      if (k0 < kfull) {
        for (int p = 0; p < 8; ++p) r[p] = _mm256_loadu_ps(src + p * K + k0);
      } else {  // the last K % 8 maps; the rows past K are never read (every index is < K)
        for (int p = 0; p < 8; ++p) r[p] = _mm256_maskload_ps(src + p * K + k0, ktail);
      }
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(ut + (k0 + j) * 8, r[j]);
    }
    float* dst = out + m * C;
    const float* rr = res ? res + m * C : nullptr;
    for (int64_t o = 0; o < cfull; o += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_load_ps(ut + static_cast<int64_t>(idx[o + j]) * 8);
      transpose8(r);  // r[p] = channels o..o+7 of pixel m + p
      const __m256 av = _mm256_loadu_ps(a + o), bv = _mm256_loadu_ps(b + o);
      for (int p = 0; p < 8; ++p) {
        __m256 v = _mm256_fmadd_ps(r[p], av, bv);
        if (rr) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + p * C + o));
        if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
        _mm256_storeu_ps(dst + p * C + o, v);
      }
    }
    for (int64_t o = cfull; o < C; ++o) {  // C % 8 channels
      const float* row = ut + static_cast<int64_t>(idx[o]) * 8;
      for (int p = 0; p < 8; ++p) {
        float v = row[p] * a[o] + b[o] + (rr ? rr[p * C + o] : 0.f);
        dst[p * C + o] = relu ? (v < 0.f ? 0.f : v) : v;
      }
    }
  }
  if (m < m1) gather_pixels(u, K, idx, a, b, res, out, C, m, m1, relu);
}

// The channels-last float32 gather copy for K maps under instruction set isa, chosen once per call:
// its name ("avx512_permute", "avx2_permute", "avx2_transpose" or "plain"; float64 always takes the plain
// loop) and its routine (the plain loop: gather_pixels_f32).  The permute copies are instantiated
// per register count: ceil(K / 32) register pairs on AVX-512, ceil(K / 8) registers on AVX2.
using GatherF32 = void (*)(const float*, int64_t, const int32_t*, const float*, const float*, const float*, float*,
                           int64_t, int64_t, int64_t, bool);
struct GatherCopy {
  const char* name;
  GatherF32 fn;
};

GatherCopy gather_copy(const std::string& isa, int64_t K, bool is_float) {
  if (K < 1 || !is_float || isa == "generic") return {"plain", gather_pixels_f32};  // callers reject K < 1 first
  if (isa == "avx512" && K <= kPermGatherMaxK) {
    static constexpr GatherF32 by_pairs[] = {gather_pixels_perm_f32_t<1>, gather_pixels_perm_f32_t<2>,
                                             gather_pixels_perm_f32_t<3>, gather_pixels_perm_f32_t<4>};
    static_assert(std::size(by_pairs) * 32 == kPermGatherMaxK, "one entry per 32 maps up to the limit");
    return {"avx512_permute", by_pairs[(K + 31) / 32 - 1]};
  }
  if (K <= kPermAvx2MaxK) {
    static constexpr GatherF32 by_regs[] = {gather_pixels_perm_avx2<1>, gather_pixels_perm_avx2<2>,
                                            gather_pixels_perm_avx2<3>, gather_pixels_perm_avx2<4>};
    static_assert(std::size(by_regs) * 8 == kPermAvx2MaxK, "one entry per 8 maps up to the limit");
    return {"avx2_permute", by_regs[(K + 7) / 8 - 1]};
  }
  if (K <= kTransAvx2MaxK) return {"avx2_transpose", gather_pixels_trans_avx2};
  return {"plain", gather_pixels_f32};
}


// Checks an int32 index array's range; returns it as a pointer into the (kept-alive) array.
const int32_t* checked_index(const py::array& index, const char* name, int64_t count, int64_t K) {
  if (!index.dtype().is(py::dtype::of<int32_t>()))
    throw py::value_error(std::string(name) + " must be int32, got " + std::string(py::str(index.dtype())));
  check_c_contiguous(index, name);
  if (index.size() != count)
    throw py::value_error(std::string(name) + " must have " + std::to_string(count) + " entries, got " +
                          std::to_string(index.size()));
  const int32_t* p = static_cast<const int32_t*>(index.data());
  for (int64_t i = 0; i < count; ++i) {
    if (p[i] < 0 || p[i] >= K)
      throw py::value_error(std::string(name) + " values must be in [0, " + std::to_string(K) + "), got " +
                            std::to_string(p[i]) + " at position " + std::to_string(i));
  }
  return p;
}

struct Epilogue {
  py::array residual;  // empty when none
  bool has_residual = false;
  bool relu = false;
};

int resolve_threads(int threads) {
  if (threads < 0) throw py::value_error("threads must be >= 0 (0 = all OpenMP threads), got " + std::to_string(threads));
  return threads == 0 ? omp_get_max_threads() : threads;
}

template <typename T>
void gather_epilogue_impl(const py::array& u, const int32_t* idx, const std::vector<T>& a, const std::vector<T>& b,
                          const Epilogue& ep, py::array& out, int nt) {
  const T* up = static_cast<const T*>(u.data());
  T* op = static_cast<T*>(out.mutable_data());
  const T* rp = ep.has_residual ? static_cast<const T*>(ep.residual.data()) : nullptr;
  const bool relu = ep.relu;
  if (u.ndim() == 3) {  // NCHW: u [N, K, S], out [N, C, S]
    const int64_t N = u.shape(0), K = u.shape(1), S = u.shape(2), C = out.shape(1);
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < N * C; ++r) {
      const int64_t n = r / C, o = r % C;
      const T* src = up + (n * K + idx[o]) * S;
      affine_row(src, rp ? rp + r * S : nullptr, op + r * S, S, a[o], b[o], relu);
    }
  } else {  // channels-last: u [M, K], out [M, C]
    const int64_t M = u.shape(0), K = u.shape(1), C = out.shape(1);
    const GatherF32 copy = gather_copy(pick_isa(), K, std::is_same_v<T, float>).fn;
    py::gil_scoped_release nogil;
    const int64_t block = 64;
    const int64_t nblocks = (M + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      const int64_t m0 = bi * block, m1 = std::min(M, m0 + block);
      if constexpr (std::is_same_v<T, float>)
        copy(up, K, idx, a.data(), b.data(), rp, op, C, m0, m1, relu);
      else
        gather_pixels(up, K, idx, a.data(), b.data(), rp, op, C, m0, m1, relu);
    }
  }
}

Epilogue make_epilogue(const py::object& residual, bool relu, const py::array& out) {
  Epilogue ep;
  ep.relu = relu;
  if (!residual.is_none()) {
    ep.residual = py::array::ensure(residual);
    if (!ep.residual) throw py::value_error("residual must be an array or None");
    if (!ep.residual.dtype().is(out.dtype()))
      throw py::value_error("residual must have the dtype of out, got " + std::string(py::str(ep.residual.dtype())));
    check_c_contiguous(ep.residual, "residual");
    if (ep.residual.ndim() != out.ndim())
      throw py::value_error("residual must have the shape of out " + shape_str(out) + ", got " + shape_str(ep.residual));
    for (py::ssize_t d = 0; d < out.ndim(); ++d)
      if (ep.residual.shape(d) != out.shape(d))
        throw py::value_error("residual must have the shape of out " + shape_str(out) + ", got " +
                              shape_str(ep.residual));
    ep.has_residual = true;
  }
  return ep;
}

void check_float_pair(const py::array& u, const char* uname, const py::array& out) {
  const bool f32 = u.dtype().is(py::dtype::of<float>()), f64 = u.dtype().is(py::dtype::of<double>());
  if (!f32 && !f64)
    throw py::value_error(std::string(uname) + " must be float32 or float64, got " + std::string(py::str(u.dtype())));
  if (!out.dtype().is(u.dtype()))
    throw py::value_error(std::string("out must have the dtype of ") + uname + ", got " +
                          std::string(py::str(out.dtype())));
  check_c_contiguous(u, uname);
  check_c_contiguous(out, "out");
  if (!out.writeable()) throw py::value_error("out must be writeable");
}

void gather_epilogue(py::array u, py::array index, py::object scale, py::object shift, py::object residual, bool relu,
                     py::array out, int threads) {
  const int nt = resolve_threads(threads);
  check_float_pair(u, "u", out);
  if (u.ndim() != 2 && u.ndim() != 3)
    throw py::value_error("u must be [N, K, S] (NCHW) or [M, K] (channels-last), got shape " + shape_str(u));
  check_ndim(out, "out", static_cast<int>(u.ndim()));
  const py::ssize_t C = out.shape(1), K = u.shape(1);
  check_dim(out, "out", 0, u.shape(0), u.ndim() == 3 ? "N" : "M");
  if (u.ndim() == 3) check_dim(out, "out", 2, u.shape(2), "S");
  if (K < 1) throw py::value_error("u must have K >= 1 channels, got shape " + shape_str(u));
  const int32_t* idx = checked_index(index, "index", C, K);
  Epilogue ep = make_epilogue(residual, relu, out);
  if (u.dtype().is(py::dtype::of<float>()))
    gather_epilogue_impl<float>(u, idx, affine_or<float>(scale, C, 1.f, "scale"),
                                affine_or<float>(shift, C, 0.f, "shift"), ep, out, nt);
  else
    gather_epilogue_impl<double>(u, idx, affine_or<double>(scale, C, 1.0, "scale"),
                                 affine_or<double>(shift, C, 0.0, "shift"), ep, out, nt);
}


// ---------------------------------------------------------------------------------------------
// Kernel granularity, fused direct kernel (inference): no depthwise maps in memory.
//   For a tile of output pixels and each input channel i: the M codebook responses of channel i
//   (p_i[j] = sum_t wt[i, t, j] * x[window tap t, i]) are computed in registers, then scattered into
//   the C_out accumulators through the slot table: acc[o] += p_i[slot[i, o]].
//   x: [N, H, W, C_in] (channels-last), out/residual: [N, Ho, Wo, C_out]; wt [C_in, T, M] and slot
//   [C_in, C_out] (values < M) come packed once per codebook (DirectPack, conv_kernel_pack).
// ---------------------------------------------------------------------------------------------
struct ConvGeom {
  int64_t N, H, W, Cin, Ho, Wo, C, kh, kw, sh, sw, ph, pw, dh, dw, M;
  int64_t c_lo = 0, c_hi = 0;  // the input channels a work item sums over: [0, Cin) or one part (set per item)
};

constexpr int kTile = 8;  // output pixels per tile (along W)

// Window values of input channel i for `np` pixels of one output row (zero outside the image).
template <typename T>
inline void window_values(const T* __restrict x, const ConvGeom& g, int64_t n, int64_t ho, int64_t wo0, int np,
                          int64_t i, T* __restrict xv /* [kTile][kh*kw] */) {
  const int64_t taps = g.kh * g.kw;
  for (int t = 0; t < np; ++t) {
    const int64_t wo = wo0 + t;
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t h = ho * g.sh - g.ph + a * g.dh;
      for (int64_t b = 0; b < g.kw; ++b) {
        const int64_t w = wo * g.sw - g.pw + b * g.dw;
        T v = T(0);
        if (h >= 0 && h < g.H && w >= 0 && w < g.W) v = x[((n * g.H + h) * g.W + w) * g.Cin + i];
        xv[t * taps + a * g.kw + b] = v;
      }
    }
  }
}

#define KC_DEFINE_DIRECT_GENERIC(T, SUFFIX)                                                                 \
  KC_CLONES void direct_tile_generic_##SUFFIX(const T* __restrict x, const T* __restrict wt,                \
                                              const int32_t* __restrict slot, const ConvGeom& g, int64_t n, \
                                              int64_t ho, int64_t wo0, int np, T* __restrict acc,           \
                                              T* __restrict xv, T* __restrict pv) {                         \
    const int64_t taps = g.kh * g.kw, M = g.M, C = g.C;                                                     \
    for (int64_t e = 0; e < kTile * C; ++e) acc[e] = T(0);                                                  \
    for (int64_t i = g.c_lo; i < g.c_hi; ++i) {                                                             \
      window_values(x, g, n, ho, wo0, np, i, xv);                                                           \
      const T* __restrict wi = wt + i * taps * M;                                                           \
      const int32_t* __restrict si = slot + i * C;                                                          \
      for (int t = 0; t < np; ++t) {                                                                        \
        T* __restrict p = pv;                                                                               \
        for (int64_t j = 0; j < M; ++j) p[j] = T(0);                                                        \
        for (int64_t k = 0; k < taps; ++k) {                                                                \
          const T xk = xv[t * taps + k];                                                                    \
          const T* __restrict wk = wi + k * M;                                                              \
          for (int64_t j = 0; j < M; ++j) p[j] += xk * wk[j];                                               \
        }                                                                                                   \
        T* __restrict at = acc + t * C;                                                                     \
        for (int64_t o = 0; o < C; ++o) at[o] += p[si[o]];                                                  \
      }                                                                                                     \
    }                                                                                                       \
  }

KC_DEFINE_DIRECT_GENERIC(float, f32)
KC_DEFINE_DIRECT_GENERIC(double, f64)

inline void direct_tile_generic(const float* x, const float* wt, const int32_t* slot, const ConvGeom& g, int64_t n,
                                int64_t ho, int64_t wo0, int np, float* acc, float* xv, float* pv) {
  direct_tile_generic_f32(x, wt, slot, g, n, ho, wo0, np, acc, xv, pv);
}
inline void direct_tile_generic(const double* x, const double* wt, const int32_t* slot, const ConvGeom& g, int64_t n,
                                int64_t ho, int64_t wo0, int np, double* acc, double* xv, double* pv) {
  direct_tile_generic_f64(x, wt, slot, g, n, ho, wo0, np, acc, xv, pv);
}

// Where window_block puts the window values of a channel block: xv[t * PS + a * RS + b * S + c] for
// pixel t, kernel row a, column b, channel c of the block.  S = 16 channels (C_in when C_in < 16); rows
// of few channels (the RGB stem's 7 x 3 floats) padded to RS = 32, so each is two aligned whole-vector
// stores (exact-length copies, a memcpy call or masked stores, cost more than the stem's responses on
// Zen 5, and overlapping wider stores stall the loads that read them back); else RS = kw * S.
struct WindowLayout {
  int64_t S, RS, PS;
};
inline WindowLayout window_layout(const ConvGeom& g) {
  const int64_t S = std::min<int64_t>(g.Cin, 16);
  const int64_t RS = S == g.Cin && g.kw >= 2 && g.kw * S <= 32 ? 32 : g.kw * S;  // kw >= 2: fits [kTile][taps][16]
  return {S, RS, g.kh * RS};
}

// The layout of x itself seen from the first of np consecutive output pixels of row (n, ho) from
// column wo0, when every tap of all of them lies inside the image: channel_responses then reads x in
// place (*base, channel 0) instead of a copy in xv.  False where a window crosses the border.
inline bool window_in_place(const float* x, const ConvGeom& g, int64_t n, int64_t ho, int64_t wo0, int np,
                            const float** base, WindowLayout* L) {
  const int64_t h0 = ho * g.sh - g.ph, w0 = wo0 * g.sw - g.pw, w1 = (wo0 + np - 1) * g.sw - g.pw;
  if (h0 < 0 || h0 + (g.kh - 1) * g.dh >= g.H || w0 < 0 || w1 + (g.kw - 1) * g.dw >= g.W) return false;
  *base = x + ((n * g.H + h0) * g.W + w0) * g.Cin;
  *L = {g.dw * g.Cin, g.dh * g.W * g.Cin, g.sw * g.Cin};
  return true;
}

// The responses of one input channel for NP pixels, NR blocks of 16 codebook maps, in registers:
// a[t][r][l] = sum_k xs[t * PS + a * RS + b * S] * w[k * Mpad + r * 16 + l], tap k = (a, b).  The
// pixels are independent FMA chains (one chain per pixel would wait on the FMA latency at every tap).
template <int NR, int NP>
__attribute__((target("avx512f"), always_inline)) inline void channel_responses(
    const float* __restrict xs, const WindowLayout& L, const ConvGeom& g, const float* __restrict w, int64_t Mpad,
    __m512 (&a)[NP][NR]) {
  for (int t = 0; t < NP; ++t)
    for (int r = 0; r < NR; ++r) a[t][r] = _mm512_setzero_ps();
  for (int64_t ka = 0; ka < g.kh; ++ka)
    for (int64_t kb = 0; kb < g.kw; ++kb) {
      const int64_t k = ka * g.kw + kb;
      const float* xk0 = xs + ka * L.RS + kb * L.S;
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_load_ps(w + k * Mpad + r * 16);
      for (int t = 0; t < NP; ++t) {
        const __m512 xk = _mm512_set1_ps(xk0[t * L.PS]);
        for (int r = 0; r < NR; ++r) a[t][r] = _mm512_fmadd_ps(xk, wv[r], a[t][r]);
      }
    }
}

// The window values of input channels [i, i + min(16, C_in - i)) for pixels t in [t0, t1) of the
// tile, laid out as L says (window_layout), zero outside the image.
__attribute__((target("avx512f"))) void window_block(const float* __restrict x, const ConvGeom& g,
                                                      const WindowLayout& L, int64_t n, int64_t ho, int64_t wo0,
                                                      int t0, int t1, int64_t i, float* __restrict xv) {
  const int64_t S = L.S, nb = std::min<int64_t>(16, g.Cin - i), len = g.kw * S;
  const float* xend = x + g.N * g.H * g.W * g.Cin;
  for (int t = t0; t < t1; ++t) {
    const int64_t wo = wo0 + t, w0 = wo * g.sw - g.pw;
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t h = ho * g.sh - g.ph + a * g.dh;
      float* drow = xv + t * L.PS + a * L.RS;
      if (!(h >= 0 && h < g.H)) {
        std::fill(drow, drow + len, 0.0f);
        continue;
      }
      const float* xrow = x + (n * g.H + h) * g.W * g.Cin + i;
      if (S == g.Cin && g.dw == 1 && w0 >= 0 && w0 + g.kw <= g.W) {
        const float* src = xrow + w0 * g.Cin;
        if (L.RS == 32) {  // a padded row: lanes past len carry whatever follows (never read)
          if (src + 32 <= xend) {
            _mm512_store_ps(drow, _mm512_loadu_ps(src));
            _mm512_store_ps(drow + 16, _mm512_loadu_ps(src + 16));
          } else {
            const __mmask16 m0 = len >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << len) - 1);
            const __mmask16 m1 = len > 16 ? __mmask16((1u << (len - 16)) - 1) : __mmask16(0);
            _mm512_store_ps(drow, _mm512_maskz_loadu_ps(m0, src));
            _mm512_store_ps(drow + 16, _mm512_maskz_loadu_ps(m1, src + 16));
          }
        } else {
          std::copy(src, src + len, drow);
        }
        continue;
      }
      for (int64_t b = 0; b < g.kw; ++b) {
        const int64_t w = w0 + b * g.dw;
        float* dst = drow + b * S;
        if (!(w >= 0 && w < g.W)) std::fill(dst, dst + S, 0.0f);
        else if (nb == 16) _mm512_store_ps(dst, _mm512_loadu_ps(xrow + w * g.Cin));
        else std::copy(xrow + w * g.Cin, xrow + w * g.Cin + nb, dst);  // a tail block: lanes >= nb unread
      }
    }
  }
}

// Up to 64 outputs and up to 32 maps per channel, 3x3 or smaller (resnet's first stage): the outputs
// of a group of PG pixels stay in NCH x PG registers across all input channels, so each
// (channel, 16 outputs, pixel) costs one permute and one add, no accumulator load or store.
// acc [kTile][Cpad] receives the sums.
template <int NCH, int NR>
__attribute__((target("avx512f"))) void direct_tile_regacc(const float* __restrict x, const float* __restrict wtp,
                                                            const int32_t* __restrict slotp, const ConvGeom& g,
                                                            int64_t Cpad, int64_t Mpad, int64_t n, int64_t ho,
                                                            int64_t wo0, int np, float* __restrict acc,
                                                            float* __restrict xv) {
  constexpr int PG = 8 * (NCH + NR) + NR + 2 <= 30 ? 8 : 4;  // pixels whose sums and responses fit in 32 registers
  const int64_t taps = g.kh * g.kw;
  const WindowLayout Lw = window_layout(g);
  for (int t0 = 0; t0 < np; t0 += PG) {
    const int t1 = std::min(np, t0 + PG);
    // a group whose windows all lie inside the image reads x where it is (window_in_place)
    WindowLayout L = Lw;
    const float* xin = nullptr;
    const bool in_place = t1 - t0 == PG && window_in_place(x, g, n, ho, wo0 + t0, PG, &xin, &L);
    __m512 A[PG][NCH];
    for (int p = 0; p < PG; ++p)
      for (int c = 0; c < NCH; ++c) A[p][c] = _mm512_setzero_ps();
    for (int64_t i = g.c_lo; i < g.c_hi; ++i) {
      const int64_t ii = i % 16;
      if (!in_place && ii == 0) window_block(x, g, L, n, ho, wo0, t0, t1, i, xv);
      // pixels past t1 read stale values; their sums are never stored
      const float* xs = in_place ? xin + i : xv + t0 * L.PS + ii;
      const float* wi = wtp + i * taps * Mpad;
      __m512 P[PG][NR];
      channel_responses<NR, PG>(xs, L, g, wi, Mpad, P);
      const int32_t* si = slotp + i * Cpad;
      for (int c = 0; c < NCH; ++c) {
        const __m512i ix = _mm512_load_si512(reinterpret_cast<const void*>(si + c * 16));
        for (int p = 0; p < PG; ++p) {
          const __m512 v = NR == 1 ? _mm512_permutexvar_ps(ix, P[p][0])
                                   : _mm512_permutex2var_ps(P[p][0], ix, P[p][NR - 1]);
          A[p][c] = _mm512_add_ps(A[p][c], v);
        }
      }
    }
    for (int p = 0; p < t1 - t0; ++p)
      for (int c = 0; c < NCH; ++c) _mm512_store_ps(acc + (t0 + p) * Cpad + c * 16, A[p][c]);
  }
}

// AVX-512 float32 tile for up to 32 maps and at most 64 outputs beyond 3x3 (the 7x7 stem; see
// make_direct_pack for where the pixel-lane path, conv_pixvec.h, runs instead): p_i stays in
// two registers per pixel and scatters with vpermt2ps.  acc is [kTile][Cpad], slot rows padded to Cpad
// (= C rounded up to 16) with valid slots.
__attribute__((target("avx512f"))) void direct_tile_avx512(const float* __restrict x, const float* __restrict wtp,
                                                            const int32_t* __restrict slotp, const ConvGeom& g,
                                                            int64_t Cpad, int64_t Mpad, int64_t n, int64_t ho,
                                                            int64_t wo0, int np, float* __restrict acc,
                                                            float* __restrict xv) {
  const int64_t taps = g.kh * g.kw, nch = Cpad / 16;
  // The first input channel stores its sums (no zeroing pass: GCC turned one into a memset call per
  // tile, 10% of the RGB stem's time); rows past np are zeroed, as the split-C_in sum adds them.
  for (int64_t e = np * Cpad; e < kTile * Cpad; e += 16) _mm512_store_ps(acc + e, _mm512_setzero_ps());
  // Input channels in blocks of S = 16 (S = C_in when C_in < 16, the RGB stem): the window values of
  // the block for every (pixel, tap) come in as one vector load each (channels-last rows are
  // contiguous), so the channel loop below reads its scalars from an L1 buffer xv (window_layout)
  // instead of gathering them one by one.  With S = C_in a window row (kw taps) is one or two moves.
  // A tile whose windows all lie inside the image (window_in_place) reads x where it is: no copy.
  WindowLayout L = window_layout(g);
  const float* xin = nullptr;
  const bool in_place = np == kTile && window_in_place(x, g, n, ho, wo0, kTile, &xin, &L);
  for (int64_t i = g.c_lo; i < g.c_hi; ++i) {
    const int64_t ii = i % 16;
    if (!in_place && ii == 0) window_block(x, g, L, n, ho, wo0, 0, np, i, xv);
    const float* xs = in_place ? xin + i : xv + ii;  // channel i
    const float* wi = wtp + i * taps * Mpad;  // [taps][Mpad], zero padded
    const int32_t* si = slotp + i * Cpad;
    // the responses stay in registers: lo/hi = maps 0-15 / 16-31 of each pixel
    __m512 lo[kTile], hi[kTile];
    if (Mpad > 16) {
      __m512 a[kTile][2];
      channel_responses<2, kTile>(xs, L, g, wi, Mpad, a);
      for (int t = 0; t < kTile; ++t) { lo[t] = a[t][0]; hi[t] = a[t][1]; }
    } else {
      __m512 a[kTile][1];
      channel_responses<1, kTile>(xs, L, g, wi, Mpad, a);
      for (int t = 0; t < kTile; ++t) { lo[t] = a[t][0]; hi[t] = _mm512_setzero_ps(); }
    }
    const bool first = i == g.c_lo;
    for (int64_t c = 0; c < nch; ++c) {
      const __m512i ix = _mm512_load_si512(reinterpret_cast<const void*>(si + c * 16));
      for (int t = 0; t < np; ++t) {
        float* a = acc + t * Cpad + c * 16;
        const __m512 v = _mm512_permutex2var_ps(lo[t], ix, hi[t]);
        _mm512_store_ps(a, first ? v : _mm512_add_ps(_mm512_load_ps(a), v));
      }
    }
  }
}

// The pixel-lane path (any M on AVX2; on AVX-512 see make_direct_pack): conv_pixvec.h, one copy per
// instruction set.
constexpr int kQuad = 4;  // input channels per scatter pass of the pixel-lane path
// Kernels of up to this many taps (3x3) take the short-kernel routines: regacc tiles, 8-pixel response
// chains; deeper ones (the 7x7 stem) the long ones.
constexpr int64_t kShortTaps = 9;
namespace pixvec_avx512 {
#define KC_PIXVEC_TARGET "avx2,fma,avx512f,avx512vl"
#define KC_PIXVEC_LANES 16
#include "conv_pixvec.h"
#undef KC_PIXVEC_LANES
#undef KC_PIXVEC_TARGET
}  // namespace pixvec_avx512
namespace pixvec_avx2 {
#define KC_PIXVEC_TARGET "avx2,fma"
#define KC_PIXVEC_LANES 8
#include "conv_pixvec.h"
#undef KC_PIXVEC_LANES
#undef KC_PIXVEC_TARGET
}  // namespace pixvec_avx2

template <typename T>
T* aligned_alloc_vec(std::vector<T>& v, size_t n) {  // 64-byte aligned view into v
  v.assign(n + 64 / sizeof(T), T(0));
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

// The codebook side of the direct kernel in the layout its tiles read, built once per codebook (the
// caller caches it): for the vector float32 paths wt is padded with zero maps to Mpad (a multiple of
// 16) and 64-byte aligned, and the slot rows are padded to Cpad (slot 0 in the pad; the pixel-lane
// path's table is its own, see conv_pixvec.h); elsewhere both are plain copies.  Built per call,
// this took a quarter of a batch-1 call on resnet18's deep layers.  The instruction set (pick_isa)
// is read when the pack is built: the pack's layout depends on it.
struct DirectPack {
  std::string isa;  // "avx512", "avx2" or "generic"
  bool f64 = false, fast = false, pixvec = false;  // fast: the AVX-512 register paths
  int tw = 8;  // pixels per tile of the pixel-lane path: 16 on AVX-512, and on AVX2 up to Mpad = 64
  int64_t Cin = 0, taps = 0, M = 0, C = 0, Cpad = 0, Mpad = 0;
  std::vector<float> wf_store;
  std::vector<double> wd_store;
  std::vector<int32_t> s_store;
  std::vector<uint16_t> s16_store;
  const void* w = nullptr;
  const int32_t* s = nullptr;
  const uint16_t* s16 = nullptr;  // the pixel-lane path's offsets where they fit in 16 bits (s is then null)

  DirectPack() = default;
  DirectPack(const DirectPack&) = delete;
  DirectPack& operator=(const DirectPack&) = delete;
};

template <typename T>
const T* pack_weights(const T* wp, DirectPack& pk, std::vector<T>& store) {
  T* w2 = aligned_alloc_vec(store, static_cast<size_t>(pk.Cin * pk.taps * pk.Mpad));
  for (int64_t i = 0; i < pk.Cin; ++i)
    for (int64_t k = 0; k < pk.taps; ++k)
      for (int64_t j = 0; j < pk.M; ++j) w2[(i * pk.taps + k) * pk.Mpad + j] = wp[(i * pk.taps + k) * pk.M + j];
  return w2;
}

std::unique_ptr<DirectPack> make_direct_pack(py::array wt, py::array slot) {
  const bool f32 = wt.dtype().is(py::dtype::of<float>());
  if (!f32 && !wt.dtype().is(py::dtype::of<double>()))
    throw py::value_error("wt must be float32 or float64, got " + std::string(py::str(wt.dtype())));
  check_c_contiguous(wt, "wt");
  check_ndim(wt, "wt", 3);
  check_ndim(slot, "slot", 2);
  auto pk = std::make_unique<DirectPack>();
  pk->f64 = !f32;
  pk->Cin = wt.shape(0);
  pk->taps = wt.shape(1);
  pk->M = wt.shape(2);
  pk->C = slot.shape(1);
  if (pk->Cin < 1 || pk->M < 1 || pk->taps < 1)
    throw py::value_error("wt must have C_in >= 1 channels, >= 1 taps and M >= 1 maps, got shape " + shape_str(wt));
  check_dim(slot, "slot", 0, pk->Cin, "C_in");
  const int32_t* sp = checked_index(slot, "slot", pk->Cin * pk->C, pk->M);
  pk->isa = pick_isa();
  pk->fast = f32 && pk->isa == "avx512";
  // AVX-512 keeps its register tiles (direct_tile_regacc, direct_tile_avx512) for at most 64 outputs and
  // up to 32 maps (3x3 and smaller: 9..32), where they beat the 16-lane pixel tiles; elsewhere the pixel
  // lanes win (Zen 5, batch 1 and 32, resnet18 shapes: 128 outputs at 16 / 32 maps 1.8x / 1.45x dense
  // against 1.4x / 1.25x; 64 outputs, 3x3, at 8 maps 1.65x / 1.35x against 1.5x / 1.2x; the 7x7 stem at
  // 8 maps 1.4x / 1.15x against 1.7x / 1.45x)
  pk->pixvec = f32 && (pk->isa == "avx2" || (pk->isa == "avx512" && (pk->M > 32 || pk->C > 64 ||
                                                                     (pk->M <= 8 && pk->taps <= kShortTaps))));
  const bool padded = pk->fast || pk->pixvec;
  pk->Cpad = padded ? (pk->C + 15) / 16 * 16 : pk->C;
  pk->Mpad = padded ? (pk->M + 15) / 16 * 16 : pk->M;
  // 16 KB of responses per quad at most on AVX2; AVX-512's 16 lanes make every tile 16 pixels
  pk->tw = pk->pixvec && (pk->isa == "avx512" || pk->Mpad <= 64) ? 16 : 8;
  if (f32) pk->w = pack_weights(static_cast<const float*>(wt.data()), *pk, pk->wf_store);
  else pk->w = pack_weights(static_cast<const double*>(wt.data()), *pk, pk->wd_store);
  if (pk->pixvec) {  // [C_in/4][Cpad][4]: offsets of the response vectors in pv (see conv_pixvec.h)
    const int64_t quads = (pk->Cin + kQuad - 1) / kQuad, pstride = pk->Mpad * pk->tw;
    if (kQuad * pstride > INT32_MAX) throw py::value_error("wt has too many maps per channel: M=" + std::to_string(pk->M));
    // 16-bit offsets up to Mpad = 2032 maps per channel with 8-pixel tiles, 1008 with 16-pixel ones
    const bool narrow = kQuad * pstride <= 0xFFFF;
    const size_t count = static_cast<size_t>(quads * pk->Cpad * kQuad);
    int32_t* s2 = narrow ? nullptr : aligned_alloc_vec(pk->s_store, count);
    uint16_t* s16 = narrow ? aligned_alloc_vec(pk->s16_store, count) : nullptr;
    for (int64_t i = 0; i < quads * kQuad; ++i)
      for (int64_t o = 0; o < pk->Cpad; ++o) {
        const int64_t slot = i < pk->Cin && o < pk->C ? sp[i * pk->C + o] : 0;
        const int64_t at = ((i / kQuad) * pk->Cpad + o) * kQuad + i % kQuad, off = (i % kQuad) * pstride + slot * pk->tw;
        if (narrow) s16[at] = static_cast<uint16_t>(off);
        else s2[at] = static_cast<int32_t>(off);
      }
    pk->s = s2;
    pk->s16 = s16;
  } else {  // [C_in][Cpad], slot 0 in the pad
    int32_t* s2 = aligned_alloc_vec(pk->s_store, static_cast<size_t>(pk->Cin * pk->Cpad));
    for (int64_t i = 0; i < pk->Cin; ++i)
      for (int64_t o = 0; o < pk->C; ++o) s2[i * pk->Cpad + o] = sp[i * pk->C + o];
    pk->s = s2;
  }
  return pk;
}

template <typename T>
void kernel_direct_impl(const py::array& x, const DirectPack& pk, const ConvGeom& g, const std::vector<T>& a,
                        const std::vector<T>& b, const Epilogue& ep, py::array& out, int nt) {
  const T* xp = static_cast<const T*>(x.data());
  T* op = static_cast<T*>(out.mutable_data());
  const T* rp = ep.has_residual ? static_cast<const T*>(ep.residual.data()) : nullptr;
  const bool relu = ep.relu;
  const int64_t taps = g.kh * g.kw;
  const bool fast = pk.fast, pixvec = pk.pixvec, pixvec512 = pk.isa == "avx512";
  const int tw = pixvec ? pk.tw : kTile;  // pixels per tile
  using RegAcc = void (*)(const float*, const float*, const int32_t*, const ConvGeom&, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int, float*, float*);
  RegAcc regacc = nullptr;  // see direct_tile_regacc
  // Off the pixel lanes an AVX-512 pack has at most 64 outputs and 32 maps (make_direct_pack); deeper taps
  // (the 7x7 stem) want all 8 pixels' chains of direct_tile_avx512.
  if (fast && !pixvec && taps <= kShortTaps) {
    const int nch = int((g.C + 15) / 16);  // 1..4
    if (g.M <= 16) regacc = nch == 1 ? direct_tile_regacc<1, 1> : nch == 2 ? direct_tile_regacc<2, 1>
                          : nch == 3 ? direct_tile_regacc<3, 1> : direct_tile_regacc<4, 1>;
    else regacc = nch == 1 ? direct_tile_regacc<1, 2> : nch == 2 ? direct_tile_regacc<2, 2>
                : nch == 3 ? direct_tile_regacc<3, 2> : direct_tile_regacc<4, 2>;
  }
  const int64_t Cpad = pk.Cpad, Mpad = pk.Mpad;
  const T* wuse = static_cast<const T*>(pk.w);
  const int32_t* suse = pk.s;
  // Tiles: kTile pixels of one output row, or for the pixel-lane path tw consecutive pixels of the
  // flattened output (see conv_pixvec.h)
  const int64_t tiles_w = (g.Wo + kTile - 1) / kTile, pixels = g.N * g.Ho * g.Wo;
  const int64_t tiles = pixvec ? (pixels + tw - 1) / tw : g.N * g.Ho * tiles_w;
  // Few tiles that do not divide among the threads (batch 1 on resnet18's 7x7 layers: 7 tiles for 2
  // threads) leave a thread idle for a whole tile.  There each tile's sum over C_in is split into up to
  // nt parts (boundaries on multiples of 16, as the AVX-512 window blocks read 16 channels at a time),
  // so the work divides evenly; a second pass adds the parts' partial sums and applies the epilogue.
  // Not where the rounding leaves a last part under half the others (C_in = 37 on 2 threads: 32 + 5,
  // worse than no split), nor where the partial sums would take more than 16 MB (many threads).
  const int64_t tile_elems = tw * Cpad;
  int64_t parts = 1, chunk = g.Cin;
  if (nt > 1 && tiles % nt != 0 && tiles < 8 * nt) {
    const int64_t c = ((g.Cin + nt - 1) / nt + 15) / 16 * 16, p = (g.Cin + c - 1) / c;
    if (p > 1 && g.Cin - (p - 1) * c >= c / 2 && tiles * p * tile_elems * int64_t(sizeof(T)) <= (int64_t(16) << 20)) {
      chunk = c;
      parts = p;
    }
  }
  // every slot is written before it is read: no fill
  std::unique_ptr<T[]> partial_s(parts > 1 ? new T[static_cast<size_t>(tiles * parts * tile_elems)] : nullptr);
  T* partial = partial_s.get();
  struct Tile {
    int64_t n, ho, wo0;  // a row tile's image, row and first column
    int64_t m0;          // its first pixel in the flattened output
    int np;
  };
  auto tile_at = [&](int64_t tile) {
    if (pixvec) {
      const int64_t m0 = tile * tw;
      return Tile{0, 0, 0, m0, static_cast<int>(std::min<int64_t>(tw, pixels - m0))};
    }
    const int64_t n = tile / (g.Ho * tiles_w), rem = tile % (g.Ho * tiles_w);
    const int64_t ho = rem / tiles_w, wo0 = (rem % tiles_w) * kTile;
    return Tile{n, ho, wo0, (n * g.Ho + ho) * g.Wo + wo0, static_cast<int>(std::min<int64_t>(kTile, g.Wo - wo0))};
  };
  auto store_rows = [&](const Tile& tl, const T* acc) {  // the epilogue of the tile's np pixels
    for (int t = 0; t < tl.np; ++t) {
      const int64_t m = tl.m0 + t;
      affine_row_vec(acc + t * Cpad, rp ? rp + m * g.C : nullptr, op + m * g.C, g.C, a.data(), b.data(), relu);
    }
  };
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> acc_s, xv_s, pv_s, acc2_s;
    std::vector<int64_t> off(static_cast<size_t>(tw * taps));
    T* acc = aligned_alloc_vec(acc_s, static_cast<size_t>(tile_elems));
    T* acc2 = pixvec ? aligned_alloc_vec(acc2_s, static_cast<size_t>(tile_elems)) : nullptr;
    // [kTile][taps][16]; pixvec [4][taps][tw] (tw <= 16)
    T* xv = aligned_alloc_vec(xv_s, static_cast<size_t>(kTile * taps * 16));
    T* pv = aligned_alloc_vec(pv_s, static_cast<size_t>(kQuad * tw * std::max<int64_t>(Mpad, 16)));  // pixvec: a quad
#pragma omp for schedule(static)
    for (int64_t wk = 0; wk < tiles * parts; ++wk) {
      // part-major: with the static schedule a thread keeps to one part, whose codebook rows it then
      // reads from its own cache tile after tile
      const int64_t tile = wk % tiles, part = wk / tiles;
      const Tile tl = tile_at(tile);
      ConvGeom gp = g;
      gp.c_lo = part * chunk;
      gp.c_hi = std::min(g.Cin, gp.c_lo + chunk);
      const int64_t n = tl.n, ho = tl.ho, wo0 = tl.wo0;
      const int np = tl.np;
      if constexpr (std::is_same_v<T, float>) {
        if (regacc) regacc(xp, wuse, suse, gp, Cpad, Mpad, n, ho, wo0, np, acc, xv);
        else if (pixvec) {
          const auto run_pixvec = [&](const auto* slots, auto nv) {
            using S = std::remove_cv_t<std::remove_pointer_t<decltype(slots)>>;
            constexpr int NV = decltype(nv)::value;
            if (pixvec512) {
              if constexpr (NV == 1)  // one vector of 16 pixels (see conv_pixvec.h)
                pixvec_avx512::direct_tile_pixvec<S, 1>(xp, wuse, slots, gp, Cpad, Mpad, tl.m0, np, acc2, acc, xv,
                                                        pv, off.data());
            } else
              pixvec_avx2::direct_tile_pixvec<S, NV>(xp, wuse, slots, gp, Cpad, Mpad, tl.m0, np, acc2, acc, xv, pv,
                                                     off.data());
          };
          using One = std::integral_constant<int, 1>;
          using Two = std::integral_constant<int, 2>;
          if (tw == 16 && !pixvec512) run_pixvec(pk.s16, Two{});  // AVX2, at most 64 maps: 16-bit offsets
          else if (pk.s16) run_pixvec(pk.s16, One{});  // a vector of 8 (AVX2) or 16 (AVX-512) pixels
          else run_pixvec(suse, One{});
        }
        else if (fast) direct_tile_avx512(xp, wuse, suse, gp, Cpad, Mpad, n, ho, wo0, np, acc, xv);
        else direct_tile_generic(xp, wuse, suse, gp, n, ho, wo0, np, acc, xv, pv);
      } else {
        direct_tile_generic(xp, wuse, suse, gp, n, ho, wo0, np, acc, xv, pv);
      }
      if (parts > 1) std::copy(acc, acc + tile_elems, partial + (tile * parts + part) * tile_elems);
      else store_rows(tl, acc);
    }
    if (parts > 1) {
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        T* p0 = partial + tile * parts * tile_elems;  // the parts summed into the first, in part order
        for (int64_t q = 1; q < parts; ++q)
          for (int64_t e = 0; e < tile_elems; ++e) p0[e] += p0[q * tile_elems + e];
        store_rows(tile_at(tile), p0);
      }
    }
  }
}

void kernel_direct(py::array x, const DirectPack& pk, std::vector<int64_t> geom, py::object scale,
                   py::object shift, py::object residual, bool relu, py::array out, int threads) {
  const int nt = resolve_threads(threads);
  check_float_pair(x, "x", out);
  if (x.dtype().is(py::dtype::of<double>()) != pk.f64)
    throw py::value_error(std::string("pack was built for ") + (pk.f64 ? "float64" : "float32") + " but x is " +
                          std::string(py::str(x.dtype())));
  check_ndim(x, "x", 4);
  check_ndim(out, "out", 4);
  if (geom.size() != 8) throw py::value_error("geom must be [kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w]");
  ConvGeom g{};
  g.N = x.shape(0); g.H = x.shape(1); g.W = x.shape(2); g.Cin = x.shape(3);
  g.kh = geom[0]; g.kw = geom[1]; g.sh = geom[2]; g.sw = geom[3]; g.ph = geom[4]; g.pw = geom[5];
  g.dh = geom[6]; g.dw = geom[7];
  if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.ph < 0 || g.pw < 0 || g.dh < 1 || g.dw < 1)
    throw py::value_error("geom has a non-positive kernel/stride/dilation or a negative padding");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  if (g.Ho < 1 || g.Wo < 1) throw py::value_error("x is too small for the kernel (empty output)");
  g.M = pk.M;
  g.C = pk.C;
  if (g.Cin != pk.Cin)
    throw py::value_error("x has " + std::to_string(g.Cin) + " channels but the pack has C_in=" + std::to_string(pk.Cin));
  if (g.kh * g.kw != pk.taps)
    throw py::value_error("geom has kh*kw=" + std::to_string(g.kh * g.kw) + " but the pack has " +
                          std::to_string(pk.taps) + " taps");
  check_dim(out, "out", 0, g.N, "N");
  check_dim(out, "out", 1, g.Ho, "H_out");
  check_dim(out, "out", 2, g.Wo, "W_out");
  check_dim(out, "out", 3, g.C, "C_out");
  Epilogue ep = make_epilogue(residual, relu, out);
  if (!pk.f64)
    kernel_direct_impl<float>(x, pk, g, affine_or<float>(scale, g.C, 1.f, "scale"),
                              affine_or<float>(shift, g.C, 0.f, "shift"), ep, out, nt);
  else
    kernel_direct_impl<double>(x, pk, g, affine_or<double>(scale, g.C, 1.0, "scale"),
                               affine_or<double>(shift, g.C, 0.0, "shift"), ep, out, nt);
}
}  // namespace

void register_conv(py::module_& m) {
  m.def("conv_gather_epilogue", &gather_epilogue, py::arg("u"), py::arg("index"), py::arg("scale"),
        py::arg("shift"), py::arg("residual"), py::arg("relu"), py::arg("out"), py::arg("threads") = 0,
        "out[n,o,s] = act(u[n,index[o],s]*scale[o]+shift[o] (+residual)); u [N,K,S] NCHW or [M,K] channels-last; "
        "index int32 [C_out]; writes out [N,C_out,S] / [M,C_out]");
  m.def("conv_gather_copy", [](int64_t K, const py::object& dtype) {
    if (K < 1) throw py::value_error("K must be >= 1, got " + std::to_string(K));
    const py::dtype dt = py::dtype::from_args(dtype);
    return std::string(gather_copy(pick_isa(), K, dt.is(py::dtype::of<float>())).name);
  }, py::arg("K"), py::arg("dtype"),
        "The copy conv_gather_epilogue takes for channels-last u with K maps under the current instruction "
        "set: avx512_permute, avx2_permute, avx2_transpose or plain");
  py::class_<DirectPack>(m, "ConvDirectPack",
                         "The codebook side of conv_kernel_direct in its native layout (build with conv_kernel_pack)")
      .def_property_readonly("shape", [](const DirectPack& p) { return py::make_tuple(p.Cin, p.taps, p.M, p.C); },
                             "(C_in, kh*kw, M, C_out)")
      .def_property_readonly("slot_bits", [](const DirectPack& p) { return p.s16 ? 16 : 32; },
                             "width of the stored slot offsets (16 where they fit the pixel-lane path's table)")
      .def_property_readonly("pixel_lanes", [](const DirectPack& p) { return p.pixvec; },
                             "whether calls take the pixel-lane path (float32: on AVX2 always; on AVX-512 with > 32 maps, "
                             "> 64 outputs, or <= 8 maps of a 3x3 or smaller kernel)")
      .def_property_readonly("tile_pixels", [](const DirectPack& p) { return p.pixvec ? p.tw : kTile; },
                             "output pixels per tile (16 on AVX-512's pixel-lane path and AVX2's up to 64 maps, else 8)")
      .def_property_readonly("isa", [](const DirectPack& p) { return p.isa; },
                             "the instruction set the pack was built for (kcengine's pick: best of the CPU, or "
                             "env KCENGINE_CPU_ISA)");
  m.def("conv_kernel_pack", &make_direct_pack, py::arg("wt"), py::arg("slot"),
        "Pack the codebook side of conv_kernel_direct once: wt [C_in,kh*kw,M] float32/float64 "
        "(wt[i,t,j] = codebook[slots[i,j],t]), slot int32 [C_in,C_out] (< M)");
  m.def("conv_kernel_direct", &kernel_direct, py::arg("x"), py::arg("pack"), py::arg("geom"),
        py::arg("scale"), py::arg("shift"), py::arg("residual"), py::arg("relu"), py::arg("out"),
        py::arg("threads") = 0,
        "Kernel-granularity conv without depthwise maps in memory: x [N,H,W,C_in] channels-last, pack from "
        "conv_kernel_pack, geom [kh,kw,sh,sw,ph,pw,dh,dw]; "
"writes out [N,H_out,W_out,C_out] = act(conv*scale+shift (+residual))");
}

}  // namespace kcengine
