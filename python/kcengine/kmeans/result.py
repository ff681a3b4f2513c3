"""The result type of :func:`kcengine.kmeans`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KMeansResult"]


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of a (batched) k-means call; every field is per problem.

    For one problem (``x`` of shape ``[N, D]``):

    * ``centroids`` ``[k, D]``, ``labels`` ``[N]`` (int64), ``inertia`` (float64), ``n_iter`` (int32) and
      ``converged`` (bool) as scalars: numpy scalars (``numpy.float64``, ...) for numpy input, 0-d tensors for
      torch input.

    For a dense batch (``x`` of shape ``[B, N, D]``): ``centroids`` ``[B, k, D]`` (a list of
    ``[k_b, D]`` when ``k`` differs per problem), ``labels`` ``[B, N]``, ``inertia``, ``n_iter`` and
    ``converged`` of shape ``[B]``.

    For a ragged batch (a list of ``[N_i, D_i]``): ``centroids`` and ``labels`` are lists;
    ``inertia``, ``n_iter`` and ``converged`` arrays of shape ``[B]``.

    Arrays have the input's type (numpy or torch, on the input's device); ``centroids`` keep the
    input's dtype.  ``inertia`` is the sum over points of ``weight * ||x - centroid[label]||^2``,
    ``n_iter`` the number of Lloyd iterations run (0 for ``algorithm="exact1d"`` and ``"distinct"``),
    ``converged`` whether the tolerance or strict (no label change) convergence was reached before
    ``max_iter``.  ``backend`` names the backend that ran and ``algorithm`` the solver used per problem.

    A batch's result is a sequence of per-problem results: ``len(res)``, ``res[i]`` and ``for r in res``
    (a single problem's result has neither length nor items).
    """

    centroids: Any
    labels: Any
    inertia: Any
    n_iter: Any
    converged: Any
    backend: str = "cpu"
    algorithm: Any = None

    def __iter__(self):
        """A batch's results one problem at a time (``for r in kmeans(batch, k)``), as ``result[i]`` gives them."""
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> "KMeansResult":
        """The result of problem ``i`` of a batch, as a single-problem result."""
        if getattr(self.inertia, "ndim", 0) == 0:
            raise IndexError("this result holds a single problem; it cannot be indexed")
        algo = self.algorithm[i] if isinstance(self.algorithm, (list, tuple)) else self.algorithm
        return KMeansResult(self.centroids[i], self.labels[i], self.inertia[i], self.n_iter[i],
                            self.converged[i], self.backend, algo)

    def __len__(self) -> int:
        if getattr(self.inertia, "ndim", 0) == 0:
            raise TypeError("a single-problem result has no len()")
        return int(self.inertia.shape[0])
