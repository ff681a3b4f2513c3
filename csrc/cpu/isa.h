// The instruction set whose hand-written copies run: the k-means solver copy, the conv direct pass's
// tile routines and the channels-last float32 gather (the compiler-cloned loops pick their own): the
// best this CPU has ("avx512": F, DQ, BW and VL; "avx2": AVX2 and FMA; else "generic"), or env
// KCENGINE_CPU_ISA, which may name any set the CPU has (one it lacks, or an unknown name, is a
// ValueError).  The solver and the gather read it on every call; a conv pack when it is built (the
// pack's layout depends on it; a cached pack keeps its set), so tests and benchmarks can switch
// copies.  Defined in kmeans.cpp.
#pragma once
#include <string>

namespace kcengine {
std::string pick_isa();
}  // namespace kcengine
