"""Models by name, with their weights and the input normalization those weights expect.

Two families:

* CIFAR ResNets ``resnet20/32/44/56/110`` (:mod:`.cifar_resnet`); their public pretrained
  weights (github.com/akamaster/pytorch_resnet_cifar10) load through
  ``torch.hub.load_state_dict_from_url`` of the public URL, i.e. from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``) or by download;
* torchvision ImageNet models by their torchvision name (``resnet18``, ``resnet34``, ``resnet50``,
  ``mobilenet_v3_small``, ...) with their weights enums (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...),
  loaded by torchvision itself (the same hub cache).

``weights`` may also be a path to a checkpoint file of any format :mod:`.checkpoints` reads, or
``None`` for the default initialization (speed-only work; no accuracy claims can be made).  A path
to a compact file of :func:`kcengine.save_compressed` (the ``model.pt`` that ``kcengine prune`` and
``finetune`` write with ``--out``) loads the model with its clustered layers clustered; those files
record :func:`model_builder`'s builder, so :func:`kcengine.load_compressed` alone also rebuilds them.
When pretrained weights are asked for but are neither cached nor downloadable,
:class:`MissingWeightsError` says what is missing and how to provide it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_int
from .checkpoints import MissingWeightsError, hub_cache_path, load_state_dict_into, read_checkpoint, strip_prefixes
from .cifar_resnet import CIFAR_DEPTHS, CifarResNet

__all__ = ["LoadedModel", "load_model", "list_models", "CIFAR_CHECKPOINT_URLS", "CIFAR_MEAN", "CIFAR_STD",
           "IMAGENET_MEAN", "IMAGENET_STD", "is_cifar_model"]

_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
CIFAR_CHECKPOINT_URLS = {
    "resnet20": _BASE + "resnet20-12fca82f.th",
    "resnet32": _BASE + "resnet32-d509ac18.th",
    "resnet44": _BASE + "resnet44-014dd654.th",
    "resnet56": _BASE + "resnet56-4bfd9763.th",
    "resnet110": _BASE + "resnet110-1d1ed7c2.th",
}
# The CIFAR checkpoints were trained on [0, 1] RGB normalized with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = IMAGENET_MEAN
CIFAR_STD = IMAGENET_STD

_PRETRAINED = ("pretrained", "default", "DEFAULT")
_NONE = (None, "none", "random", "init")
OUT_MODEL_NAME = "model.pt"  # the clustered model in the --out folder of kcengine prune / finetune


@dataclass
class LoadedModel:
    """A model and what is known about its weights.

    ``model`` is in eval mode on the CPU; ``mean``/``std`` the per-channel normalization of [0, 1]
    RGB inputs the weights expect; ``input_size`` (H, W); ``pretrained`` whether trained weights
    were loaded; ``weights`` where they came from (a path, URL or enum name) or a note saying the
    model has its default initialization.
    """

    model: nn.Module
    name: str
    num_classes: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    input_size: tuple = (224, 224)
    pretrained: bool = False
    weights: str = ""
    notes: list = field(default_factory=list)


def is_cifar_model(name: str) -> bool:
    """Whether ``name`` names one of the CIFAR ResNets (``resnet20`` ... ``resnet110``, also with a ``cifar_`` or
    ``cifar10_`` prefix), which :func:`load_model` builds here, rather than a torchvision model."""
    return _cifar_depth(name) is not None


def _cifar_depth(name: str) -> int | None:
    n = name.lower().removeprefix("cifar_").removeprefix("cifar10_")
    if n.startswith("resnet"):
        try:
            d = int(n[len("resnet"):])
        except ValueError:
            return None
        return d if d in CIFAR_DEPTHS else None
    return None


def list_models() -> list[str]:
    """Names :func:`load_model` accepts: the CIFAR ResNets, then torchvision's classification models."""
    names = [f"resnet{d}" for d in CIFAR_DEPTHS]
    try:
        import torchvision

        names += sorted(torchvision.models.list_models(module=torchvision.models))
    except Exception:  # pragma: no cover - torchvision is a dependency
        pass
    return names


def _is_path_like(weights) -> bool:
    """A path, existing or not: a Path, a string naming something that exists, holding a separator, or with a
    file suffix ("weights.ckpt"; the keywords and torchvision's weights names have none)."""
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (Path(weights).exists() or "/" in weights or os.sep in weights
                                         or Path(weights).suffix != "")


def model_builder(name: str, num_classes: int | None = None) -> tuple[str, dict]:
    """``(builder, builder_kwargs)`` that rebuild model ``name`` untrained, for :func:`kcengine.save_compressed`
    (so that :func:`kcengine.load_compressed` needs no skeleton)."""
    depth = _cifar_depth(name)
    if depth is not None:
        return "kcengine.models.cifar_resnet:cifar_resnet", {"depth": depth, "num_classes": num_classes or 10}
    return "torchvision.models:get_model", {"name": name, "weights": None, "num_classes": num_classes or 1000}


