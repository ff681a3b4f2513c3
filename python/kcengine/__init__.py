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


def __getattr__(name: str):
    """``kcengine.models`` (and the other subpackages) on first use, as the docstrings name them, without an
    import of their own; importing kcengine stays light."""
    if name in ("models", "data", "bench", "commands"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kcengine' has no attribute {name!r}")

__all__ = [
    "kmeans", "kmeans_sweep", "KMeansResult",
    "indexed_conv2d", "ClusteredConv2d", "nn", "save_compressed", "load_compressed",
    "compress", "finetune", "evaluate",
    "backend_status", "__version__",
]
