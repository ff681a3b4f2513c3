// k-means kernels for problems too large for the fused kernel, on a packed ragged batch
// (kcengine.kmeans.backends.cuda.Packed); the host drives the Lloyd iterations.  Every kernel
// skips jobs whose mask is 0, so converged problems cost one load per block.
//
//   kc_assign_*      tiled assignment: a block takes KC_BN points of one job; centroids stream
//                    through shared memory in KC_KT x KC_DT tiles; dist = ||c||^2 - 2 x.c (dot in T,
//                    features in order, as the cpu core), fused with the running argmin (first
//                    minimum).  No N x k distance matrix exists anywhere.
//   kc_segment_sum_* segmented accumulation: points sorted by cluster (order[]); a block owns one
//                    cluster and KC_SD features, 8 lanes stride the members, lanes are combined in a
//                    fixed order: float64 sums, the same bits every run.
//   kc_kpp_pass_*    k-means++ candidate pass: out[t, j, i] = min(||x_i - x_cand(j,t)||^2, closest[j, i]).
//   kc_sqdist_*      w_i ||x_i - c_{lab_i}||^2 in float64 (inertia).
#include "kmeans_common.cuh"

#define KC_BN 128  // points per assign block (= threads)
#define KC_KT 32   // centroids per shared tile
#define KC_DT 32   // features per shared tile
#define KC_SD 32   // features per segment-sum block
#define KC_SL 8    // member lanes per segment-sum block (blockDim = KC_SD * KC_SL)

namespace kc {

template <class T>
__device__ void assign_tile(const T* __restrict__ X, const T* __restrict__ C, const T* __restrict__ cn, int* lab,
                            const unsigned char* mask, const i64* tile_job, const i64* tile_row0, const i64* xoff,
                            const i64* loff, const i64* coff, const i64* goff, const i64* nn, const i64* dd,
                            const i64* kk) {
  __shared__ T xs[KC_BN][KC_DT + 1];
  __shared__ T cs[KC_KT][KC_DT + 1];
  const i64 job = tile_job[blockIdx.x];
  if (!mask[job]) return;
  const int tid = threadIdx.x;
  const i64 row0 = tile_row0[blockIdx.x], n = nn[job], d = dd[job], k = kk[job];
  const T* Xj = X + xoff[job];
  const T* Cj = C + coff[job];
  const i64 i = row0 + tid;
  T best = kc_inf<T>();
  int bidx = 0;
  for (i64 k0 = 0; k0 < k; k0 += KC_KT) {
    T acc[KC_KT];
#pragma unroll
    for (int c = 0; c < KC_KT; ++c) acc[c] = T(0);
    for (i64 d0 = 0; d0 < d; d0 += KC_DT) {
      __syncthreads();
      for (int e = tid; e < KC_BN * KC_DT; e += KC_BN) {
        const int r = e / KC_DT, q = e % KC_DT;
        const i64 gi = row0 + r, gq = d0 + q;
        xs[r][q] = (gi < n && gq < d) ? Xj[gi * d + gq] : T(0);
      }
      for (int e = tid; e < KC_KT * KC_DT; e += KC_BN) {
        const int r = e / KC_DT, q = e % KC_DT;
        const i64 gc = k0 + r, gq = d0 + q;
        cs[r][q] = (gc < k && gq < d) ? Cj[gc * d + gq] : T(0);
      }
      __syncthreads();
      const int qn = d - d0 < KC_DT ? int(d - d0) : KC_DT;
      for (int q = 0; q < qn; ++q) {
        const T xv = xs[tid][q];
#pragma unroll
        for (int c = 0; c < KC_KT; ++c) acc[c] += xv * cs[c][q];
      }
    }
    const T* cnj = cn + goff[job];
#pragma unroll
    for (int c = 0; c < KC_KT; ++c) {
      if (k0 + c < k) {
        const T dist = cnj[k0 + c] - T(2) * acc[c];
        if (dist < best) { best = dist; bidx = int(k0 + c); }
      }
    }
  }
  if (i < n) lab[loff[job] + i] = bidx;
}

template <class T>
__device__ void segment_sum(const T* __restrict__ X, const T* __restrict__ W, const i64* order, const i64* seg_start,
                            const i64* counts, const unsigned char* gmask, const i64* g_job, const i64* g_coff,
                            const i64* xoff, const i64* roff, const i64* loff, const i64* dd, double* sums,
                            double* wsum) {
  __shared__ double part[KC_SL][KC_SD + 1];
  __shared__ double wpart[KC_SL];
  const i64 g = blockIdx.x;
  const i64 job = g_job[g];
  const i64 d = dd[job];
  const i64 q0 = i64(blockIdx.y) * KC_SD;
  if (!gmask[g] || q0 >= d) return;
  const int qd = threadIdx.x % KC_SD, lane = threadIdx.x / KC_SD;
  const i64 q = q0 + qd, start = seg_start[g], cnt = counts[g];
  const T* Xj = X + xoff[job];
  const T* Wj = W + roff[job];
  const i64 l0 = loff[job];
  double s = 0, ws = 0;
  for (i64 m = lane; m < cnt; m += KC_SL) {
    const i64 row = order[start + m] - l0;
    const double w = double(Wj[row]);
    if (q < d) s += w * double(Xj[row * d + q]);
    ws += w;
  }
  part[lane][qd] = s;
  if (qd == 0) wpart[lane] = ws;
  __syncthreads();
  if (lane == 0) {
    double t = 0;
    for (int l = 0; l < KC_SL; ++l) t += part[l][qd];
    if (q < d) sums[g_coff[g] + q] = t;
    if (qd == 0 && blockIdx.y == 0) {
      double tw = 0;
      for (int l = 0; l < KC_SL; ++l) tw += wpart[l];
      wsum[g] = tw;
    }
  }
}

template <class T>
__device__ void kpp_pass(const T* __restrict__ X, const i64* cand, const double* closest, double* out,
                         const unsigned char* live, const i64* tile_job, const i64* tile_row0, const i64* xoff,
                         const i64* nn, const i64* dd, i64 cand_stride, i64 nmax, i64 n_jobs) {
  const i64 job = tile_job[blockIdx.x];
  if (!live[job]) return;
  const i64 t = blockIdx.y;
  const i64 i = tile_row0[blockIdx.x] + threadIdx.x, n = nn[job], d = dd[job];
  if (i >= n) return;
  const T* Xj = X + xoff[job];
  const T* xc = Xj + cand[job * cand_stride + t] * d;
  const T* xi = Xj + i * d;
  T s = T(0);
  for (i64 q = 0; q < d; ++q) {
    const T u = xi[q] - xc[q];
    s += u * u;
  }
  const double v = double(s), cl = closest[job * nmax + i];
  out[(t * n_jobs + job) * nmax + i] = v < cl ? v : cl;
}

template <class T>
__device__ void sqdist(const T* __restrict__ X, const T* __restrict__ W, const T* __restrict__ C, const int* lab,
                       double* out, const i64* tile_job, const i64* tile_row0, const i64* xoff, const i64* roff,
                       const i64* loff, const i64* coff, const i64* nn, const i64* dd) {
  const i64 job = tile_job[blockIdx.x];
  const i64 i = tile_row0[blockIdx.x] + threadIdx.x, n = nn[job], d = dd[job];
  if (i >= n) return;
  const T* xi = X + xoff[job] + i * d;
  const T* c = C + coff[job] + i64(lab[loff[job] + i]) * d;
  double s = 0;
  for (i64 q = 0; q < d; ++q) {
    const double u = double(xi[q]) - double(c[q]);
    s += u * u;
  }
  out[loff[job] + i] = double(W[roff[job] + i]) * s;
}

}  // namespace kc

