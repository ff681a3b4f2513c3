"""The report of a compression run: per layer and for the whole model, as JSON and markdown.

Counts are of conv *weights* (biases, BatchNorm and linear layers are not clustered and not
counted).  ``unique_weights`` are the stored codebook values a clustered layer uses (plus the
per-filter norms of the cosine option); ``compression_ratio = dense_weights / unique_weights``
(the index, a few bits per filter or kernel, is not counted).  ``l0..linf`` are norms of the
weight change ``W_clustered - W_original`` (``l0`` = number of weights that changed).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["LayerReport", "CompressionReport"]


def _ratio_text(r: float) -> str:
    """A compression ratio to two decimals, with a third where two would round to 1.00 from either side (a
    model that grew, 0.997x, read as 1.00x)."""
    text = f"{r:.2f}"
    return f"{r:.3f}" if text == "1.00" and r != 1.0 else text


@dataclass
class LayerReport:
    """One clustered layer.

    - ``name``: the module's path in the model; ``shape``: its weight's ``[C_out, C_in/groups, kh, kw]``;
      ``granularity``: "filter", "kernel" or "element".
    - ``n_points``: the points clustered (filters, kernels, or for "element" the filters, per coordinate);
      ``k``: the number of clusters the plan chose.  The layer's ``num_clusters`` can differ: with
      ``threshold``, filters (kernels) farther than it from their centroid are kept as their own entries
      (``kept`` of them) and centroids no point uses any more are dropped; and a layer of fewer distinct
      filters (kernels) than ``k`` gets one cluster per distinct one.
    - ``dense_weights`` / ``unique_weights`` / ``compression_ratio``: as in the module doc (weights only).
    - ``inertia``: the k-means objective, the sum of squared distances of the points to their centroids at
      ``k`` -- before ``threshold`` keeps any point, and for ``cosine`` measured on the unit-norm filters;
      ``l2 ** 2`` is the squared weight change of the layer as built.
    - ``l0``, ``l1``, ``l2``, ``linf``: norms of ``W_clustered - W_original`` (``l0``: how many weights changed).
    - ``note``: what the plan said of this layer (e.g. the elbow's or the inertia limit's choice), or "".
    """

    name: str
    shape: list
    granularity: str
    n_points: int
    k: int
    dense_weights: int
    unique_weights: int
    compression_ratio: float
    inertia: float
    kept: int
    l0: int
    l1: float
    l2: float
    linf: float
    note: str = ""


@dataclass
class CompressionReport:
    """What :func:`kcengine.compress` did: ``layers`` (one :class:`LayerReport` per clustered layer),
    ``skipped`` (conv layers left dense: outside ``layers=``, or matched by no rule of the plan),
    ``already_clustered`` (``{name: [weights, stored]}`` of the layers that arrived clustered, from an earlier
    compress; they count in the totals at their stored size), the model's totals (properties below), timings,
    accuracies when ``eval_data`` was given (fractions), and the k-means options used (the seed resolved).
    ``print(report)`` shows the markdown summary; ``as_dict``, ``to_json`` and ``to_markdown`` write it out."""

    plan: str
    granularity: str
    threshold: float | None
    cosine: bool
    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    total_conv_weights: int = 0
    already_clustered: dict = field(default_factory=dict)
    seconds_clustering: float = 0.0
    seconds_total: float = 0.0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    kmeans_options: dict = field(default_factory=dict)

    @property
    def clustered_dense_weights(self) -> int:
        return sum(lr.dense_weights for lr in self.layers)

    @property
    def clustered_unique_weights(self) -> int:
        return sum(lr.unique_weights for lr in self.layers)

    @property
    def model_unique_weights(self) -> int:
        """Unique conv weights of the whole model (layers left dense count in full, those that arrived clustered
        at their stored size)."""
        saved_before = sum(w - st for w, st in self.already_clustered.values())
        return self.total_conv_weights - self.clustered_dense_weights + self.clustered_unique_weights - saved_before

    @property
    def compression_ratio(self) -> float:
        """All conv weights of the model / their unique count after clustering."""
        return self.total_conv_weights / max(self.model_unique_weights, 1)

    def __str__(self) -> str:
        return self.to_markdown()

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(clustered_dense_weights=self.clustered_dense_weights,
                 clustered_unique_weights=self.clustered_unique_weights,
                 model_unique_weights=self.model_unique_weights, compression_ratio=self.compression_ratio)
        return d

    def to_json(self, path=None) -> str:
        text = json.dumps(self.as_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self, path=None, title: str = "Compression report") -> str:
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.2f}%"

        lines = [f"# {title}", "",
                 f"- plan: {self.plan}; granularity: {self.granularity}; threshold: {self.threshold}; "
                 f"cosine: {self.cosine}",
                 f"- layers clustered: {len(self.layers)}; left dense: {len(self.skipped)}"
                 + (f"; clustered before: {len(self.already_clustered)}" if self.already_clustered else ""),
                 f"- conv weights: {self.total_conv_weights} -> {self.model_unique_weights} unique "
                 f"(ratio {_ratio_text(self.compression_ratio)}x)",
                 f"- accuracy before: {pct(self.accuracy_before)}; after: {pct(self.accuracy_after)}",
                 f"- time: clustering {self.seconds_clustering:.2f} s, total {self.seconds_total:.2f} s", "",
                 "| layer | C_out | points | k | dense | unique | ratio | inertia | kept | L0 | L1 | L2 | Linf |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lr in self.layers:
            lines.append(f"| {lr.name} | {lr.shape[0]} | {lr.n_points} | {lr.k} | {lr.dense_weights} | "
                         f"{lr.unique_weights} | {_ratio_text(lr.compression_ratio)} | {lr.inertia:.4g} | {lr.kept} | {lr.l0} | "
                         f"{lr.l1:.4g} | {lr.l2:.4g} | {lr.linf:.4g} |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text
