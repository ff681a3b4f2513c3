"""CIFAR-10 in the standard "python batches" layout, full dataset or any subset of it.

The folder ``cifar-10-batches-py`` holds pickled dicts (``encoding='latin1'``): ``data_batch_1..5``
(train), ``test_batch`` (test) and ``batches.meta`` (class names).  Each batch has ``data``
(uint8 ``[rows, 3072]``, channel-planar R, G, B of 32x32) and ``labels`` (list of int).  The
number of rows is read from the files, so a subset (such as the 846-test / 4,660-train sample in
``../shared/data``) reads exactly like the full 10,000-per-file dataset.  torchvision's
``CIFAR10`` refuses such subsets (md5 check); this reader checks structure instead.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int

__all__ = ["CIFAR10_CLASSES", "CifarSplit", "read_cifar10", "find_cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass
class CifarSplit:
    """One split: ``images`` uint8 ``[N, 3, 32, 32]``, ``labels`` int64 ``[N]``, ``classes`` names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def find_cifar10(root) -> Path:
    """The ``cifar-10-batches-py`` folder at ``root`` or directly inside it."""
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a folder path (str or os.PathLike), got {type(root).__name__}")
    root = Path(root)
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand
    raise FileNotFoundError(f"no CIFAR-10 python batches (test_batch, data_batch_1..5) in {str(root)!r} "
                            f"or {str(root / 'cifar-10-batches-py')!r}")


def _unpickle(path: Path):
    """A CIFAR python file's contents; a damaged one (truncated, empty, not a pickle) is a ValueError naming it
    (was pickle's own error, or "invalid literal for int()", naming no file)."""
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="latin1")
        except OSError:
            raise
        except Exception as exc:  # what unpickling damaged bytes raises varies with the bytes
            raise ValueError(f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict) or "data" not in d or ("labels" not in d and "fine_labels" not in d):
        raise ValueError(f"{path} is not a CIFAR python batch (expected a dict with 'data' and 'labels')")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must have shape [rows, 3072], got {data.shape}")
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def read_cifar10(root, split: str = "test", *, limit: int | None = None) -> CifarSplit:
    """Read a split of CIFAR-10 from the python batches under ``root``.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent.
        split: ``"test"`` or ``"train"``.
        limit: keep only the first ``limit`` images (None: all).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}")
    limit = check_int(limit, "limit", 1, optional=True)
    folder = find_cifar10(root)
    datas, labels = [], []
    for name in _FILES[split]:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10 {split} split needs {p}, which is missing")
        d, lab = _read_batch(p)
        datas.append(d)
        labels.append(lab)
    data = np.concatenate(datas)
    lab = np.concatenate(labels)
    if limit is not None:
        data, lab = data[:limit], lab[:limit]
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        m = _unpickle(meta)
        if isinstance(m, dict) and "label_names" in m:
            classes = tuple(m["label_names"])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return CifarSplit(images, torch.from_numpy(lab.copy()), classes)
