// Centroid-indexed convolution kernels (CPU).  Filled in by the indexed-conv work.
#include "registration.h"

namespace kcengine {
void register_conv(pybind11::module_& /*m*/) {}
}  // namespace kcengine
