"""Compact checkpoints of models holding :class:`ClusteredConv2d` layers.

File format (one ``torch.save`` of plain containers, loadable with ``torch.load(weights_only=True)``)::

    {"format": "kcengine.compressed/1",
     "state_dict": model.state_dict(),          # codebooks as floats, indexes as uint8/int16/int32 (the
                                                # per-element layers' int64 index is written so too)
     "clustered": {module_path: layer config},  # what ClusteredConv2d(...) needs to be rebuilt
     "element": {module_path: geometry + K},    # per-element layers (compress granularity="element")
     "builder": "pkg.module:callable" | None, "builder_kwargs": {...}}

Rebuilding: the architecture is not pickled (weights_only forbids code).  :func:`load_compressed` takes a
*skeleton*, any ``nn.Module`` of the original architecture (dense or clustered); the layers at the recorded
paths are replaced by ``ClusteredConv2d`` built from their configs, then the whole state_dict is loaded strictly
(files written before the "element" key existed read as having none).  Alternatively ``save_compressed(...,
builder="torchvision.models:resnet18")`` records an importable constructor, and ``load_compressed(path)`` calls
it (with ``builder_kwargs``) to make the skeleton — only do that for files you trust.  Models from
:func:`kcengine.models.load_model` and kcengine's own CIFAR ResNets record theirs without being asked
(``torchvision.models:get_model`` with the name and class count; ``kcengine.models.cifar_resnet:cifar_resnet``
with the depth and the class count).  A fused inference graph (:func:`fuse_for_inference`) saves too, but its
layers have new names (``layer1_0_conv1_fused``), so it loads only into a skeleton fused the same way: save the
model before fusing, and fuse after loading.
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .._checks import first_line, scalar_value, state_dict_misfit
from .module import ClusteredConv2d, conv_padding, index_dtype_for, replace_module

__all__ = ["save_compressed", "load_compressed", "is_compressed_file", "checkpoint_sizes", "dense_state_dict",
           "conv_geometry", "layer_config", "layer_from_config"]

FORMAT = "kcengine.compressed/1"


def conv_geometry(m: nn.Module) -> dict:
    """The constructor's geometry of a conv (``nn.Conv2d`` or :class:`ClusteredConv2d`), padding as numbers
    (:func:`~kcengine.conv.module.conv_padding`); ``padding_mode`` and ``padding_extra`` only where they are not
    zeros (files written before they existed read as zeros)."""
    padding, extra = conv_padding(m)
    geo = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
           "stride": list(m.stride), "padding": list(padding), "dilation": list(m.dilation), "groups": m.groups}
    if getattr(m, "padding_mode", "zeros") != "zeros":
        geo["padding_mode"] = m.padding_mode
    if any(extra):
        geo["padding_extra"] = list(extra)
    return geo


def layer_config(m: ClusteredConv2d) -> dict:
    """What :func:`layer_from_config` needs to rebuild ``m`` empty (its tensors come from a state dict):
    geometry, k, granularity, bias, a fused ReLU, the ``scale``/``shift`` buffers, and ``"cosine": True``
    for a layer of :func:`kcengine.compress`'s cosine option (norms in ``scale``, bias in ``shift``)."""
    cfg = {**conv_geometry(m), "num_clusters": m.num_clusters, "bias": m.bias is not None,
           "granularity": m.granularity, "relu": bool(m.relu), "fused_bn": m.scale is not None}
    if m._kc_cosine:
        cfg["cosine"] = True
        if not m._kc_cosine_bias:
            cfg["cosine_bias"] = False  # the conv had no bias: shift holds zeros
    return cfg


def layer_from_config(cfg: dict, *, dtype=None, device=None) -> ClusteredConv2d:
    """An empty ClusteredConv2d shaped as :func:`layer_config` recorded (its state dict loads strictly)."""
    cfg = dict(cfg)
    relu, fused, cosine = cfg.pop("relu", False), cfg.pop("fused_bn", False), cfg.pop("cosine", False)
    cosine_bias = cfg.pop("cosine_bias", True)
    layer = ClusteredConv2d(**cfg, dtype=dtype, device=device)
    layer.relu = relu
    if fused:
        layer.scale = torch.empty(cfg["out_channels"], dtype=layer.codebook.dtype, device=device)
        layer.shift = torch.empty(cfg["out_channels"], dtype=layer.codebook.dtype, device=device)
    layer._kc_cosine = cosine
    if cosine and not cosine_bias:
        layer._kc_cosine_bias = False
    return layer


