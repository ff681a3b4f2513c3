// The instruction set the native kernels run with (the k-means solver copy, the conv direct tile):
// the best this CPU has ("avx512": F, DQ, BW and VL; "avx2": AVX2 and FMA; else "generic"), or env
// KCENGINE_CPU_ISA, which may name any set the CPU has (one it lacks, or an unknown name, is a
// ValueError).  Read on every call, so tests and benchmarks can switch copies.  Defined in kmeans.cpp.
#pragma once
#include <string>

namespace kcengine {
std::string pick_isa();
}  // namespace kcengine
