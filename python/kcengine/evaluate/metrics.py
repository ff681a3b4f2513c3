"""Batched classification evaluation: top-1/top-5, per-class accuracy, confusion matrix.

``evaluate(model, data)`` runs the model in eval mode under ``torch.inference_mode`` over
``data`` — a DataLoader, a Dataset, or an ``(images, labels)`` tensor pair — and returns an
:class:`EvalResult`.  The caller's model is not modified (every submodule's train/eval mode is restored: a
BatchNorm frozen in a training model stays frozen, a dropout left on in an eval model stays on).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .._checks import check_device, check_int
from .._modes import eval_mode
from ..data.datasets import tensor_pair

__all__ = ["EvalResult", "evaluate", "top1_accuracy", "confusion_png"]


@dataclass
class EvalResult:
    """``top1``/``top5`` fractions in [0, 1]; ``correct`` top-1 count of ``total`` images;
    ``per_class`` accuracy per true class ``[C]`` (NaN for a class without images);
    ``confusion`` ``[C, C]`` int64 counts (row = true class, column = predicted); ``classes`` one name per
    row: the data's class names, then the indices of the model's outputs past them."""

    top1: float
    top5: float
    correct: int
    total: int
    per_class: np.ndarray
    confusion: np.ndarray
    classes: tuple = field(default_factory=tuple)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "correct": self.correct, "total": self.total,
                "per_class": {str(c): (None if np.isnan(a) else float(a)) for c, a in
                              zip(self.classes or range(len(self.per_class)), self.per_class)},
                "confusion": self.confusion.tolist(), "seconds": self.seconds}


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def check_data(data, name: str = "data") -> None:
    """ValueError naming ``name`` unless ``data`` is a DataLoader, a Dataset or an (images, labels) pair of
    float images and as many labels; reads no batch, so a caller checks its arguments before long work."""
    if _is_pair(data):
        x, y = data
        check_float_images(x, f"{name}'s images")
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"{name}'s labels must be a tensor of class indices, got {type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}'s images and labels differ in length: shapes {tuple(x.shape)} vs "
                             f"{tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} holds no images (shapes {tuple(x.shape)} and {tuple(y.shape)})")
    elif not isinstance(data, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        raise ValueError(f"{name} must be a DataLoader, a Dataset or an (images, labels) pair, got "
                         f"{type(data).__name__}")
    else:
        ds = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
        try:
            size = len(ds)
        except TypeError:  # an iterable dataset: its length is not known before reading it
            size = None
        if size == 0:
            raise ValueError(f"{name} holds no images (an empty {type(ds).__name__})")


def _batches(data, batch_size: int):
    """Yield (x, y) batches from a DataLoader, a Dataset or an (images, labels) pair."""
    check_data(data)
    if _is_pair(data):
        x, y = data
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.utils.data.DataLoader):
        yield from map(image_label_pair, data)
        return
    if isinstance(data, torch.utils.data.Dataset):
        pair = tensor_pair(data)  # sliced directly; a subclass that transforms its items is read through them
        if pair is not None:
            yield from _batches(pair, batch_size)
            return
        yield from map(image_label_pair, torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False))


def image_label_pair(batch) -> tuple:
    """A loader's batch as (images, labels); ValueError naming what came instead (a dict of fields, a triple,
    bare images were unpacked into strings or 'too many values to unpack'; uint8 pixels failed in the first
    conv with 'expected scalar type Byte')."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)):
        if isinstance(batch, dict):
            got = f"a dict with keys {sorted(map(str, batch))}"
        elif isinstance(batch, (tuple, list)):
            got = f"a {type(batch).__name__} of {len(batch)}: ({', '.join(type(b).__name__ for b in batch)})"
        else:
            got = type(batch).__name__
        raise ValueError(f"each batch of data must be an (images, labels) pair, got {got}")
    x, y = batch
    check_float_images(x)
    if not isinstance(y, torch.Tensor):  # string labels collate into a tuple
        raise ValueError(f"each batch's labels must be a tensor of class indices, got a {type(y).__name__}"
                         + (f" of {type(y[0]).__name__}" if isinstance(y, (tuple, list)) and len(y) else ""))
    return x, y


