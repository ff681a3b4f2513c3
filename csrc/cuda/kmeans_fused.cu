// Fused small-problem k-means: one thread block solves one job (problem, run) from seeding to
// inertia in shared memory - greedy k-means++ / random / given start, Lloyd iterations (assign,
// accumulate, update, convergence test, empty-cluster repair), final E-step, inertia.  A launch
// holds thousands of jobs; nothing returns to the host between iterations.
//
// Semantics and arithmetic follow the cpu backend (csrc/cpu/kmeans/solver.cpp, solve_direct):
// distances ||c||^2 - 2 x.c in T with the dot accumulated in order of the features, first index
// of the minimum; cluster sums in double accumulated in point order (as the cpu core for N <= 4096);
// relocation of empty clusters to the farthest points; strict convergence when no label changes.
//
// Shared memory layout (kcengine.kmeans.backends.cuda.fused_smem_bytes computes the same size):
//   double: sums[k*d] wsum[k] aux[n] red[blockDim] scratch[8]
//   T:      X[n*d] C[k*d] cn[k]
//   int:    lab[n] picked[k] redi[blockDim]
// Job metadata: meta[job * 8 + {0..7}] = xoff roff loff coff n d k run (element/row offsets).
#include "kmeans_common.cuh"

namespace kc {

enum { kInitGiven = 0, kInitKMeansPP = 1, kInitRandom = 2 };
enum { kScratchShift = 0, kScratchFlag = 1, kScratchTotal = 2, kScratchStop = 3, kScratchEmpty = 4,
       kScratchAccept = 5, kScratchNone = 6, kScratchPick = 7 };

template <class T>
struct FusedLayout {
  double *sums, *wsum, *aux, *red, *scratch;
  T *X, *C, *cn;
  int *lab, *picked, *redi;
  __device__ FusedLayout(unsigned char* base, i64 n, i64 d, i64 k) {
    double* p = reinterpret_cast<double*>(base);
    sums = p; p += k * d;
    wsum = p; p += k;
    aux = p; p += n;
    red = p; p += blockDim.x;
    scratch = p; p += 8;
    T* q = reinterpret_cast<T*>(p);
    X = q; q += n * d;
    C = q; q += k * d;
    cn = q; q += k;
    int* r = reinterpret_cast<int*>(q);
    lab = r; r += n;
    picked = r; r += k;
    redi = r;
  }
};

// Contiguous chunk of points of thread tid (for prefix searches in point order).
__device__ inline void my_chunk(i64 n, i64* i0, i64* i1) {
  const i64 ch = (n + blockDim.x - 1) / blockDim.x;
  *i0 = ch * threadIdx.x < n ? ch * threadIdx.x : n;
  *i1 = *i0 + ch < n ? *i0 + ch : n;
}

// Weight of point i for a prefix search: 0 = w, 1 = w * aux, 2 = w if not taken (lab == 0).
template <class T>
__device__ inline double search_value(int mode, i64 i, const T* W, const FusedLayout<T>& L) {
  const double w = double(W[i]);
  if (mode == 0) return w;
  if (mode == 1) return w * L.aux[i];
  return L.lab[i] == 0 ? w : 0.0;
}

// Per-thread chunk sums into red[]; returns the total (summed in chunk order by every thread).
template <class T>
__device__ inline double chunk_sums(int mode, i64 n, const T* W, FusedLayout<T>& L) {
  i64 i0, i1;
  my_chunk(n, &i0, &i1);
  double s = 0;
  for (i64 i = i0; i < i1; ++i) s += search_value(mode, i, W, L);
  __syncthreads();
  L.red[threadIdx.x] = s;
  __syncthreads();
  double tot = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) tot += L.red[t];
  return tot;
}

// Thread 0 only, after chunk_sums: first point whose running sum exceeds r, clamped to n - 1.
template <class T>
__device__ inline i64 search_prefix(int mode, i64 n, double r, const T* W, const FusedLayout<T>& L) {
  const i64 ch = (n + blockDim.x - 1) / blockDim.x;
  double acc = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) {
    if (acc + L.red[t] > r) {
      const i64 i0 = ch * t, i1 = i0 + ch < n ? i0 + ch : n;
      for (i64 i = i0; i < i1; ++i) {
        acc += search_value(mode, i, W, L);
        if (acc > r) return i;
      }
      return i1 - 1 < n - 1 ? i1 - 1 : n - 1;
    }
    acc += L.red[t];
  }
  return n - 1;
}

// Squared distance (difference form, accumulated in T as the cpu core's k-means++ pass).
template <class T>
__device__ inline T sqdist_t(const T* a, const T* b, i64 d) {
  T s = T(0);
  for (i64 q = 0; q < d; ++q) {
    const T u = a[q] - b[q];
    s += u * u;
  }
  return s;
}

