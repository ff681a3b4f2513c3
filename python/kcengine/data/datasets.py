"""Datasets and loaders: normalization, in-memory tensor sets, ImageFolder, synthetic tensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._checks import check_int
from .cifar import read_cifar10

__all__ = ["Normalization", "normalize_uint8", "cifar10_dataset", "image_folder", "synthetic_images", "make_loader",
           "TensorImages", "evenly_spaced"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` of [0, 1] RGB images."""

    mean: tuple
    std: tuple

    def __post_init__(self):
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need one entry per channel and std > 0, got mean={self.mean}, "
                             f"std={self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float ``[..., C, H, W]`` in [0, 1]; returns a new normalized tensor."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


def normalize_uint8(images: torch.Tensor, norm: Normalization, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images to normalized float ``[N, C, H, W]`` (a new tensor)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    return norm(images.to(dtype) / 255.0)


def tensor_pair(ds) -> tuple | None:
    """``(images, labels)`` of a TensorDataset of two tensors whose items are those tensors' rows (a subclass
    that keeps TensorDataset's ``__getitem__``, as :class:`TensorImages`), read directly instead of item by item;
    None for any other dataset (a subclass that transforms its items is read through them)."""
    if isinstance(ds, TensorDataset) and type(ds).__getitem__ is TensorDataset.__getitem__ and len(ds.tensors) == 2:
        return ds.tensors[0], ds.tensors[1]
    return None


class TensorImages(TensorDataset):
    """Normalized images and labels held in memory (fast for the small evaluation sets)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None):
        super().__init__(images, labels)
        self.images, self.labels = images, labels
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(int(labels.max()) + 1))


def cifar10_dataset(root, split: str = "test", norm: Normalization | None = None, *,
                    limit: int | None = None) -> TensorImages:
    """CIFAR-10 (full or subset) as normalized float tensors in memory: ``split`` "test" or "train" of the
    python-version batches under ``root`` (:func:`kcengine.data.find_cifar10` finds them); ``norm`` defaults to
    the CIFAR ResNet checkpoints' own (``kcengine.models.CIFAR_MEAN``/``CIFAR_STD``, ImageNet's statistics, as
    those weights were trained with); ``limit``: only the first ``limit`` images."""
    if norm is None:
        from ..models import CIFAR_MEAN, CIFAR_STD

        norm = Normalization(CIFAR_MEAN, CIFAR_STD)
    s = read_cifar10(root, split, limit=limit)
    return TensorImages(normalize_uint8(s.images, norm), s.labels, s.classes)


def evenly_spaced(size: int, n: int) -> list[int]:
    """``min(n, size)`` of a dataset's ``size`` item indices, evenly spaced: ``i * size // m`` (finetune's calibration
    images, the CLI's ``--limit`` on an image folder).
    A dataset stored class by class (ImageFolder, any folder dataset) then gives every class its share; its
    first ``n`` items would be one or two classes (resnet20 at C_out/2 on the CIFAR sample sorted by class,
    one thread: 55% after the refit on its first 512 images, 76% on 512 evenly spaced)."""
    m = min(n, size)
    return [i * size // m for i in range(m)]


def image_folder(root, norm: Normalization, *, resize: int = 256, crop: int = 224) -> Dataset:
    """An ImageNet-style folder (``root/<class>/<image>``) with the usual eval transform."""
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                             transforms.Normalize(norm.mean, norm.std)])
    return datasets.ImageFolder(str(root), transform=tf)


def synthetic_images(n: int, *, num_classes: int = 10, shape=(3, 32, 32), seed: int = 0) -> TensorImages:
    """``n`` standard-normal images with uniform random labels, reproducible from ``seed`` (for tests)."""
    n = check_int(n, "n", 1)
    num_classes = check_int(num_classes, "num_classes", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorImages(x, y, tuple(str(i) for i in range(num_classes)))


def make_loader(dataset: Dataset, batch_size: int = 256, *, shuffle: bool = False, num_workers: int = 0,
                seed: int | None = None) -> DataLoader:
    """A DataLoader with the settings used throughout (no workers by default: data is in memory); ``seed``
    fixes the shuffling order (None: torch's global generator draws it)."""
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1, optional=True)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=g)
