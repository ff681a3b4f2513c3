"""kcengine: compress convolutional networks by clustering their weights.

The public face; everything here is a re-export.  Importing kcengine initializes no GPU and
imports neither cupy nor triton (those load only when a backend that needs them runs); torch is
imported, torchvision and matplotlib load lazily.
"""
from . import evaluate, nn
from ._registry import backend_status
from .compress import compress
from .conv import indexed_conv2d, load_compressed, save_compressed
from .kmeans import KMeansResult, kmeans, kmeans_sweep
from .nn import ClusteredConv2d
from .train import finetune

__version__ = "0.1.0"

__all__ = [
    "kmeans", "kmeans_sweep", "KMeansResult",
    "indexed_conv2d", "ClusteredConv2d", "nn", "save_compressed", "load_compressed",
    "compress", "finetune", "evaluate",
    "backend_status", "__version__",
]
