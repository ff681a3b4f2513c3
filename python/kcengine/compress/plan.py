"""Compression plans: which conv layers to cluster and how many clusters each gets.

A plan is one of the k-selection strategies below (or a dict / string that parses into one; a bare
float is the ratio: ``plan=0.5`` is ``FixedRatio(0.5)``):

==========================  ==========================================  =======================================
strategy                    dict form                                   string form (CLI ``--plan``)
==========================  ==========================================  =======================================
:class:`FixedRatio`         ``{"ratio": 0.5}``                          ``ratio=0.5``
:class:`InertiaLimit`       ``{"inertia": 0.8}`` (absolute)             ``inertia=0.8``
                            ``{"relative_inertia": 0.1}``               ``relative_inertia=0.1``
:class:`Elbow`              ``{"elbow": [0.05, ..., 1.0]}``             ``elbow`` or ``elbow=0.05:1.0:0.05``
:class:`PerLayer`           ``{"layers": {"layer1.0.conv1": 8,          ``map:layer1.0.conv1=8,layer3\\..*=0.25``
                            "re:layer3\\..*": 0.25}}``
:class:`ByChannels`         ``{"channels": {16: 0.75, 64: 0.25}}``      ``channels:16=0.75,64=0.25``
:class:`OutputSensitivity`  ``{"sensitivity": 0.5}``                    ``sensitivity=0.5``
==========================  ==========================================  =======================================

Values given as a float in (0, 1] are ratios (``k = round(N * ratio)``, halves rounded up, at least 1), ints >= 1
are k itself.  ``N`` is the number of points a layer has at the chosen granularity: ``C_out`` for
"filter" and "element" (each coordinate of the filters has ``C_out`` values), ``C_out * C_in / groups``
for "kernel" (``C_out * C_in`` for an ungrouped conv).

:class:`PerLayer` keys are exact layer names, or regular expressions (``re:`` prefix, matched in
full with :func:`re.fullmatch`); exact names win over patterns, and patterns are tried in the
order given.  In the string form a key holding a regex character (``*+?[](){}|\\^$``) is a pattern without
the prefix (``map:layer3.*=4``); in the dict form only ``re:`` keys are.  Layers no key matches are left dense.
:class:`ByChannels` maps an output-channel count to a k or ratio ("groups by channel count"): all layers with
that ``C_out`` share the setting; layers whose ``C_out`` is not listed are left dense, and a listed count no conv
of the model has is an error (a typo, as an unknown name is for :class:`PerLayer`); a count only layers outside
``layers=`` have is taken and clusters nothing.

:class:`OutputSensitivity` needs data: it spends the unique filters of a ratio where the network's outputs
on training images suffer least (:func:`kcengine.train.sensitivity_plan`).  :func:`kcengine.finetune`
measures it on its training set; :func:`kcengine.compress` alone, which sees only weights, refuses it.

Layer *selection* (``layers=`` of :func:`kcengine.compress`) is separate: ``None`` (every
``nn.Conv2d``), ``"first"`` (only the first conv in module order), a regex string (full match),
or a list of exact names.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

__all__ = ["FixedRatio", "InertiaLimit", "Elbow", "PerLayer", "ByChannels", "OutputSensitivity", "KSelection", "parse_plan",
           "k_from_value", "select_layers", "DEFAULT_ELBOW_RATIOS"]

DEFAULT_ELBOW_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
MAX_ELBOW_POINTS = 1000  # ratios an elbow plan may try (each one a k per layer in the batched sweep)


def _check_ratio(r, what: str) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0 < float(r) <= 1):
        raise ValueError(f"{what} must be a ratio in (0, 1], got {r!r}")
    return float(r)


def ratio_to_k(n_points: int, ratio: float) -> int:
    """``k = round(N * ratio)`` (halves up), kept within [1, N].  The product is taken exactly on the decimal
    the ratio prints as, as a Python float (``100 * 0.145`` is 14.499999999999998 in floats, and gave 14; a
    numpy float32 ratio is widened first, and prints as its float64 value's decimal)."""
    exact = n_points * Fraction(repr(float(ratio)))
    return max(1, min(n_points, math.floor(exact + Fraction(1, 2))))


def k_from_value(value, n_points: int, where: str) -> int:
    """k for a layer of ``n_points`` points from an int k or a float ratio; checks the range."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: k or ratio must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        k = int(value)
        if k < 1 or k > n_points:
            raise ValueError(f"{where}: k={k} must be in [1, {n_points}] (the layer has {n_points} points)")
        return k
    if isinstance(value, numbers.Real):
        return ratio_to_k(n_points, _check_ratio(value, f"{where}: ratio"))
    raise ValueError(f"{where}: k or ratio must be an int >= 1 or a float in (0, 1], got {value!r}")


@dataclass(frozen=True)
class FixedRatio:
    """``k = round(N * ratio)`` for every selected layer."""

    ratio: float

    def __post_init__(self):
        object.__setattr__(self, "ratio", _check_ratio(self.ratio, "ratio"))

    def describe(self) -> str:
        return f"fixed ratio {self.ratio:g}"


@dataclass(frozen=True)
class InertiaLimit:
    """Smallest candidate k whose k-means inertia is <= ``limit`` (from a ``kmeans_sweep`` over the candidates:
    every k for layers of at most 64 points, else up to 64 ks spread geometrically over [1, N], successive ones a
    factor of about N^(1/63) apart, so the k chosen can be above the smallest k that meets the limit by up to
    that gap: 8% at N = 128, 19% at N = 65,536; see :func:`kcengine.compress.apply.candidate_ks`).

    ``relative=True``: the limit is a fraction of the layer's inertia at k = 1 (its total sum of
    squares around the mean), so one number fits layers of different weight scales.
    """

    limit: float
    relative: bool = False

    def __post_init__(self):
        if isinstance(self.limit, bool) or not isinstance(self.limit, numbers.Real) or not math.isfinite(self.limit) \
                or self.limit < 0:
            raise ValueError(f"inertia limit must be a finite number >= 0, got {self.limit!r}")
        if self.relative and self.limit > 1:
            raise ValueError(f"relative_inertia is a fraction of the k=1 inertia in [0, 1], got {self.limit!r}")

    def describe(self) -> str:
        return f"{'relative ' if self.relative else ''}inertia <= {self.limit:g}"


@dataclass(frozen=True)
class Elbow:
    """The elbow of each layer's inertia curve over ``ratios`` (k = round(N * r) for each r).

    The elbow is the point farthest below the chord joining the curve's ends, with k and inertia
    both scaled to [0, 1] (the "kneedle" rule for a decreasing convex curve).  At least 3 distinct ratios and at
    most ``MAX_ELBOW_POINTS`` (1000).
    """

    ratios: tuple = DEFAULT_ELBOW_RATIOS

    def __post_init__(self):
        if isinstance(self.ratios, (str, bytes)) or not isinstance(self.ratios, Iterable):
            raise ValueError(f"elbow takes a sequence of ratios in (0, 1] (e.g. [0.1, 0.2, ..., 1.0]), got "
                             f"{self.ratios!r}")
        rs = tuple(_check_ratio(r, "elbow ratio") for r in self.ratios)
        if len(rs) > MAX_ELBOW_POINTS:
            raise ValueError(f"elbow takes at most {MAX_ELBOW_POINTS} ratios, got {len(rs)}")
        if len(set(rs)) < 3:
            raise ValueError(f"elbow needs at least 3 distinct ratios, got {self.ratios!r}")
        object.__setattr__(self, "ratios", tuple(sorted(set(rs))))

    def describe(self) -> str:
        return f"elbow over ratios {self.ratios[0]:g}..{self.ratios[-1]:g} ({len(self.ratios)} points)"


@dataclass(frozen=True)
class OutputSensitivity:
    """As many unique filters in all as ``FixedRatio(ratio)`` gives (``sum round(C_out * ratio)``), split
    between the layers by the damage each does to the network's output: :func:`kcengine.train.sensitivity_plan`
    measures it on calibration images and resolves this plan into a :class:`PerLayer` one.  Filter granularity."""

    ratio: float

    def __post_init__(self):
        object.__setattr__(self, "ratio", _check_ratio(self.ratio, "sensitivity ratio"))

    def describe(self) -> str:
        return f"the unique filters of ratio {self.ratio:g}, split by output sensitivity"


@dataclass(frozen=True)
class PerLayer:
    """Explicit k or ratio per layer name or ``re:`` pattern (see the module docstring)."""

    mapping: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.mapping, Mapping) or not self.mapping:
            raise ValueError(f"a per-layer plan needs a non-empty mapping of layer name -> k or ratio, got "
                             f"{self.mapping!r}")
        for key, v in self.mapping.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"per-layer plan keys must be layer names or 're:' patterns, got {key!r}")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ValueError(f"per-layer plan pattern {key!r} is not a valid regex: {exc}") from None
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or (isinstance(v, numbers.Integral) and v < 1) \
                    or (not isinstance(v, numbers.Integral) and not (0 < v <= 1)):
                raise ValueError(f"per-layer plan value for {key!r} must be an int k >= 1 or a ratio in (0, 1], "
                                 f"got {v!r}")

    def value_for(self, name: str):
        if name in self.mapping:
            return self.mapping[name]
        for key, v in self.mapping.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return v
        return None

    def check_names(self, names: Sequence[str], model=None) -> None:
        """Every exact key must name a layer and every pattern must match one (``model``: where the error
        looks for second names of the layers)."""
        for key in self.mapping:
            if key.startswith("re:"):
                if not any(re.fullmatch(key[3:], n) for n in names):
                    raise ValueError(f"per-layer plan pattern {key!r} matches no conv layer; layers are "
                                     f"{_few(names)}")
            elif key not in names:
                hint = (f" (a pattern? in a dict plan write 're:{key}')"
                        if any(ch in key for ch in "*+?[](){}|\\^$") else "")
                hint = hint or _second_names(model, names, {key})
                raise ValueError(f"per-layer plan names layer {key!r}, which is not a selected conv layer{hint}; "
                                 f"layers are {_few(names)}")

    def describe(self) -> str:
        return "per-layer " + ", ".join(f"{k}={v}" for k, v in self.mapping.items())


@dataclass(frozen=True)
class ByChannels:
    """k or ratio per output-channel count (layers with other counts stay dense)."""

    mapping: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.mapping, Mapping) or not self.mapping:
            raise ValueError(f"a by-channels plan needs a non-empty mapping C_out -> k or ratio, got {self.mapping!r}")
        for c, v in self.mapping.items():
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
                raise ValueError(f"by-channels plan keys must be channel counts (ints >= 1), got {c!r}")
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or (isinstance(v, numbers.Integral) and v < 1) \
                    or (not isinstance(v, numbers.Integral) and not (0 < v <= 1)):
                raise ValueError(f"by-channels plan value for C_out={c} must be an int k >= 1 or a ratio in (0, 1], "
                                 f"got {v!r}")

    def describe(self) -> str:
        return "by channel count " + ", ".join(f"{c}={v}" for c, v in self.mapping.items())


KSelection = FixedRatio | InertiaLimit | Elbow | PerLayer | ByChannels | OutputSensitivity


def _second_names(model, names: Sequence[str], asked) -> str:
    """An error's note for names in ``asked`` that are a second path to a module of ``names`` (one conv reached
    twice, e.g. ``self.b = self.a``): ``named_modules`` gives each module once, by its first name."""
    if model is None:
        return ""
    wanted, first = set(names), {}
    for n, m in model.named_modules():
        first[id(m)] = n
    seconds = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False)
               if n in asked and first.get(id(m)) in wanted and first[id(m)] != n}
    if not seconds:
        return ""
    return " (" + "; ".join(f"{a!r} is layer {b!r} reached by a second path: name it {b!r}"
                            for a, b in seconds.items()) + ")"


def _few(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _number(text: str, what: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if v == 1.0 and "." in text:
        return 1.0
    return v


def _parse_pairs(body: str, what: str, key_int: bool) -> dict:
    out: dict = {}
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{what}: entry {item!r} must look like NAME=VALUE")
        key, _, val = item.rpartition("=")
        key = key.strip()
        if key_int:
            try:
                key = int(key)
            except ValueError:
                raise ValueError(f"{what}: channel count {key!r} is not an int") from None
        elif any(ch in key for ch in "*+?[](){}|\\^$") and not key.startswith("re:"):
            key = "re:" + key
        if key in out:
            raise ValueError(f"{what}: {key!r} is given twice ({out[key]} and {val.strip()})")
        out[key] = _number(val, f"{what} value for {key!r}")
    if not out:
        raise ValueError(f"{what}: no entries given")
    return out


def _parse_string(text: str):
    s = text.strip()
    low = s.lower()
    if low.startswith("map:"):
        return PerLayer(_parse_pairs(s[4:], "map plan", key_int=False))
    if low.startswith("channels:"):
        return ByChannels(_parse_pairs(s[9:], "channels plan", key_int=True))
    if low == "elbow":
        return Elbow()
    try:  # a bare number reads as the same number passed to parse_plan (--plan 0.5 as plan=0.5)
        bare = _number(s, "plan")
    except ValueError:
        bare = None
    if bare is not None:
        return parse_plan(bare)
    name, eq, val = s.partition("=")
    name = name.strip().lower()
    if not eq:
        raise ValueError(f"plan {text!r} is not understood; use R (a ratio), ratio=R, inertia=X, relative_inertia=F, "
                         f"elbow, elbow=START:STOP:STEP, map:NAME=K,..., channels:C=K,... or sensitivity=R")
    if name == "ratio":
        return FixedRatio(_number(val, "ratio"))
    if name == "inertia":
        return InertiaLimit(_number(val, "inertia"))
    if name == "relative_inertia":
        return InertiaLimit(_number(val, "relative_inertia"), relative=True)
    if name == "elbow":
        parts = val.split(":")
        if len(parts) != 3:
            raise ValueError(f"elbow range {val!r} must be START:STOP:STEP, e.g. 0.05:1.0:0.05")
        a, b, st = (float(_number(p, "elbow range")) for p in parts)
        if not all(math.isfinite(v) for v in (a, b, st)):
            raise ValueError(f"elbow range {val!r} needs finite START, STOP and STEP")
        if st <= 0 or a > b:
            raise ValueError(f"elbow range {val!r} needs START <= STOP and STEP > 0")
        span = (b - a) / st + 1e-9
        if not span < MAX_ELBOW_POINTS:  # (inf too, for a step that underflows the division)
            raise ValueError(f"elbow range {val!r} gives more than {MAX_ELBOW_POINTS} ratios (a larger STEP)")
        n = math.floor(span) + 1
        return Elbow(tuple(round(a + i * st, 6) for i in range(n)))
    if name == "sensitivity":
        return OutputSensitivity(_number(val, "sensitivity"))
    raise ValueError(f"plan {text!r}: unknown strategy {name!r}; use ratio, inertia, relative_inertia, elbow, "
                     f"sensitivity, map: or channels:")


def parse_plan(plan=None, ratio=None):
    """A k-selection strategy from ``plan`` (strategy, dict, string, or a bare float: the ratio) or the short
    form ``ratio``."""
    if plan is not None and ratio is not None:
        raise ValueError("pass either plan= or ratio=, not both")
    if plan is None:
        if ratio is None:
            raise ValueError("no plan: pass ratio= (e.g. 0.5) or plan= (see kcengine.compress.plan)")
        return FixedRatio(ratio)
    if isinstance(plan, (FixedRatio, InertiaLimit, Elbow, PerLayer, ByChannels, OutputSensitivity)):
        return plan
    if isinstance(plan, str):
        return _parse_string(plan)
    if isinstance(plan, numbers.Real) and not isinstance(plan, (bool, numbers.Integral)):
        return FixedRatio(float(plan))  # a bare number: the ratio, as ratio= (plan=0.5)
    if isinstance(plan, numbers.Integral) and not isinstance(plan, bool):
        raise ValueError(f"plan={plan!r}: a bare number is a ratio in (0, 1] (e.g. plan=0.5); for the same k in "
                         f"every layer pass {{'layers': {{'re:.*': {plan}}}}}")
    if isinstance(plan, Mapping):
        if len(plan) != 1:
            raise ValueError(f"a plan dict has exactly one key (ratio, inertia, relative_inertia, elbow, layers, "
                             f"channels, sensitivity), got keys {sorted(map(str, plan))}")
        (key, val), = plan.items()
        if key == "ratio":
            return FixedRatio(val)
        if key == "inertia":
            return InertiaLimit(val)
        if key == "relative_inertia":
            return InertiaLimit(val, relative=True)
        if key == "elbow":
            return Elbow() if val is None or val is True else Elbow(val)
        if key in ("layers", "channels") and not isinstance(val, Mapping):
            try:  # (name, k) pairs read as the dict they make; a string is not pairs
                val = dict(val) if not isinstance(val, (str, bytes)) else None
            except (TypeError, ValueError):
                val = None
            if val is None:
                example = "{'conv1': 8, ...}" if key == "layers" else "{64: 32, ...}"
                got = plan[key]
                raise ValueError(f"plan {{{key!r}: ...}} takes a dict ({example}), got {type(got).__name__} "
                                 f"{got!r:.60}")
        if key == "layers":
            return PerLayer(dict(val))
        if key == "channels":
            return ByChannels(dict(val))
        if key == "sensitivity":
            return OutputSensitivity(val)
        raise ValueError(f"plan key {key!r} is unknown; use ratio, inertia, relative_inertia, elbow, layers, "
                         f"channels or sensitivity")
    raise ValueError(f"plan must be a strategy, a dict, a string or a ratio, got {type(plan).__name__}")


def select_layers(names: Sequence[str], layers, model=None) -> list[str]:
    """The conv layer names ``layers`` selects, in model order (see the module docstring).  ``model``: where
    an unknown name is looked up as a second path to one of ``names``, for the error."""
    names = list(names)
    if not names:
        raise ValueError("the model holds no nn.Conv2d layer to compress")
    if layers is None:
        return names
    if isinstance(layers, str):
        if layers == "first":
            return names[:1]
        try:
            pat = re.compile(layers)
        except re.error as exc:
            raise ValueError(f"layers={layers!r} is not a valid regex: {exc}") from None
        out = [n for n in names if pat.fullmatch(n)]
        if not out:
            raise ValueError(f"layers={layers!r} matches no conv layer; layers are {_few(names)}")
        return out
    if isinstance(layers, (list, tuple, set)):
        missing = [n for n in layers if n not in names]
        if missing:
            raise ValueError(f"layers names {missing[:3]} which are not conv layers of the model"
                             f"{_second_names(model, names, set(missing[:3]))}; layers are {_few(names)}")
        if not layers:
            raise ValueError("layers is empty: select at least one conv layer")
        wanted = set(layers)
        return [n for n in names if n in wanted]
    raise ValueError(f"layers must be None, 'first', a regex string or a list of names, got {layers!r}")
