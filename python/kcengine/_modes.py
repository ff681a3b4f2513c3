"""Train/eval modes put back per submodule: what evaluation, BN recalibration, the output refit and the
sensitivity sweep share (``model.train(was_training)`` would set every submodule to the top module's mode)."""
from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["saved_modes", "eval_mode"]


@contextlib.contextmanager
def saved_modes(model: nn.Module):
    """Every submodule's train/eval mode as it was before the block, restored after it
    (``model.train(was_training)`` would set them all to the top module's: a BatchNorm frozen in a training
    model would come back training, a dropout left on in an eval model off)."""
    modes = [(mod, mod.training) for mod in model.modules()]
    try:
        yield model
    finally:
        for mod, training in modes:
            mod.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; every submodule's own mode restored after it."""
    with saved_modes(model):
        model.eval()
        yield model
