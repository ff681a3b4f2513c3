"""kcengine: compress convolutional networks by clustering their weights.

The public face; everything here is a re-export.  Importing kcengine initializes no GPU and
imports neither cupy nor triton: those load only when a backend that needs them runs.
"""
from ._registry import backend_status
from .kmeans import KMeansResult, kmeans, kmeans_sweep

__version__ = "0.1.0"

__all__ = ["kmeans", "kmeans_sweep", "KMeansResult", "backend_status", "__version__"]
from . import nn
from .conv import indexed_conv2d, load_compressed, save_compressed
__all__ += ["indexed_conv2d", "save_compressed", "load_compressed", "nn"]
from .compress import compress  # noqa: E402  (torch only; torchvision/matplotlib load lazily)
__all__ += ["compress"]
from .train import finetune  # noqa: E402  (torch only; matplotlib/tqdm load lazily)
