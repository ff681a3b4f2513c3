"""Centroid-indexed convolution: the op, the layer, its inference fusion and compact checkpoints."""
from .backends import empty_output_cache, output_cache_info, set_output_cache_limit
from .functional import dense_weight, indexed_conv2d
from .fuse import fuse_for_inference
from .module import ClusteredConv2d, index_dtype_for
from . import native_op  # noqa: F401  registers torch.ops.kcengine.indexed_conv2d (torch.compile)
from .serialize import load_compressed, save_compressed

__all__ = ["indexed_conv2d", "dense_weight", "ClusteredConv2d", "index_dtype_for", "fuse_for_inference",
           "save_compressed", "load_compressed", "output_cache_info", "set_output_cache_limit", "empty_output_cache"]
