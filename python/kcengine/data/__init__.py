"""Data: the CIFAR-10 python-batches reader, normalization, ImageFolder, synthetic tensors, loaders."""
from .cifar import CIFAR10_CLASSES, CifarSplit, find_cifar10, read_cifar10
from .datasets import (Normalization, TensorImages, cifar10_dataset, evenly_spaced, image_folder, make_loader,
                       normalize_uint8, synthetic_images)

__all__ = ["CIFAR10_CLASSES", "CifarSplit", "find_cifar10", "read_cifar10", "Normalization", "TensorImages",
           "cifar10_dataset", "evenly_spaced", "image_folder", "make_loader", "normalize_uint8", "synthetic_images"]
