// Plain-pointer description of a batch of k-means problems, shared by the bindings
// (kmeans.cpp, compiled once) and the solver (solver.cpp, compiled once per instruction set).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kcengine::km {

enum class Init : int { KMeansPP = 0, Random = 1, Given = 2 };
// Distinct is never requested: "auto" picks it for k == N distinct points of positive weight and a
// k-means++ or random init (each point its own centroid).
enum class Algo : int { Auto = 0, Lloyd = 1, Hamerly = 2, Gram = 3, Lloyd1D = 4, Exact1D = 5, Yinyang = 6, TopM = 7,
                        Distinct = 8 };

inline const char* algo_name(Algo a) {
  switch (a) {
    case Algo::Auto: return "auto";
    case Algo::Lloyd: return "lloyd";
    case Algo::Hamerly: return "hamerly";
    case Algo::Gram: return "gram";
    case Algo::Lloyd1D: return "lloyd1d";
    case Algo::Exact1D: return "exact1d";
    case Algo::Yinyang: return "yinyang";
    case Algo::TopM: return "topm";
    case Algo::Distinct: return "distinct";
  }
  return "?";
}

// One [n, d] row-major dataset; w == nullptr means unit weights.
template <class T>
struct Dataset {
  const T* x = nullptr;
  int64_t n = 0, d = 0;
  const double* w = nullptr;
};

// One problem: cluster dataset `data` into k clusters; outputs written in place.
template <class T>
struct Problem {
  int64_t data = 0;
  int64_t k = 0;
  const T* init = nullptr;  // [k, d] when Init::Given
  T* centroids = nullptr;   // [k, d] output
  int64_t* labels = nullptr;  // [n] output
  double inertia = 0.0;
  int32_t n_iter = 0;
  bool converged = false;
  Algo algo = Algo::Auto;  // the solver that ran
};

struct Params {
  Init init = Init::KMeansPP;
  int n_init = 1;
  int max_iter = 300;
  double tol = 1e-4;  // relative to the mean per-feature variance of each dataset
  uint64_t seed = 0;
  Algo algorithm = Algo::Auto;
  int64_t gram_budget_bytes = int64_t(512) << 20;  // Gram matrices alive at once
};

template <class T>
struct Batch {
  std::vector<Dataset<T>> datasets;
  std::vector<Problem<T>> problems;
  Params params;
};

// The solver, one copy per instruction set (namespaces generic / avx2 / avx512).
#define KC_DECLARE_ARCH(ns)            \
  namespace ns {                       \
  void run(Batch<float>& batch);       \
  void run(Batch<double>& batch);      \
  }
KC_DECLARE_ARCH(generic)
KC_DECLARE_ARCH(avx2)
KC_DECLARE_ARCH(avx512)
#undef KC_DECLARE_ARCH

}  // namespace kcengine::km