template <class T>
__device__ inline double sqdist_d(const T* a, const T* b, i64 d) {
  double s = 0;
  for (i64 q = 0; q < d; ++q) {
    const double u = double(a[q]) - double(b[q]);
    s += u * u;
  }
  return s;
}

template <class T>
__device__ void refresh_norms(FusedLayout<T>& L, i64 k, i64 d) {
  for (i64 j = threadIdx.x; j < k; j += blockDim.x) {
    double s = 0;
    for (i64 q = 0; q < d; ++q) s += double(L.C[j * d + q]) * double(L.C[j * d + q]);
    L.cn[j] = T(s);
  }
}

// E-step: labels of all points; sets scratch[kScratchFlag] when a label changed.
template <class T>
__device__ void e_step(FusedLayout<T>& L, i64 n, i64 d, i64 k) {
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
    const T* x = L.X + i * d;
    T m = kc_inf<T>();
    int b = 0;
    for (i64 j = 0; j < k; ++j) {
      const T* c = L.C + j * d;
      T acc = T(0);
      for (i64 q = 0; q < d; ++q) acc += x[q] * c[q];
      const T dist = L.cn[j] - T(2) * acc;
      if (dist < m) { m = dist; b = int(j); }
    }
    if (L.lab[i] != b) L.scratch[kScratchFlag] = 1.0;
    L.lab[i] = b;
  }
}

template <class T>
__device__ void kmeanspp(const T* W, FusedLayout<T>& L, i64 n, i64 d, i64 k, Rng& rng) {
  const int tid = threadIdx.x;
  // first center: drawn by weight
  double tot = chunk_sums(0, n, W, L);
  if (tid == 0) L.scratch[kScratchPick] = double(search_prefix(0, n, rng.uniform() * tot, W, L));
  __syncthreads();
  i64 c0 = i64(L.scratch[kScratchPick]);
  for (i64 i = tid; i < n; i += blockDim.x) L.aux[i] = double(sqdist_t(L.X + i * d, L.X + c0 * d, d));
  for (i64 q = tid; q < d; q += blockDim.x) L.C[q] = L.X[c0 * d + q];
  const int trials = kpp_trials(k);
  for (i64 c = 1; c < k; ++c) {
    __syncthreads();
    tot = chunk_sums(1, n, W, L);
    if (tid == 0)
      for (int t = 0; t < trials; ++t) L.picked[t] = int(search_prefix(1, n, rng.uniform() * tot, W, L));
    __syncthreads();
    double best_pot = 0;
    int best = 0;
    for (int t = 0; t < trials; ++t) {
      const i64 ci = L.picked[t];
      double pot = 0;
      for (i64 i = tid; i < n; i += blockDim.x) {
        const double v = double(sqdist_t(L.X + i * d, L.X + ci * d, d));
        pot += double(W[i]) * (v < L.aux[i] ? v : L.aux[i]);
      }
      pot = block_sum(pot, L.red);
      if (t == 0 || pot < best_pot) { best_pot = pot; best = t; }
    }
    const i64 cb = L.picked[best];
    for (i64 i = tid; i < n; i += blockDim.x) {
      const double v = double(sqdist_t(L.X + i * d, L.X + cb * d, d));
      if (v < L.aux[i]) L.aux[i] = v;
    }
    for (i64 q = tid; q < d; q += blockDim.x) L.C[c * d + q] = L.X[cb * d + q];
  }
  __syncthreads();
}

template <class T>
__device__ void random_init(const T* W, FusedLayout<T>& L, i64 n, i64 d, i64 k, Rng& rng) {
  const int tid = threadIdx.x;
  for (i64 i = tid; i < n; i += blockDim.x) L.lab[i] = 0;  // 0 = not taken
  i64 n_left = -1, t_left = 0;  // thread 0's: the zero-weight draws' list (in aux) and how many it gave
  for (i64 c = 0; c < k; ++c) {
    __syncthreads();
    const double tot = chunk_sums(2, n, W, L);
    if (tid == 0) {
      const double u = rng.uniform();
      i64 pick = -1;
      if (tot > 0) {
        const double r = u * tot;
        double acc = 0;
        for (i64 i = 0; i < n; ++i) {  // the cpu core's loop: last eligible point if none exceeds r
          if (L.lab[i] != 0 || double(W[i]) <= 0) continue;
          acc += double(W[i]);
          pick = i;
          if (acc > r) break;
        }
      } else {  // only zero-weight points left: the cpu core's partial Fisher-Yates over the untaken points
        if (n_left < 0) {  // (taking the r-th untaken point in index order parted from it at the second draw)
          n_left = 0;
          for (i64 i = 0; i < n; ++i)
            if (L.lab[i] == 0) L.aux[n_left++] = double(i);  // aux is free until the first repair
        }
        i64 r = i64(u * double(n_left - t_left));
        if (r > n_left - 1 - t_left) r = n_left - 1 - t_left;
        r += t_left;
        const double swap = L.aux[t_left];
        L.aux[t_left] = L.aux[r];
        L.aux[r] = swap;
        pick = i64(L.aux[t_left++]);
      }
      L.lab[pick] = 1;
      L.scratch[kScratchPick] = double(pick);
    }
    __syncthreads();
    const i64 p = i64(L.scratch[kScratchPick]);
    for (i64 q = tid; q < d; q += blockDim.x) L.C[c * d + q] = L.X[p * d + q];
  }
  __syncthreads();
}

