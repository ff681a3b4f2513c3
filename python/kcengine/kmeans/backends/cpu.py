"""The ``cpu`` backend: the C++/OpenMP core (kcengine._core), zero-copy on numpy buffers."""
from __future__ import annotations

import numpy as np

from ... import _core
from ..api import Problems, RawResult


def solve(probs: Problems) -> RawResult:
    """Solve every problem of ``probs`` (numpy arrays, one dtype) in one native call."""
    fn = _core.kmeans_batch_f32 if probs.datasets[0].dtype == np.float32 else _core.kmeans_batch_f64
    cents, labels, inertia, n_iter, conv, algos = fn(
        probs.datasets, probs.weights, probs.data_index, probs.k, probs.init, probs.init_centers,
        probs.n_init, probs.max_iter, probs.tol, probs.seed, probs.algorithm,
    )
    return RawResult(list(cents), list(labels), inertia, n_iter, conv, list(algos))