def _element_layers(model: nn.Module) -> dict:
    from ..compress.layers import ElementClusteredConv2d

    return {name: m for name, m in model.named_modules() if isinstance(m, ElementClusteredConv2d)}


def element_config(m) -> dict:
    """What :func:`element_from_config` needs to rebuild an ``ElementClusteredConv2d`` empty."""
    return {**conv_geometry(m), "num_clusters": int(m.num_clusters), "bias": m.bias is not None}


def element_from_config(cfg: dict, *, dtype=None):
    """An empty ``ElementClusteredConv2d`` shaped as :func:`element_config` recorded."""
    from ..compress.layers import ElementClusteredConv2d

    cfg = dict(cfg)
    k, bias = int(cfg.pop("num_clusters")), bool(cfg.pop("bias"))
    extra = tuple(cfg.pop("padding_extra", (0, 0)))
    conv = nn.Conv2d(**cfg, bias=bias, dtype=dtype)
    c_out, cig, kh, kw = conv.weight.shape
    d = cig * kh * kw
    layer = ElementClusteredConv2d(conv, torch.zeros(d, k, dtype=conv.weight.dtype),
                                   torch.zeros(c_out, d, dtype=torch.int64))
    layer.padding_extra = extra
    return layer


_PLAIN = (bool, int, float, str, type(None))


