"""Inference rewrite: fold ``ClusteredConv2d -> BatchNorm2d [-> (+ residual)] [-> ReLU]`` into one layer.

:func:`fuse_for_inference` traces the model with ``torch.fx`` and replaces each chain

* ``conv -> bn -> relu``                 by ``conv'(x)``            (gather + BN affine + ReLU in one pass),
* ``conv -> bn -> add(., r) -> relu``    by ``conv'(x, residual=r)`` (a ResNet BasicBlock/Bottleneck tail),
* ``conv -> bn``                         by ``conv'(x)``,

where ``conv'`` is :meth:`ClusteredConv2d.fuse_bn_relu` of the layer.  A link is fused only when each
intermediate result has exactly one user and the conv module is called once; an in-place
``r += bn(...)`` only when ``r`` has no other user (eager mode would change ``r`` for them, the fused layer
does not); and not when anything between the conv and the chain's end writes in place (the fused call reads
the conv's input and the residual where the chain ended).  A BatchNorm without running statistics is left
unfused.  Works for any FX-traceable model (torchvision ResNets are); the input model is not modified.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .module import ClusteredConv2d

__all__ = ["fuse_for_inference"]

_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FNS = (torch.relu, torch.nn.functional.relu, torch.relu_)


class _Proxy(fx.Proxy):
    """A proxy that records ``a += b`` (and -=, *=, /=) as the in-place operator.  fx.Proxy has no in-place
    dunders, so Python falls back to ``a = a + b`` and the graph loses the write: code that reads the old
    tensor under another name afterwards (``t = s; s += y; ... t``) then sees ``s`` in eager mode and the
    unchanged value in the traced copy."""

    def _inplace(self, op, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._inplace(operator.iadd, other)

    def __isub__(self, other):
        return self._inplace(operator.isub, other)

    def __imul__(self, other):
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, other)


class _Tracer(fx.Tracer):
    """Keeps ClusteredConv2d as a leaf (its forward validates real tensors) and records in-place arithmetic
    as such (:class:`_Proxy`)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ClusteredConv2d) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _is_module(node, gm, cls) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), cls)


def _is_relu(node, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and (node.target in _RELU_FNS or node.target in ("relu",
                                                                                                       "relu_"))


_INPLACE_OPS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                operator.imatmul)


def _writes_in_place(node, gm) -> bool:
    """Whether ``node`` may write into a tensor it is given: in-place arithmetic, a ``*_`` method or function,
    an ``inplace=True`` argument or module, an ``out=`` argument.  (Conservative: such a node between a conv and
    the end of its chain keeps the chain unfused.)"""
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_method":
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        return node.target in _INPLACE_OPS or (name.endswith("_") and not name.startswith("_"))
    return False


def _writes_between(first, last, chain, gm) -> bool:
    """Whether a node after ``first`` and before ``last`` (graph order), outside ``chain``, writes in place:
    the fused call runs where ``last`` was and reads the conv's input and the residual there, so a write between
    would change what it reads (eager mode read them at the conv)."""
    node = first.next
    while node is not last and node.op != "root":
        if node not in chain and _writes_in_place(node, gm):
            return True
        node = node.next
    return False


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fuse_for_inference(model: nn.Module) -> fx.GraphModule:
    """An eval-mode copy of ``model`` with every clustered conv's following BN (+ residual add) (+ ReLU) fused.

    Returns a ``torch.fx.GraphModule``; raises ValueError when the model cannot be traced.
    """
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as exc:  # tracing failures come in many types
        raise ValueError(f"model could not be traced by torch.fx ({type(exc).__name__}: {exc}); "
                         f"fuse its blocks with ClusteredConv2d.fuse_bn_relu instead") from exc
    graph = gm.graph
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for conv_node in list(graph.nodes):
        if not _is_module(conv_node, gm, ClusteredConv2d) or calls[conv_node.target] != 1:
            continue
        conv = gm.get_submodule(conv_node.target)
        # a layer that already carries an affine (scale/shift) composes with the BN; one ending in ReLU cannot
        if conv.relu or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        bn_node = _only_user(conv_node)
        if bn_node is None or not _is_module(bn_node, gm, nn.BatchNorm2d):
            continue
        bn = gm.get_submodule(bn_node.target)
        if bn.running_mean is None or bn.running_var is None:  # batch statistics even in eval: nothing to fold
            continue
        nxt = _only_user(bn_node)
        residual, relu_node, add_node, last = None, None, None, bn_node
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2 \
                and not nxt.kwargs:
            other = nxt.args[1] if nxt.args[0] is bn_node else nxt.args[0]
            after = _only_user(nxt)
            # `r += bn(conv(x))` writes into r: fused, r is left as it was, so r may have no other user
            # (one that reads r after the add would see the sum in eager mode, the old r once fused).
            writes_residual = nxt.target is operator.iadd and nxt.args[0] is other
            if isinstance(other, fx.Node) and other is not bn_node and after is not None and _is_relu(after, gm) \
                    and not (writes_residual and len(other.users) != 1):
                residual, relu_node, add_node, last = other, after, nxt, after
        elif nxt is not None and _is_relu(nxt, gm):
            relu_node, last = nxt, nxt
        if _writes_between(conv_node, last, {bn_node, add_node, relu_node}, gm):
            continue
        fused = conv.fuse_bn_relu(bn, relu=relu_node is not None)
        name = conv_node.target.replace(".", "_") + "_fused"
        gm.add_submodule(name, fused)
        with graph.inserting_before(last):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = graph.call_module(name, args)
        last.replace_all_uses_with(new)
        chain = [n for n in (relu_node, add_node, bn_node, conv_node) if n is not None]
        for n in chain:
            graph.erase_node(n)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