def _checkpoint_file(path) -> Path:
    """``path``, or for the report folder of prune/finetune --out its model.pt (MissingWeightsError when absent)."""
    if not Path(path).is_dir():
        return Path(path)
    inner = Path(path) / OUT_MODEL_NAME
    if not inner.is_file():
        raise MissingWeightsError(f"weights {str(path)!r} is a folder without a {OUT_MODEL_NAME} (the file "
                                  f"kcengine prune/finetune --out write there); give a checkpoint file")
    return inner


def _cifar_name_of_file(path) -> str | None:
    """The CIFAR ResNet whose blocks a checkpoint file holds (``resnet{6n+2}`` for n blocks in layer1), or None
    when it holds no such layout or cannot be read."""
    try:
        keys = list(strip_prefixes(read_checkpoint(_checkpoint_file(path))).keys())
    except Exception:  # only a hint for an error already on its way
        return None
    blocks = {int(m.group(1)) for m in (re.match(r"layer1\.(\d+)\.", k) for k in keys) if m}
    if not blocks or blocks != set(range(len(blocks))):
        return None
    depth = 6 * len(blocks) + 2
    return f"resnet{depth}" if depth in CIFAR_DEPTHS else None


def _fill_from_file(model: nn.Module, path) -> nn.Module:
    """``model`` with the weights in the file at ``path``: a compact checkpoint of :func:`kcengine.save_compressed`
    (what ``kcengine prune/finetune --out`` write) comes back with its clustered layers clustered (a new module;
    ``model`` is the skeleton), any other checkpoint is loaded into ``model`` as a state dict."""
    from ..conv.serialize import is_compressed_file, load_compressed

    path = _checkpoint_file(path)
    if is_compressed_file(path):  # False for a missing file: read_checkpoint then says so
        return load_compressed(path, model)  # a file for another architecture: ValueError "does not fit"
    load_state_dict_into(model, read_checkpoint(path))
    return model


def _cached_hub_load(url: str, what: str, allow_download: bool) -> dict:
    cached = hub_cache_path(url)
    if not cached.is_file() and not allow_download:
        raise MissingWeightsError(
            f"pretrained weights for {what} are not in the torch hub cache ({cached}) and downloading is off; "
            f"copy the file there, or pass --weights PATH, or use --weights none for speed-only work")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except MissingWeightsError:
        raise
    except Exception as exc:
        raise MissingWeightsError(
            f"pretrained weights for {what} could not be had: not in the torch hub cache ({cached}) and the "
            f"download of {url} failed ({type(exc).__name__}: {str(exc)[:120]}); copy the file into "
            f"{cached.parent}, or pass --weights PATH, or use --weights none for speed-only work") from None


def load_model(name: str, weights="pretrained", *, num_classes: int | None = None,
               allow_download: bool = True) -> LoadedModel:
    """Build model ``name`` and load ``weights``.

    Args:
        name: ``resnet20|32|44|56|110`` (CIFAR) or a torchvision classification model name.
        weights: ``"pretrained"`` (also ``"default"``, ``"DEFAULT"``: the public weights for ``name``), a
            torchvision weights enum or its name (``ResNet18_Weights.IMAGENET1K_V1``, ``"IMAGENET1K_V2"``), a
            checkpoint path (a ``str`` or ``os.PathLike``; a state dict in any common wrapping, or a
            :func:`kcengine.save_compressed` file such as ``kcengine prune --out``'s ``model.pt``, whose
            clustered layers come back clustered; that ``--out`` folder itself also works), or ``None`` (also
            ``"none"``, ``"random"``, ``"init"``) for the default init.  A string with a ``/`` or a file suffix
            is read as a path.
        num_classes: output classes (default 10 for CIFAR, 1000 for torchvision).
        allow_download: when False, pretrained weights come only from the torch hub cache.

    The model remembers how it was built (:func:`model_builder`): :func:`kcengine.save_compressed` of it, or of
    its compressed or finetuned copy, records that builder, and :func:`kcengine.load_compressed` then needs no
    skeleton.

    Raises:
        ValueError: unknown model name or weights name.
        MissingWeightsError: the pretrained weights are neither cached nor downloadable, or a
            weights path does not exist.
    """
    check_int(num_classes, "num_classes", 1, optional=True)  # 0 read as "not given" (10), -1 a torch RuntimeError
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a model name such as 'resnet20' or 'resnet18', got {name!r}")
    depth = _cifar_depth(name)
    if depth is not None:
        out = _load_cifar(f"resnet{depth}", depth, weights, num_classes, allow_download)
    else:
        out = _load_torchvision(name, weights, num_classes, allow_download)
    # how to build it again untrained: save_compressed records it, so that load_compressed needs no skeleton
    from ..conv.serialize import BUILDER_ATTR

    setattr(out.model, BUILDER_ATTR, model_builder(out.name, out.num_classes))
    return out