def _plain_value(v, where: str):
    """``v`` in the types ``torch.load(weights_only=True)`` reads back (numpy and 0-d torch scalars as the Python
    numbers they hold); ValueError naming ``where`` for anything else: the file would save and never load."""
    if type(v) in _PLAIN:
        return v
    plain = scalar_value(v)  # numpy scalars (np.float64 is a float subclass: the unpickler refuses it), 0-d tensors
    if type(plain) in _PLAIN:
        return plain
    for kind in (bool, int, float, str):  # other subclasses (an IntEnum, np.str_): the plain value
        if isinstance(v, kind):
            return kind(v)
    if isinstance(v, (list, tuple)):
        out = [_plain_value(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return out if isinstance(v, list) else tuple(out)
    if isinstance(v, dict):
        return {_plain_key(k, where): _plain_value(x, f"{where}[{k!r}]") for k, x in v.items()}
    raise ValueError(f"{where} is a {type(v).__name__} ({v!r:.60}): builder_kwargs may hold only None, bool, int, "
                     f"float, str and lists, tuples and dicts of them (the file must load with "
                     f"torch.load(weights_only=True)); pass e.g. str(path)")


def _plain_key(k, where: str):
    if not isinstance(k, (str, int)) or isinstance(k, bool):
        raise ValueError(f"{where} has the key {k!r} ({type(k).__name__}): keys must be str or int")
    return k


def _resolve_builder(builder, where: str):
    """The callable ``builder`` ('package.module:callable') names; ValueError starting with ``where`` when it is
    not so spelled or does not import here.  Checked at save time too, so that a file whose builder cannot run
    is refused when written, not found out when loaded."""
    if not isinstance(builder, str) or builder.count(":") != 1 or not all(builder.partition(":")[::2]):
        raise ValueError(f"{where} must be 'package.module:callable', got {builder!r}")
    mod_name, _, fn_name = builder.partition(":")
    try:
        build = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where} {builder!r} cannot be imported here ({exc})") from None
    if not callable(build):
        raise ValueError(f"{where} {builder!r} is a {type(build).__name__}, not a callable")
    return build


def _payload(model: nn.Module, builder, builder_kwargs) -> dict:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if builder is not None:
        _resolve_builder(builder, "builder")
    if builder_kwargs is not None and not isinstance(builder_kwargs, Mapping):
        raise ValueError(f"builder_kwargs must be a dict of the builder's keyword arguments or None, got "
                         f"{type(builder_kwargs).__name__}")
    kwargs = {}
    for key, v in (builder_kwargs or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"builder_kwargs keys must be argument names (str), got {key!r}")
        kwargs[key] = _plain_value(v, f"builder_kwargs[{key!r}]")
    clustered = {name: layer_config(m) for name, m in model.named_modules() if isinstance(m, ClusteredConv2d)}
    elements = _element_layers(model)
    element = {name: element_config(m) for name, m in elements.items()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, m in elements.items():  # int64 in the layer (gather takes no other); its values fit K's width
        key = f"{name}.index" if name else "index"
        if key in state:
            state[key] = state[key].to(index_dtype_for(int(m.num_clusters)))
    return {"format": FORMAT, "state_dict": state, "clustered": clustered, "element": element, "builder": builder,
            "builder_kwargs": kwargs}


def _check_path(path, for_writing: bool) -> Path:
    """``path`` as a Path; ValueError naming it when it is not a path, is a folder, or (writing) sits in a
    folder that does not exist -- torch.save/torch.load would raise a RuntimeError or AttributeError there."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; give the checkpoint file's path")
    if for_writing and not p.absolute().parent.is_dir():
        raise ValueError(f"path={str(path)!r}: its folder {str(p.absolute().parent)!r} does not exist")
    return p


BUILDER_ATTR = "_kcengine_builder"  # (builder, builder_kwargs) that kcengine.models.load_model leaves on its models
_OWN_BUILDERS = ("torchvision.models:get_model", "kcengine.models.cifar_resnet:cifar_resnet")


def _own_builder(model: nn.Module):
    """``(builder, builder_kwargs)`` that rebuild ``model`` when it is one of kcengine's CIFAR ResNets (its class
    exactly, with its classifier as built) or came from :func:`kcengine.models.load_model` (which records how it
    built the model in ``BUILDER_ATTR``), else ``(None, None)``.  :func:`save_compressed` records it only where
    the skeleton it builds fits the file (a model changed since it was loaded, a new classifier say, does not)."""
    from ..models.cifar_resnet import CifarResNet

    tag = getattr(model, BUILDER_ATTR, None)  # only the builders load_model records are called on a tag's word
    if isinstance(tag, tuple) and len(tag) == 2 and tag[0] in _OWN_BUILDERS and isinstance(tag[1], Mapping):
        return tag[0], dict(tag[1])
    linear = getattr(model, "linear", None)
    if type(model) is not CifarResNet or type(linear) is not nn.Linear:
        return None, None
    return "kcengine.models.cifar_resnet:cifar_resnet", {"depth": model.depth, "num_classes": linear.out_features}


def _builder_fits(payload: dict) -> bool:
    """Whether the skeleton ``payload``'s builder makes takes the file's layers and state dict, as
    :func:`load_compressed` will ask of it.  All on the meta device, the skeleton and the clustered layers built
    into it: only shapes are compared, so nothing needs memory or initial values."""
    try:
        build = _resolve_builder(payload["builder"], "builder")
        with torch.device("meta"):
            _fit_layers(build(**payload["builder_kwargs"]), payload, "the file")
    except Exception:  # any failure, a builder that cannot run on the meta device too: record none, as before
        return False
    return True


def save_compressed(model: nn.Module, path, *, builder: str | None = None, builder_kwargs: dict | None = None) -> int:
    """Write ``model``'s compact checkpoint to ``path`` (a file path); returns the bytes written.

    ``builder``: ``"package.module:callable"`` that makes a skeleton of the architecture, called with
    ``builder_kwargs`` by :func:`load_compressed` when it is given no model; it must import here.  Left None
    for a model from :func:`kcengine.models.load_model` (a CIFAR ResNet or a torchvision model, then compressed
    or finetuned) or one of kcengine's CIFAR ResNets, the model's own is recorded, so that file too loads
    without a skeleton; where the model no longer fits its own builder (a classifier replaced since), none is.
    """
    path = _check_path(path, for_writing=True)
    own = builder is None and builder_kwargs is None
    if own:
        builder, builder_kwargs = _own_builder(model)
    payload = _payload(model, builder, builder_kwargs)
    if own and payload["builder"] is not None and not _builder_fits(payload):
        payload["builder"], payload["builder_kwargs"] = None, {}
    torch.save(payload, path)
    return os.path.getsize(path)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """:func:`replace_module` with the skeleton's fit checked by name; returns the (new) root."""
    if not path:  # the model is the layer itself
        return replace_module(root, path, new)
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError as exc:
        raise ValueError(f"the skeleton has no module {parent_path!r} (needed for clustered layer {path!r})") from exc
    if not hasattr(parent, leaf):
        hint = (" (the file was saved from fuse_for_inference's graph: load it into a skeleton fused the same way, "
                "or save the model before fusing)" if leaf.endswith("_fused") else "")
        raise ValueError(f"the skeleton has no module {path!r} to replace with a clustered layer{hint}")
    return replace_module(root, path, new)  # at every path of that module: one shared conv stays one layer


def is_compressed_file(path) -> bool:
    """True when ``path`` is a file written by :func:`save_compressed` (read with ``weights_only=True``; any
    file that cannot be read so, or holds something else, gives False).  Memory-mapped, so the tensors are not
    read: the check costs about one read of the file's index, not of its weights."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_compressed(path, model: nn.Module | None = None, *, map_location="cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed`.

    ``model``: a skeleton of the architecture (not modified; a copy is filled).  Without it, the
    file's recorded ``builder`` constructs one; with neither, ValueError.  Loads with
    ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``, in the skeleton's dtype (as
    ``load_state_dict`` converts; the builder's model's without one).  The model comes back in eval
    mode (BatchNorm on its running statistics), as :func:`kcengine.models.load_model` returns one, whatever the
    skeleton's or the builder's mode: call ``.train()`` on it to finetune.

    Raises FileNotFoundError (or PermissionError) where ``path`` cannot be opened, as ``open`` does, and
    ValueError naming the file for anything else wrong with it or with ``model``.
    """
    _check_path(path, for_writing=False)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except pickle.UnpicklingError:  # torch's text here suggests weights_only=False: not for a file of unknown origin
        raise ValueError(f"{path} could not be read as a kcengine compressed checkpoint: its contents do not load "
                         f"with torch.load(weights_only=True), which every file save_compressed writes does") from None
    except Exception as exc:  # a truncated zip (RuntimeError), an empty file (EOFError), ...
        first = first_line(exc) or type(exc).__name__
        raise ValueError(f"{path} could not be read as a kcengine compressed checkpoint: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kcengine compressed checkpoint (format {FORMAT!r})")
    _check_payload(payload, path)
    if model is None:
        builder = payload.get("builder")
        if not builder:
            raise ValueError(f"model=None but {path} records no builder: pass model=<skeleton of the architecture>")
        try:
            build = _resolve_builder(builder, f"{path}: the recorded builder")
        except ValueError as exc:
            raise ValueError(f"{exc}: pass model=<skeleton of the architecture>") from None
        try:
            model = build(**payload.get("builder_kwargs", {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: builder {builder!r} failed with the recorded builder_kwargs "
                             f"{payload.get('builder_kwargs')!r} ({exc})") from None
    elif not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module skeleton or None, got {type(model).__name__}")
    else:
        model = _materialized(copy.deepcopy(model))
    model = _fit_layers(model, payload, path)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:  # what the key and shape comparison of _fit_layers does not see
        raise ValueError(f"compressed checkpoint {str(path)!r} does not fit {type(model).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    return model.eval()


def _fit_layers(model: nn.Module, payload: dict, path) -> nn.Module:
    """``model`` (a skeleton) with the file's clustered and per-element layers built in place of its own at the
    recorded paths, its state dict's keys and shapes checked against the file's; ValueError naming ``path``
    where they do not fit.  Returns the (possibly new) root; no weight is loaded yet."""
    state = payload["state_dict"]

    def misfit_error(detail) -> ValueError:  # (the model as it stands: a root-level layer replaces it)
        return ValueError(f"compressed checkpoint {str(path)!r} does not fit {type(model).__name__}: {detail}")

    kinds = ((payload["clustered"], layer_from_config, "clustered"),
             (payload.get("element", {}), element_from_config, "per-element"))
    for configs, build_layer, kind in kinds:
        for name, cfg in configs.items():
            # the skeleton's dtype, as load_state_dict converts every other layer to it (a float64 file into a
            # float32 skeleton gave float64 clustered layers among float32 ones); else the file's
            dtype = _skeleton_dtype(model, name)
            ref = state.get(f"{name}.codebook" if name else "codebook")
            if dtype is None and isinstance(ref, torch.Tensor):
                dtype = ref.dtype
            try:
                layer = build_layer(cfg, dtype=dtype)
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"{path}: {kind} layer {name!r} has an unusable config {cfg!r} ({exc})") from None
            try:
                model = _set_submodule(model, name, layer)
            except ValueError as exc:
                raise misfit_error(exc) from None
    misfit = state_dict_misfit(model.state_dict(), state)
    if misfit:
        raise misfit_error(misfit)
    return model


def _materialized(model: nn.Module) -> nn.Module:
    """A skeleton built on the meta device (``with torch.device("meta")``) given storage on the CPU, where the
    clustered layers are built, for the strict load to fill: copying into a meta tensor is a no-op, and the
    load "succeeded" with every other layer still on meta.  A buffer outside the state dict (non-persistent)
    would be left with no values: refused."""
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return model
    for mname, m in model.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            t = getattr(m, b, None)
            if isinstance(t, torch.Tensor) and t.is_meta:
                where = f"{mname}.{b}" if mname else b
                raise ValueError(f"model is a skeleton on the meta device whose buffer {where!r} is not in the state "
                                 f"dict (non-persistent): loading cannot give it values; build the skeleton on "
                                 f"the CPU")
    # Only the meta tensors get (empty) storage: to_empty would re-allocate every tensor, and a non-persistent
    # buffer with values would lose them.  One new tensor per old one keeps tied parameters tied.
    new = {}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in new:
                    empty = torch.empty_like(t, device="cpu")
                    new[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                table[name] = new[id(t)]
    return model


def _skeleton_dtype(model: nn.Module, name: str):
    """The floating dtype of the weight (or codebook) of ``model``'s module ``name``, or else of the model's
    first floating parameter (the module there may hold none: an ``nn.Identity`` placeholder), or None."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        old = None
    for t in ((getattr(old, "weight", None), getattr(old, "codebook", None)) if old is not None else ()):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def _check_payload(payload: dict, path) -> None:
    """ValueError naming the file when a payload with our format tag lacks what :func:`load_compressed`
    reads (a truncated or hand-edited file), instead of a KeyError deep inside the rebuild."""
    state, clustered = payload.get("state_dict"), payload.get("clustered")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: malformed compressed checkpoint, 'state_dict' is "
                         f"{type(state).__name__}, not a dict")
    if not isinstance(clustered, dict) or not all(isinstance(c, dict) for c in clustered.values()):
        raise ValueError(f"{path}: malformed compressed checkpoint, 'clustered' must map layer names to configs")
    element = payload.get("element", {})
    if not isinstance(element, dict) or not all(isinstance(c, dict) for c in element.values()):
        raise ValueError(f"{path}: malformed compressed checkpoint, 'element' must map layer names to configs")
    builder, kwargs = payload.get("builder"), payload.get("builder_kwargs", {})
    if builder is not None and (not isinstance(builder, str) or builder.count(":") != 1):
        raise ValueError(f"{path}: malformed compressed checkpoint, builder {builder!r} is not 'module:callable'")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: malformed compressed checkpoint, builder_kwargs is {type(kwargs).__name__}")


def dense_state_dict(model: nn.Module) -> dict:
    """``model``'s state_dict with every clustered layer written as a dense Conv2d (``weight`` [+ ``bias``])."""
    out = {}
    clustered = {name for name, m in model.named_modules() if isinstance(m, ClusteredConv2d)}
    clustered |= set(_element_layers(model))
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in clustered:
            if leaf == "codebook":
                out[f"{mod}.weight"] = model.get_submodule(mod).to_dense().detach().cpu().clone()
            elif leaf in ("bias", "scale", "shift"):
                out[k] = v.detach().cpu()
            continue  # index
        out[k] = v.detach().cpu()
    return out


def _nbytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def checkpoint_sizes(model: nn.Module) -> dict:
    """Bytes of the compact checkpoint vs the dense checkpoint (``torch.save`` of :func:`dense_state_dict`)."""
    comp = _nbytes(_payload(model, None, None))
    dense = _nbytes(dense_state_dict(model))
    return {"compressed_bytes": comp, "dense_bytes": dense, "ratio": dense / comp}
