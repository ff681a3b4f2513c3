"""k-means backends.  Each module exposes ``solve(problems) -> RawResult``; they are registered
here by dotted path and imported only when first used."""
from ... import _registry

_registry.register("kmeans", "cpu", "kcengine.kmeans.backends.cpu:solve")
_registry.register("kmeans", "torch", "kcengine.kmeans.backends.torch_ref:solve")
_registry.register("kmeans", "triton", "kcengine.kmeans.backends.triton:solve")
_registry.register("kmeans", "cuda", "kcengine.kmeans.backends.cuda:solve")
