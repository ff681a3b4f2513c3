"""Progressive clustering: the order in which layer groups are clustered, and the k of every layer."""
from __future__ import annotations

import re

from torch import nn

__all__ = ["default_order", "resolve_order"]


def default_order(names: list[str]) -> list[list[str]]:
    """Group conv names by their top-level module (``layer3.*``, ``layer2.*``, ..., ``conv1``) and cluster
    the deepest group first: late layers are the most redundant and cheapest to recover, and the
    early layers, clustered last, are then recovered with everything downstream already adapted."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    return [g for g in reversed(list(groups.values()))]


def resolve_order(order, names: list[str]) -> list[list[str]]:
    """Stages as lists of conv names from ``order``: None (``default_order``), or a list whose items are
    a layer name, a module name (``"layer1"``: every conv of the plan inside it, as the default groups are),
    a regex (full match) or a list of names.  Every name must be a conv of the plan and
    appear in exactly one stage; names no stage mentions are not clustered."""
    if order is None:
        return default_order(names)
    if isinstance(order, (str, bytes)) or not hasattr(order, "__iter__"):
        raise ValueError(f"order must be a list of stages (names, regexes or lists of names), got order={order!r}")
    stages, used = [], set()
    for item in order:
        if isinstance(item, str):
            stage = [item] if item in names else [n for n in names if n.startswith(item + ".")]
            if not stage:
                try:
                    stage = [n for n in names if re.fullmatch(item, n)]
                except re.error as exc:
                    raise ValueError(f"order stage {item!r} is neither a layer, a module holding layers, nor a "
                                     f"valid regex ({exc})") from None
        elif isinstance(item, (list, tuple)) and all(isinstance(s, str) for s in item):
            bad = [s for s in item if s not in names]
            if bad:
                raise ValueError(f"order stage {list(item)!r} names {bad}, which are not clustered by the plan; "
                                 f"layers are {names}")
            stage = list(item)
        else:
            raise ValueError(f"order items must be a layer name, a regex or a list of names, got {item!r}")
        if not stage:
            raise ValueError(f"order stage {item!r} matches no layer of the plan; layers are {names}")
        twice = [s for s in stage if s in used]
        if twice:
            raise ValueError(f"order puts {twice} in more than one stage")
        used.update(stage)
        stages.append(stage)
    return stages


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
