// The private native module kcengine._core: C++17 + OpenMP, no torch linkage (numpy buffers).
#include <omp.h>

#include "registration.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "kcengine native core (private; use the kcengine Python API)";
  m.def("max_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel region uses");
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw pybind11::value_error("n must be >= 1, got " + std::to_string(n));
    omp_set_num_threads(n);
  }, pybind11::arg("n"));
  m.def("cpu_features", []() {
    pybind11::dict d;
    __builtin_cpu_init();
    d["sse4_2"] = static_cast<bool>(__builtin_cpu_supports("sse4.2"));
    d["avx"] = static_cast<bool>(__builtin_cpu_supports("avx"));
    d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
    d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
    d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
    d["avx512vl"] = static_cast<bool>(__builtin_cpu_supports("avx512vl"));
    return d;
  }, "CPU features the runtime dispatch can use");
  kcengine::register_kmeans(m);
  kcengine::register_conv(m);
  kcengine::register_buffers(m);
}
