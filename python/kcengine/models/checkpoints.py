"""Reading weights from whatever checkpoint format people have.

Accepted forms (after ``torch.load``): a raw state_dict; ``{'state_dict': ...}``;
``{'model': ...}`` (a state_dict or a whole ``nn.Module``); ``{'model_state_dict': ...}``;
``{'net': ...}``; a pickled ``nn.Module``.  Keys prefixed ``module.`` (DataParallel /
DistributedDataParallel) or ``_orig_mod.`` (torch.compile) are stripped.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._checks import first_line, state_dict_misfit

__all__ = ["MissingWeightsError", "extract_state_dict", "strip_prefixes", "load_state_dict_into", "read_checkpoint",
           "hub_cache_path"]

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")
# BatchNorm counters that older checkpoints do not carry; absent, they keep their init (0).
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights were asked for but cannot be had here; the message says what to do."""


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the ``module.`` / ``_orig_mod.`` prefixes removed from every key (repeatedly)."""
    out = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k in out:
            raise ValueError(f"checkpoint has two entries for {k!r} once prefixes are stripped (one was {key!r})")
        out[k] = value
    return out


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The state_dict (prefixes stripped) inside a loaded checkpoint object of any accepted form."""
    if isinstance(obj, nn.Module):
        return strip_prefixes(obj.state_dict())
    if _is_tensor_dict(obj):
        return strip_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if key in obj:
                return extract_state_dict(obj[key])
        keys = sorted(str(k) for k in obj.keys())[:8]
        raise ValueError(f"checkpoint holds no state_dict: expected tensors or one of {_CONTAINER_KEYS}, "
                         f"found keys {keys}")
    raise ValueError(f"checkpoint holds no state_dict: got an object of type {type(obj).__name__}")


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Load the file at ``path`` on the CPU and return its state_dict.

    Tries ``weights_only=True`` first (safe); a file that pickles a whole module needs
    ``weights_only=False``, which is used only for files the caller named explicitly.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"weights file must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise MissingWeightsError(f"weights file {str(path)!r} is a folder, not a checkpoint file")
    if not path.is_file():
        raise MissingWeightsError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # not a torch file: UnpicklingError, a truncated zip's RuntimeError, EOFError, ...
            first = first_line(exc)
            raise ValueError(f"weights file {str(path)!r} could not be read by torch.load "
                             f"({type(exc).__name__}{': ' + first if first else ''})") from None
    return extract_state_dict(obj)


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model`` (in place), with a readable error on any mismatch.

    Keys must match exactly, except BatchNorm ``num_batches_tracked`` counters, which older
    checkpoints lack.  Shapes must match.
    """
    state = strip_prefixes(state)
    misfit = state_dict_misfit(model.state_dict(), state, _OPTIONAL_SUFFIXES)
    if misfit:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: {misfit}")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return model


def hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` keeps (and looks for) the file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