def check_float_images(x: torch.Tensor, what: str = "images") -> None:
    """ValueError unless ``x`` is floating point (integer pixels fail in the model's first conv)."""
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, normalized as the model expects, got dtype "
                         f"{x.dtype} (raw pixels? kcengine.data's loaders normalize them)")


def check_model(model) -> None:
    """ValueError unless ``model`` is an ``nn.Module`` (None or a plain function failed on ``.training``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, checked to be ``[N, classes]`` logits (:func:`check_logits`); where the forward fails and the
    images' dtype differs from the model's floating-point parameters', a ValueError saying so (torch's "Input
    type (double) and bias type (float) should be the same" names neither); where it fails on ``[N, H, W]`` images
    and the model holds 2-D convs, a ValueError asking for ``[N, C, H, W]`` (torch's message counts the N images
    as channels).  A model that converts its input itself runs as it is."""
    try:
        logits = model(x)
    except (RuntimeError, ValueError) as exc:  # (a clustered layer checks its input itself: ValueError)
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        if p is not None and x.dtype != p.dtype:
            raise ValueError(f"images are {x.dtype} but the model's parameters are {p.dtype}: pass "
                             f"images.to({p.dtype}) (or convert the model)") from exc
        from ..compress.layers import conv_weight_counts

        convs = conv_weight_counts(model) if x.dim() == 3 else None
        if convs and convs["clustered"] + convs["dense"]:
            raise ValueError(f"images must be batches [N, C, H, W], got shape {tuple(x.shape)}: a 2-D conv takes "
                             f"[N, H, W] as one image of N channels (add the channel dimension: "
                             f"images.unsqueeze(1))") from exc
        raise
    check_logits(logits, int(x.shape[0]))
    return logits


def check_logits(logits, n: int) -> None:
    """ValueError unless the model's output is an ``[N, classes]`` tensor of logits for the ``n`` images."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model's output must be an [N, classes] tensor of logits (N = {n}), got {got}")


def check_labels(y: torch.Tensor, logits: torch.Tensor) -> None:
    """ValueError unless ``y`` holds one integer class label per image, each one of the model's outputs."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"labels must be a tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [N] with one label per image (N = {logits.shape[0]}), got shape "
                         f"{tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must be in [0, {logits.shape[1]}) (the model's outputs), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def probe_labels(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Check in-memory ``labels`` against ``model``'s outputs before long work: the model runs on two of
    ``images`` (eval mode, no grad: nothing of the caller's changes), which also checks the images' shape and
    dtype (:func:`run_model`); ValueError otherwise.  A model with lazy modules is not probed (the forward would
    initialize them)."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        return
    with torch.no_grad(), eval_mode(model):
        logits = run_model(model, images[:2])
    check_labels(labels, logits[:1].expand(labels.shape[0], -1))


def _length(data) -> int | None:
    try:
        if isinstance(data, (tuple, list)):
            return int(data[0].shape[0])
        if isinstance(data, torch.utils.data.DataLoader):
            return len(data.dataset)  # type: ignore[arg-type]
        return len(data)
    except (TypeError, AttributeError, IndexError):  # not a shape we know: _batches says what it takes
        return None


def evaluate(model: nn.Module, data, *, batch_size: int = 500, device="cpu", num_classes: int | None = None,
             classes: Sequence[str] | None = None, progress: bool = False, desc: str = "eval") -> EvalResult:
    """Evaluate ``model`` on ``data``; see the module docstring."""
    import time

    check_model(model)
    batch_size = check_int(batch_size, "batch_size", 1)
    num_classes = check_int(num_classes, "num_classes", 1, optional=True)
    device = check_device(device)
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
            raise ValueError(f"classes must be a sequence of class names (a list of str), got classes={classes!r}")
        classes = list(classes)  # a numpy array of names, dict keys, ...
    if classes is None:  # the data's own names (a numpy array of them too: `or` asked for its truth value)
        for holder in (data, getattr(data, "dataset", None)):
            found = getattr(holder, "classes", None)
            found = list(found) if isinstance(found, Iterable) and not isinstance(found, (str, bytes)) else None
            if found:
                classes = found
                break
    correct1 = correct5 = total = 0
    preds, trues = [], []
    total_n = _length(data)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_n, desc=desc, unit="img", leave=False)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), eval_mode(model):
            for x, y in _batches(data, batch_size):
                x = x.to(device)
                y = y.to(device) if isinstance(y, torch.Tensor) else y
                logits = run_model(model, x)
                check_labels(y, logits)
                if num_classes is not None and num_classes < logits.shape[1]:
                    raise ValueError(f"num_classes={num_classes} is below the model's {logits.shape[1]} outputs")
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                # top-1 is argmax (the first of tied logits), as top1_accuracy and the sweeps take it: topk's
                # order among ties is its own
                pred = logits.argmax(1)
                correct1 += int((pred == y).sum())
                correct5 += int(((top == y[:, None]).any(dim=1) | (pred == y)).sum())
                total += int(y.shape[0])
                preds.append(pred.cpu())
                trues.append(y.cpu())
                if bar is not None:
                    bar.update(int(y.shape[0]))
                if num_classes is None:
                    num_classes = int(logits.shape[1])
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if total == 0:
        raise ValueError("data holds no images")
    p = torch.cat(preds).numpy()
    t = torch.cat(trues).numpy()
    names = [str(c) for c in classes] if classes is not None else []
    # One name per row of the matrix: the model's outputs may outnumber the data's classes (an ImageNet
    # model on a folder of a few classes: the rest keep their index as a name), and the data may name
    # classes the model has no output for (rows of the true classes, empty).
    # An index name the data already uses for another row ("3" naming row 0) becomes "output 3": names are keys.
    C = max(int(num_classes), len(names))
    taken = set(names)
    names += [str(i) if str(i) not in taken else f"output {i}" for i in range(len(names), C)]
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (t, p), 1)
    support = conf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(conf) / np.maximum(support, 1), np.nan)
    return EvalResult(correct1 / total, correct5 / total, correct1, total, per_class, conf, tuple(names), seconds)


