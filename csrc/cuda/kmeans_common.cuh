// Shared pieces of the k-means CUDA kernels (compiled by NVRTC through CuPy; no host headers).
//
// * The random stream of the cpu backend (csrc/cpu/kmeans/solver.cpp, Rng): splitmix64 seeds a
//   xoshiro256** state from (seed, run); uniform() = top 53 bits / 2^53.  __host__ __device__ so a
//   host test program can check it against the Python copy (kcengine.kmeans.backends.cuda).
// * Deterministic block reductions: fixed tree over a power-of-two block, same result every run.
#pragma once

namespace kc {

typedef long long i64;
typedef unsigned long long u64;

__host__ __device__ inline u64 splitmix(u64& s) {
  u64 z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Rng {
  u64 s[4];
  __host__ __device__ Rng(u64 seed, u64 stream) {
    u64 x = seed ^ (0x6A09E667F3BCC909ull * (stream + 1));
    for (int i = 0; i < 4; ++i) s[i] = splitmix(x);
  }
  __host__ __device__ static u64 rotl(u64 x, int k) { return (x << k) | (x >> (64 - k)); }
  __host__ __device__ u64 next() {
    const u64 r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
  }
  __host__ __device__ double uniform() { return double(next() >> 11) * 0x1.0p-53; }
};

__host__ __device__ inline int kpp_trials(i64 k) {
  // 2 + int(ln k) without libm: count how many times e fits (k < 2^31 here)
  int t = 0;
  double v = double(k);
  while (v >= 2.718281828459045) { v /= 2.718281828459045; ++t; }
  return 2 + t < 16 ? 2 + t : 16;  // at most 16, as the cpu core (reached at k > 1.2 million)
}

template <class T> __device__ inline T kc_inf();
template <> __device__ inline float kc_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ inline double kc_inf<double>() { return __longlong_as_double(0x7ff0000000000000ll); }

// Sum of v over the block (blockDim.x a power of two); every thread gets the result.
// `red` holds blockDim.x doubles.
__device__ inline double block_sum(double v, double* red) {
  const int tid = threadIdx.x;
  __syncthreads();
  red[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// Largest key over the block, ties to the smallest index; idx < 0 means "none".
__device__ inline void block_argmax(double key, int idx, double* red, int* redi, double* out_key, int* out_idx) {
  const int tid = threadIdx.x;
  __syncthreads();
  red[tid] = key;
  redi[tid] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const int ib = redi[tid + s];
      const int ia = redi[tid];
      const double kb = red[tid + s], ka = red[tid];
      if (ib >= 0 && (ia < 0 || kb > ka || (kb == ka && ib < ia))) {
        red[tid] = kb;
        redi[tid] = ib;
      }
    }
    __syncthreads();
  }
  *out_key = red[0];
  *out_idx = redi[0];
  __syncthreads();
}

}  // namespace kc
