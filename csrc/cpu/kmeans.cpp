// Python bindings of the batched k-means solver: structural checks (same messages as the Python
// API), output allocation, and the choice of the solver copy for this CPU's instruction set.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa.h"
#include "kmeans/batch.h"
#include "registration.h"

namespace py = pybind11;

namespace kcengine {

std::string pick_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (const char* env = std::getenv("KCENGINE_CPU_ISA")) {
    std::string e(env);
    if (e == "generic" || (e == "avx2" && avx2) || (e == "avx512" && avx512)) return e;
    if (e == "avx2" || e == "avx512")  // running it would die on an illegal instruction
      throw py::value_error("KCENGINE_CPU_ISA='" + e + "' but this CPU lacks that instruction set");
    if (!e.empty()) throw py::value_error("KCENGINE_CPU_ISA must be generic, avx2 or avx512, got '" + e + "'");
  }
  return avx512 ? "avx512" : avx2 ? "avx2" : "generic";
}

namespace {

using km::Algo;
using km::Batch;
using km::Init;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <class T>
void dispatch(Batch<T>& b, const std::string& isa) {
  if (isa == "avx512") km::avx512::run(b);
  else if (isa == "avx2") km::avx2::run(b);
  else km::generic::run(b);
}

Algo parse_algo(const std::string& a) {
  if (a == "auto") return Algo::Auto;
  if (a == "lloyd") return Algo::Lloyd;
  if (a == "hamerly") return Algo::Hamerly;
  if (a == "gram") return Algo::Gram;
  if (a == "lloyd1d") return Algo::Lloyd1D;
  if (a == "exact1d") return Algo::Exact1D;
  if (a == "yinyang") return Algo::Yinyang;
  if (a == "topm") return Algo::TopM;
  throw py::value_error("algorithm must be one of auto, lloyd, hamerly, yinyang, topm, gram, lloyd1d, exact1d, got '" + a + "'");
}

template <class T>
py::tuple kmeans_batch(py::list datasets, py::object weights, py::array_t<int64_t, py::array::c_style> data_index,
                       py::array_t<int64_t, py::array::c_style> ks, const std::string& init,
                       py::object init_centers, int n_init, int max_iter, double tol, uint64_t seed,
                       const std::string& algorithm) {
  const char* tname = sizeof(T) == 4 ? "float32" : "float64";
  Batch<T> batch;
  auto& P = batch.params;
  if (init == "k-means++") P.init = Init::KMeansPP;
  else if (init == "random") P.init = Init::Random;
  else if (init == "given") P.init = Init::Given;
  else throw py::value_error("init must be 'k-means++', 'random' or 'given', got '" + init + "'");
  if (n_init < 1) throw py::value_error("n_init must be >= 1, got " + std::to_string(n_init));
  if (max_iter < 1) throw py::value_error("max_iter must be >= 1, got " + std::to_string(max_iter));
  if (!(tol >= 0) || !std::isfinite(tol)) throw py::value_error("tol must be a finite number >= 0, got " + std::to_string(tol));
  P.n_init = n_init;
  P.max_iter = max_iter;
  P.tol = tol;
  P.seed = seed;
  P.algorithm = parse_algo(algorithm);

  const py::ssize_t nd = py::len(datasets);
  if (nd < 1) throw py::value_error("x is an empty list: a ragged batch needs at least one problem");
  if (data_index.ndim() != 1 || ks.ndim() != 1 || data_index.shape(0) != ks.shape(0))
    throw py::value_error("data_index and k must be 1-D of the same length");
  const py::ssize_t B = ks.shape(0);
  if (B < 1) throw py::value_error("k is empty: at least one problem is needed");

  std::vector<py::array> keep;  // holds references while the GIL is released
  batch.datasets.resize(nd);
  for (py::ssize_t j = 0; j < nd; ++j) {
    py::object o = datasets[j];
    if (!py::isinstance<py::array_t<T>>(o))
      throw py::value_error("problem " + std::to_string(j) + " must be a " + tname + " numpy array");
    py::array a = o.cast<py::array>();
    if (a.ndim() != 2)
      throw py::value_error("x[" + std::to_string(j) + "] must have shape [N, D], got shape " + shape_str(a));
    if (!(a.flags() & py::array::c_style))
      throw py::value_error("x[" + std::to_string(j) + "] must be C-contiguous");
    if (a.shape(0) < 1 || a.shape(1) < 1)
      throw py::value_error("problem " + std::to_string(j) + " is empty (shape " + shape_str(a) +
                            "): it needs N >= 1 points of D >= 1 features");
    auto& ds = batch.datasets[j];
    ds.x = static_cast<const T*>(a.data());
    ds.n = a.shape(0);
    ds.d = a.shape(1);
    for (int64_t q = 0; q < ds.n * ds.d; ++q)
      if (!std::isfinite(ds.x[q]))
        throw py::value_error("problem " + std::to_string(j) + " holds NaN or Inf values; k-means needs finite data");
    keep.push_back(a);
  }
  if (!weights.is_none()) {
    py::list wl = weights.cast<py::list>();
    if (py::ssize_t(py::len(wl)) != nd)
      throw py::value_error("sample_weight has " + std::to_string(py::len(wl)) + " entries but x holds " +
                            std::to_string(nd) + " datasets");
    for (py::ssize_t j = 0; j < nd; ++j) {
      py::object o = wl[j];
      if (!py::isinstance<py::array_t<double>>(o))
        throw py::value_error("sample_weight of problem " + std::to_string(j) + " must be a float64 numpy array");
      py::array a = o.cast<py::array>();
      auto& ds = batch.datasets[j];
      if (a.ndim() != 1 || a.shape(0) != ds.n || !(a.flags() & py::array::c_style))
        throw py::value_error("sample_weight of problem " + std::to_string(j) + " must have shape [" +
                              std::to_string(ds.n) + "], got shape " + shape_str(a));
      const double* w = static_cast<const double*>(a.data());
      double tot = 0;
      for (int64_t i = 0; i < ds.n; ++i) {
        if (!std::isfinite(w[i]) || w[i] < 0)
          throw py::value_error("sample_weight of problem " + std::to_string(j) + " must be finite and >= 0, got " +
                                std::to_string(w[i]));
        tot += w[i];
      }
      if (!(tot > 0))
        throw py::value_error("sample_weight of problem " + std::to_string(j) +
                              " sums to 0: at least one point needs a positive weight");
      ds.w = w;
      keep.push_back(a);
    }
  }
  py::list init_list;
  const bool given = P.init == Init::Given;
  if (given) {
    if (init_centers.is_none()) throw py::value_error("init='given' needs init_centers");
    init_list = init_centers.cast<py::list>();
    if (py::ssize_t(py::len(init_list)) != B)
      throw py::value_error("init_centers has " + std::to_string(py::len(init_list)) + " entries for " +
                            std::to_string(B) + " problems");
    if (n_init != 1) throw py::value_error("n_init=" + std::to_string(n_init) + " with given initial centroids would rerun the same start; pass n_init=1");
  }
  auto di = data_index.unchecked<1>();
  auto kk = ks.unchecked<1>();
  batch.problems.resize(B);
  py::list out_c, out_l;
  for (py::ssize_t p = 0; p < B; ++p) {
    auto& pr = batch.problems[p];
    if (di(p) < 0 || di(p) >= nd)
      throw py::value_error("data_index[" + std::to_string(p) + "]=" + std::to_string(di(p)) + " is out of range for " +
                            std::to_string(nd) + " datasets");
    pr.data = di(p);
    pr.k = kk(p);
    const auto& ds = batch.datasets[pr.data];
    if (pr.k < 1) throw py::value_error("k must be >= 1 for problem " + std::to_string(p) + ", got k=" + std::to_string(pr.k));
    if (pr.k > ds.n)
      throw py::value_error("n_samples=" + std::to_string(ds.n) + " should be >= k=" + std::to_string(pr.k) +
                            " for problem " + std::to_string(p));
    if ((P.algorithm == Algo::Exact1D || P.algorithm == Algo::Lloyd1D) && ds.d != 1)
      throw py::value_error("algorithm='" + algorithm + "' needs 1-D points (D == 1); problem " + std::to_string(p) +
                            " has D=" + std::to_string(ds.d));
    if (P.algorithm == Algo::Exact1D && double(pr.k) * double(ds.n + 1) * 4.0 > double(int64_t(1) << 31))
      throw py::value_error("algorithm='exact1d' needs k*(N+1) <= 2**29 (its split table); problem " + std::to_string(p) +
                            " has k=" + std::to_string(pr.k) + ", N=" + std::to_string(ds.n));
    if (given) {
      py::object o = init_list[p];
      if (!py::isinstance<py::array_t<T>>(o))
        throw py::value_error("init of problem " + std::to_string(p) + " must be a " + tname + " numpy array");
      py::array a = o.cast<py::array>();
      if (a.ndim() != 2 || a.shape(0) != pr.k || a.shape(1) != ds.d || !(a.flags() & py::array::c_style))
        throw py::value_error("init of problem " + std::to_string(p) + " must have shape [" + std::to_string(pr.k) + ", " +
                              std::to_string(ds.d) + "], got shape " + shape_str(a));
      pr.init = static_cast<const T*>(a.data());
      for (int64_t q = 0; q < pr.k * ds.d; ++q)
        if (!std::isfinite(pr.init[q]))
          throw py::value_error("init of problem " + std::to_string(p) + " holds NaN or Inf values");
      keep.push_back(a);
    }
    py::array_t<T> c({py::ssize_t(pr.k), py::ssize_t(ds.d)});
    py::array_t<int64_t> l(py::ssize_t(ds.n));
    pr.centroids = c.mutable_data();
    pr.labels = l.mutable_data();
    out_c.append(c);
    out_l.append(l);
  }
  const std::string isa = pick_isa();
  {
    py::gil_scoped_release release;
    dispatch(batch, isa);
  }
  py::array_t<double> inertia(B);
  py::array_t<int32_t> n_iter(B);
  py::array_t<bool> converged(B);
  py::list algos;
  for (py::ssize_t p = 0; p < B; ++p) {
    const auto& pr = batch.problems[p];
    inertia.mutable_at(p) = pr.inertia;
    n_iter.mutable_at(p) = pr.n_iter;
    converged.mutable_at(p) = pr.converged;
    algos.append(km::algo_name(pr.algo));
  }
  return py::make_tuple(out_c, out_l, inertia, n_iter, converged, algos);
}

}  // namespace