// A distance with the low 20 of its 52 mantissa bits cleared (the cpu core's round_low_bits): the
// relocation's key, so that distances equal to about 32 bits tie and go by index.
__device__ inline double kc_round_low_bits(double x) {
  return __longlong_as_double(__double_as_longlong(x) & ~0xFFFFFll);
}

// Empty clusters take the farthest points (cpu core's relocate): candidates in order of
// decreasing distance to their own (old) center, distances equal to about 32 bits tied and taken
// by index; a candidate is consumed whether or not it is taken.  aux[i] holds that distance.
template <class T>
__device__ void relocate(const T* W, FusedLayout<T>& L, i64 n, i64 d, i64 k) {
  const int tid = threadIdx.x;
  double last_key = kc_inf<double>();
  int last_idx = -1;
  int n_picked = 0;
  for (i64 e = 0; e < k; ++e) {
    if (!(L.wsum[e] <= 0)) continue;  // block-uniform: wsum is only written between barriers
    bool stop_all = false;
    while (true) {
      double key = -1.0;
      int idx = -1;
      for (i64 i = tid; i < n; i += blockDim.x) {
        const double v = kc_round_low_bits(L.aux[i]);
        if (!(double(W[i]) > 0) || !(v > 0)) continue;
        if (!(v < last_key || (v == last_key && int(i) > last_idx))) continue;
        if (idx < 0 || v > key) { key = v; idx = int(i); }  // i increasing: ties keep the smaller
      }
      double bk;
      int bi;
      block_argmax(key, idx, L.red, L.redi, &bk, &bi);
      if (bi < 0) { stop_all = true; break; }
      last_key = bk;
      last_idx = bi;
      const double wi = double(W[bi]);
      const int from = L.lab[bi];
      // The source cluster must keep a member of positive weight: counted, as the cpu core and the packed path
      // do, not read off wsum[from] - wi (a difference of float sums: weights 0.1, 0.2, 0.3 taken one by one
      // leave about 1e-16, so the last member went and the cluster's centroid became leftover sums divided by
      // a leftover weight; weights 1 and 1e-17 leave 0 and refused a valid point).  Labels are not moved by the
      // repair, so the points taken from `from` so far are the picked ones labelled `from`.
      double members = 0;
      for (i64 i = tid; i < n; i += blockDim.x) members += (L.lab[i] == from && double(W[i]) > 0) ? 1.0 : 0.0;
      members = block_sum(members, L.red);  // block-uniform: `from` is
      for (int q = 0; q < n_picked; ++q) members -= L.lab[L.picked[q]] == from ? 1.0 : 0.0;
      bool ok = members > 1;
      for (int q = 0; ok && q < n_picked; ++q) {
        bool same = true;
        for (i64 t = 0; t < d; ++t)
          if (!(L.X[i64(L.picked[q]) * d + t] == L.X[i64(bi) * d + t])) { same = false; break; }
        if (same) ok = false;
      }
      if (!ok) continue;
      for (i64 t = tid; t < d; t += blockDim.x) {
        const double xv = double(L.X[i64(bi) * d + t]);
        L.sums[i64(from) * d + t] -= wi * xv;
        L.sums[e * d + t] = wi * xv;
      }
      __syncthreads();
      if (tid == 0) {
        L.wsum[from] -= wi;
        L.wsum[e] = wi;
        L.picked[n_picked] = bi;
      }
      ++n_picked;
      __syncthreads();
      break;
    }
    if (stop_all) break;
  }
  __syncthreads();
}