def _load_cifar(name, depth, weights, num_classes, allow_download) -> LoadedModel:
    model = CifarResNet(depth, num_classes or 10)
    out = LoadedModel(model, name, num_classes or 10, CIFAR_MEAN, CIFAR_STD, (32, 32))
    if weights in _NONE:
        out.weights = "default initialization (no pretrained weights loaded)"
        out.notes.append(f"{name}: default initialization; accuracy figures are meaningless")
    elif _is_path_like(weights):
        try:
            out.model = _fill_from_file(model, weights)
        except ValueError as exc:
            other = _cifar_name_of_file(weights) if "does not fit" in str(exc) else None
            if other is None or other == name:
                raise
            raise ValueError(f"{exc}; the file holds a {other} (its layer1 has that depth's blocks): pass "
                             f"name={other!r}") from None
        out.pretrained, out.weights = True, str(weights)
    elif weights in _PRETRAINED:
        url = CIFAR_CHECKPOINT_URLS[name]
        from .checkpoints import extract_state_dict

        load_state_dict_into(model, extract_state_dict(_cached_hub_load(url, name, allow_download)))
        out.pretrained, out.weights = True, url
    else:
        raise ValueError(f"weights={weights!r} is not a path, 'pretrained' or None for CIFAR model {name}")
    out.model.eval()
    return out


def _load_torchvision(name, weights, num_classes, allow_download) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        cifar = ", ".join(f"resnet{d}" for d in CIFAR_DEPTHS)
        raise ValueError(f"name={name!r} is not a known model: CIFAR ResNets {cifar} or a torchvision classification "
                         f"model such as resnet18, resnet50, mobilenet_v3_small")
    enum = torchvision.models.get_model_weights(name)
    out = LoadedModel(None, name, num_classes or 1000, IMAGENET_MEAN, IMAGENET_STD,  # type: ignore[arg-type]
                      (224, 224))
    if isinstance(weights, str) and weights.startswith(enum.__name__ + "."):  # "ResNet18_Weights.IMAGENET1K_V1"
        weights = weights[len(enum.__name__) + 1:]
    if weights in _NONE or _is_path_like(weights):
        out.model = torchvision.models.get_model(name, weights=None, num_classes=out.num_classes)
        if weights in _NONE:
            out.weights = "default initialization (no pretrained weights loaded)"
            out.notes.append(f"{name}: default initialization; accuracy figures are meaningless")
        else:
            out.model = _fill_from_file(out.model, weights)
            out.pretrained, out.weights = True, str(weights)
    else:
        if isinstance(weights, torchvision.models.WeightsEnum):  # the enum member itself, as torchvision takes it
            if type(weights) is not enum:
                raise ValueError(f"weights={weights} are {type(weights).__name__}, not {name}'s "
                                 f"({enum.__name__})")
            weights = weights.name
        key = "DEFAULT" if weights in _PRETRAINED else str(weights)
        try:
            w = enum.DEFAULT if key == "DEFAULT" else enum[key]
        except KeyError:
            raise ValueError(f"weights={weights!r} is not one of {name}'s weights "
                             f"{[m.name for m in enum]} nor a path") from None
        if num_classes not in (None, len(w.meta.get("categories", []))):
            raise ValueError(f"num_classes={num_classes} does not match {w} "
                             f"({len(w.meta.get('categories', []))} classes)")
        cached = hub_cache_path(w.url)
        if not cached.is_file() and not allow_download:
            raise MissingWeightsError(
                f"pretrained weights {name}.{w.name} are not in the torch hub cache ({cached}) and downloading is "
                f"off; copy the file there, or pass --weights PATH, or use --weights none for speed-only work")
        try:
            out.model = torchvision.models.get_model(name, weights=w)
        except Exception as exc:
            raise MissingWeightsError(
                f"pretrained weights {name}.{w.name} could not be had: not in the torch hub cache ({cached}) and "
                f"the download of {w.url} failed ({type(exc).__name__}: {str(exc)[:120]}); copy the file into "
                f"{cached.parent}, or pass --weights PATH, or use --weights none for speed-only work") from None
        tf = w.transforms()
        out.mean, out.std = tuple(tf.mean), tuple(tf.std)
        out.input_size = (tf.crop_size[0], tf.crop_size[0])
        out.pretrained, out.weights = True, f"{name}.{w.name} ({w.url})"
    out.model.eval()
    return out
