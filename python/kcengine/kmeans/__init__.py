"""Batched k-means: thousands of independent (ragged) problems in one call."""
from . import backends as _backends  # noqa: F401  (registers the implementations)
from .api import kmeans, kmeans_sweep
from .result import KMeansResult

__all__ = ["kmeans", "kmeans_sweep", "KMeansResult"]
