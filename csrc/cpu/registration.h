// Each translation unit of the native module exposes one registration function; bindings.cpp
// calls them all.  Keeping them apart lets k-means and convolution kernels evolve independently.
#pragma once
#include <pybind11/pybind11.h>

namespace kcengine {
void register_kmeans(pybind11::module_& m);
void register_conv(pybind11::module_& m);
void register_buffers(pybind11::module_& m);
}  // namespace kcengine