#define KC_LARGE(SUFFIX, T)                                                                                      \
  extern "C" __global__ void __launch_bounds__(KC_BN) kc_assign_##SUFFIX(                                       \
      const T* X, const T* C, const T* cn, int* lab, const unsigned char* mask, const long long* tile_job,       \
      const long long* tile_row0, const long long* xoff, const long long* loff, const long long* coff,           \
      const long long* goff, const long long* n, const long long* d, const long long* k) {                       \
    kc::assign_tile<T>(X, C, cn, lab, mask, tile_job, tile_row0, xoff, loff, coff, goff, n, d, k);               \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(KC_SD * KC_SL) kc_segment_sum_##SUFFIX(                          \
      const T* X, const T* W, const long long* order, const long long* seg_start, const long long* counts,       \
      const unsigned char* gmask, const long long* g_job, const long long* g_coff, const long long* xoff,        \
      const long long* roff, const long long* loff, const long long* d, double* sums, double* wsum) {            \
    kc::segment_sum<T>(X, W, order, seg_start, counts, gmask, g_job, g_coff, xoff, roff, loff, d, sums, wsum);   \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(KC_BN) kc_kpp_pass_##SUFFIX(                                     \
      const T* X, const long long* cand, const double* closest, double* out, const unsigned char* live,          \
      const long long* tile_job, const long long* tile_row0, const long long* xoff, const long long* n,          \
      const long long* d, long long cand_stride, long long nmax, long long n_jobs) {                             \
    kc::kpp_pass<T>(X, cand, closest, out, live, tile_job, tile_row0, xoff, n, d, cand_stride, nmax, n_jobs);    \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(KC_BN) kc_sqdist_##SUFFIX(                                       \
      const T* X, const T* W, const T* C, const int* lab, double* out, const long long* tile_job,                \
      const long long* tile_row0, const long long* xoff, const long long* roff, const long long* loff,           \
      const long long* coff, const long long* n, const long long* d) {                                           \
    kc::sqdist<T>(X, W, C, lab, out, tile_job, tile_row0, xoff, roff, loff, coff, n, d);                         \
  }

KC_LARGE(f32, float)
KC_LARGE(f64, double)