def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy on in-memory tensors, the fast path the sweeps use (model in eval mode, every submodule's
    mode restored after); the same checks of the model, images and labels as :func:`evaluate`."""
    check_model(model)
    check_data((images, labels), "(images, labels)")
    batch_size = check_int(batch_size, "batch_size", 1)
    correct = 0
    with torch.inference_mode(), eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            x, y = images[i:i + batch_size], labels[i:i + batch_size]
            logits = run_model(model, x)
            check_labels(y, logits)
            correct += int((logits.argmax(1) == y).sum())
    return correct / int(images.shape[0])


# Above this many classes the heat map is drawn without names and counts, in a figure of bounded size
# (ImageNet's 1000 at 0.6 inch a class would be a 60,000-pixel square).
_NAMED_CLASSES_MAX = 30


def confusion_png(confusion: np.ndarray, path, *, classes: Sequence[str] | None = None, title: str = "") -> Path:
    """Write the confusion matrix (``[C, C]``, rows true, columns predicted; or an :class:`EvalResult`, whose
    class names are then the default ``classes``) as a heat map and return the path (a PNG; another format where
    the path's suffix names one matplotlib writes, e.g. ``.jpg``, ``.pdf``, ``.svg``).  Up to 30 classes
    each cell shows its count and each row and column its class name; above that, a 10-inch map of the
    whole matrix with class indices on the axes.  Leaves matplotlib's backend as it was
    (:mod:`kcengine._plot`)."""
    from .._plot import figure, save

    if isinstance(confusion, EvalResult):
        classes = (confusion.classes or None) if classes is None else classes
        confusion = confusion.confusion
    conf = np.asarray(confusion)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 1:
        raise ValueError(f"confusion must be a [C, C] matrix (or an EvalResult), got shape {conf.shape}")
    C = conf.shape[0]
    names = list(classes) if classes is not None else [str(i) for i in range(C)]
    if len(names) != C:
        raise ValueError(f"classes has {len(names)} names for a {C}x{C} confusion matrix")
    named = C <= _NAMED_CLASSES_MAX
    fig = figure((1.0 + 0.6 * C, 0.8 + 0.6 * C) if named else (10.0, 9.5))
    ax = fig.subplots()
    ax.imshow(conf, cmap="Blues")  # (its default interpolation averages cells that share a pixel)
    if not named:
        ax.set_xlabel("predicted (class index)")
        ax.set_ylabel("true (class index)")
    else:
        ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(C), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        vmax = conf.max()
        for i, j in zip(*np.nonzero(conf)):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if conf[i, j] > vmax / 2 else "black")
    if title:
        ax.set_title(title)
    return save(fig, path, dpi=100)