template <class T>
__device__ void fused_job(const T* __restrict__ X, const T* __restrict__ Wg, const i64* meta, double tol_abs,
                          const T* __restrict__ init_c, int init_kind, int max_iter, u64 seed, T* c_out,
                          i64* lab_out, double* inertia_out, int* n_iter_out, unsigned char* conv_out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const i64 xoff = meta[0], roff = meta[1], loff = meta[2], coff = meta[3];
  const i64 n = meta[4], d = meta[5], k = meta[6], run = meta[7];
  FusedLayout<T> L(smem, n, d, k);
  const T* W = Wg + roff;
  for (i64 e = tid; e < n * d; e += blockDim.x) L.X[e] = X[xoff + e];
  __syncthreads();
  Rng rng(seed, u64(run));  // used by thread 0 only
  if (init_kind == kInitGiven) {
    for (i64 e = tid; e < k * d; e += blockDim.x) L.C[e] = init_c[coff + e];
  } else if (init_kind == kInitKMeansPP) {
    kmeanspp(W, L, n, d, k, rng);
  } else {
    random_init(W, L, n, d, k, rng);
  }
  for (i64 i = tid; i < n; i += blockDim.x) L.lab[i] = -1;
  __syncthreads();
  refresh_norms(L, k, d);
  bool strict = false;
  int it = 0;
  for (it = 0; it < max_iter; ++it) {
    if (tid == 0) L.scratch[kScratchFlag] = 0.0;
    __syncthreads();
    e_step(L, n, d, k);
    __syncthreads();
    // M-step: item (j, q), q == d for the weight; sums in point order (deterministic)
    for (i64 item = tid; item < k * (d + 1); item += blockDim.x) {
      const i64 j = item / (d + 1), q = item % (d + 1);
      double s = 0;
      for (i64 i = 0; i < n; ++i)
        if (L.lab[i] == int(j)) s += q == d ? double(W[i]) : double(W[i]) * double(L.X[i * d + q]);
      if (q == d) L.wsum[j] = s;
      else L.sums[j * d + q] = s;
    }
    __syncthreads();
    int n_empty = 0;
    for (i64 j = 0; j < k; ++j) n_empty += L.wsum[j] <= 0;
    if (n_empty > 0) {
      for (i64 i = tid; i < n; i += blockDim.x) L.aux[i] = sqdist_d(L.X + i * d, L.C + i64(L.lab[i]) * d, d);
      __syncthreads();
      relocate(W, L, n, d, k);
    }
    double shift = 0;
    for (i64 e = tid; e < k * d; e += blockDim.x) {
      const i64 j = e / d;
      const T old = L.C[e];
      const T nv = L.wsum[j] > 0 ? T(L.sums[e] / L.wsum[j]) : old;
      const double u = double(nv) - double(old);
      shift += u * u;
      L.C[e] = nv;
    }
    shift = block_sum(shift, L.red);
    refresh_norms(L, k, d);
    const bool unchanged = L.scratch[kScratchFlag] == 0.0;
    __syncthreads();
    if (unchanged) { strict = n_empty == 0; break; }
    if (shift <= tol_abs) break;
  }
  const bool converged = it < max_iter;
  if (!strict) {
    __syncthreads();
    e_step(L, n, d, k);
  }
  __syncthreads();
  double inertia = 0;
  for (i64 i = tid; i < n; i += blockDim.x)
    inertia += double(W[i]) * sqdist_d(L.X + i * d, L.C + i64(L.lab[i]) * d, d);
  inertia = block_sum(inertia, L.red);
  for (i64 e = tid; e < k * d; e += blockDim.x) c_out[coff + e] = L.C[e];
  for (i64 i = tid; i < n; i += blockDim.x) lab_out[loff + i] = L.lab[i];
  if (tid == 0) {
    *inertia_out = inertia;
    *n_iter_out = it + 1 < max_iter ? it + 1 : max_iter;
    *conv_out = converged ? 1 : 0;
  }
}

}  // namespace kc

// One block per job of `jobs`; blockDim.x a power of two (64..256).
#define KC_FUSED(NAME, T)                                                                                    \
  extern "C" __global__ void NAME(const T* X, const T* W, const long long* meta, const double* tol_abs,      \
                                  const T* init_c, const long long* jobs, int init_kind, int max_iter,       \
                                  unsigned long long seed, T* c_out, long long* lab_out, double* inertia,    \
                                  int* n_iter, unsigned char* converged) {                                   \
    const long long j = jobs[blockIdx.x];                                                                    \
    kc::fused_job<T>(X, W, meta + 8 * j, tol_abs[j], init_c, init_kind, max_iter, seed, c_out, lab_out,      \
                     inertia + j, n_iter + j, converged + j);                                                \
  }

KC_FUSED(kc_kmeans_fused_f32, float)
KC_FUSED(kc_kmeans_fused_f64, double)