void register_kmeans(py::module_& m) {
  const char* doc =
      "kmeans_batch_fXX(datasets, weights, data_index, k, init, init_centers, n_init, max_iter, tol, seed, algorithm)\n"
      "-> (centroids list, labels list, inertia[B], n_iter[B], converged[B], algorithm names)\n\n"
      "Private: use kcengine.kmeans. datasets: list of C-contiguous [N, D] arrays; problem p clusters\n"
      "datasets[data_index[p]] into k[p] clusters. weights: None or one float64 [N] array per dataset.\n"
      "init: 'k-means++', 'random' or 'given' (init_centers: one [k, D] array per problem).";
  m.def("kmeans_batch_f32", &kmeans_batch<float>, doc, py::arg("datasets"), py::arg("weights"), py::arg("data_index"),
        py::arg("k"), py::arg("init"), py::arg("init_centers"), py::arg("n_init"), py::arg("max_iter"), py::arg("tol"),
        py::arg("seed"), py::arg("algorithm"));
  m.def("kmeans_batch_f64", &kmeans_batch<double>, doc, py::arg("datasets"), py::arg("weights"), py::arg("data_index"),
        py::arg("k"), py::arg("init"), py::arg("init_centers"), py::arg("n_init"), py::arg("max_iter"), py::arg("tol"),
        py::arg("seed"), py::arg("algorithm"));
  m.def("kmeans_isa", &pick_isa, "Instruction set of the k-means solver copy that runs on this CPU");
}

}  // namespace kcengine
