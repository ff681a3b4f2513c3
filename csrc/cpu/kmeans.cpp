#include "registration.h"
namespace kcengine {
void register_kmeans(pybind11::module_& /*m*/) {}
}  // namespace kcengine
