"""Shared assertions on k-means results (importable from tests and from their subprocess scripts)."""
from __future__ import annotations

import numpy as np


def assert_seeded_quality(got, ref, probs) -> None:
    """Seeded runs: the cpu backend and a GPU-style driver draw the same random stream, but which point
    a draw lands on depends on the summation order of D^2 (a parallel scan never matches a serial CPU
    sum), so results may differ.  Check that ``got`` is well formed (every label the nearest centroid)
    and of k-means++ quality next to the cpu backend's ``ref`` (geometric-mean inertia ratio <= 1.2)."""
    logs = []
    for p in range(probs.n_problems):
        x = np.asarray(probs.datasets[int(probs.data_index[p])], dtype=np.float64)
        c = got.centroids[p].double().numpy()
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        own = d2[np.arange(len(x)), got.labels[p].numpy()]
        assert np.all(own <= d2.min(1) + 1e-6 * (1 + d2.min(1))), f"labels of problem {p} are not nearest"
        if float(ref.inertia[p]) > 1e-9:
            logs.append(np.log(max(float(got.inertia[p]), 1e-12) / float(ref.inertia[p])))
    assert np.exp(np.mean(logs)) <= 1.2, np.exp(logs)


def offset_points(dtype, offset, n=200, d=9, seed=0):
    """Points a few ulps apart around ``offset`` in every coordinate: far from the origin against their spread."""
    rng = np.random.default_rng(seed)
    step = np.spacing(dtype(offset))
    return (dtype(offset) + rng.integers(-3, 4, size=(n, d)).astype(dtype) * step).astype(dtype)
