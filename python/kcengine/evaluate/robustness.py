"""Adversarial robustness: accuracy under FGSM and PGD attacks bounded in L-infinity.

Does clustering the weights make a network easier to fool?  :func:`adversarial_accuracy` answers it for
any model, dense or clustered, on the same images.  The attacks work in pixel space: the data are the
model's normalized inputs, ``mean``/``std`` (the normalization the weights expect, ``LoadedModel.mean`` /
``.std``) map them back to [0, 1] RGB, each image may move by at most ``eps`` per pixel and channel
(``8/255`` is the common CIFAR budget, ``1/255`` and ``2/255`` small ones), and stays a valid image.

* ``"fgsm"``: one step of size ``eps`` along the sign of the loss gradient (Goodfellow et al., 2015).
* ``"pgd"``: ``steps`` (default 10) signed-gradient steps of ``step_size`` (default ``2.5 * eps / steps``), each
  projected back into the eps-box and [0, 1], from a uniform random start in the box (``random_start``;
  Madry et al., 2018).  The random start is drawn from ``seed``: a run is reproducible.

The loss is the cross-entropy of the model's logits.  An image counts as robust when the model classifies
it correctly both as given and after the attack, so ``robust_top1 <= clean_top1``.
:func:`adversarial_accuracy` runs the model in eval mode (BatchNorm statistics fixed);
:func:`adversarial_examples` uses it as it is (put it in eval mode first).  Only the input's gradient is
computed, so the caller's model is left as it was (parameters, their ``.grad``, every submodule's train/eval
mode).  Half and bfloat16 images are attacked in float32 pixels and rounded back to their dtype once.  The
images must map into [0, 1] under ``mean``/``std`` (a ValueError says so otherwise: the wrong normalization
was given).  The random starts are drawn batch after batch from one generator: the same ``seed`` and
``batch_size`` give the same figures.  Gradients are needed, so the functions cannot run under
``torch.inference_mode()``.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_bool, check_device, check_int
from .._modes import eval_mode
from .metrics import _batches, _length, check_labels, check_model, run_model

__all__ = ["ATTACKS", "RobustResult", "adversarial_examples", "adversarial_accuracy"]

ATTACKS = ("fgsm", "pgd")
PGD_STEPS = 10  # PGD's steps when not given


@dataclass
class RobustResult:
    """Accuracy of ``total`` images as given (``clean_top1``) and under the attack (``robust_top1``: correct
    both ways), with the attack's parameters (``eps`` and ``step_size`` in [0, 1] pixel units)."""

    attack: str
    eps: float
    steps: int
    step_size: float
    clean_top1: float
    robust_top1: float
    correct_clean: int
    correct_robust: int
    total: int
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def label(self) -> str:
        """``"PGD-10, eps 2/255"``-style name of the attack."""
        name = "FGSM" if self.attack == "fgsm" else f"PGD-{self.steps}"
        return f"{name}, eps {eps_text(self.eps)}"


def eps_text(eps: float) -> str:
    """``eps`` as ``n/255`` when it is one (to 1e-4 of 1/255: float32 values of n/255 included), else as a
    decimal."""
    n = float(eps) * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-4 else f"{float(eps):g}"


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _per_channel(v, name: str) -> tuple:
    """``v`` (a sequence, a 1-D tensor or array) as a tuple of finite floats, one per channel."""
    if isinstance(v, (tuple, list)):
        vals = [e.item() if isinstance(e, torch.Tensor) and e.numel() == 1 else e for e in v]
    elif hasattr(v, "shape") and hasattr(v, "reshape") and hasattr(v, "tolist") and \
            sum(n != 1 for n in v.shape) <= 1:  # a tensor or array of one entry per channel ([3], [3, 1, 1], ...)
        vals = v.reshape(-1).tolist()
    else:
        vals = None
    if not vals or not all(_real(e) and math.isfinite(e) for e in vals):
        raise ValueError(f"{name} must be a sequence of finite numbers, one per channel, got {name}={v!r}")
    return tuple(float(e) for e in vals)


def _check(attack, eps, steps, step_size, mean, std) -> tuple:
    """The checked arguments' (mean, std) as tuples of floats."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got attack={attack!r}")
    if not _real(eps) or not 0 <= eps <= 1:
        raise ValueError(f"eps must be a number in [0, 1] (pixel units: 8/255 = {8 / 255:.4f}), got eps={eps!r}")
    steps = check_int(steps, "steps", 1, optional=True)
    if attack == "fgsm" and steps not in (None, 1):
        raise ValueError(f"steps is PGD's; FGSM takes one step of eps (got attack='fgsm' with steps={steps!r})")
    if step_size is not None and (not _real(step_size) or not 0 < step_size < math.inf):
        raise ValueError(f"step_size must be a finite number > 0 or None, got step_size={step_size!r}")
    if step_size is not None and attack == "fgsm":
        raise ValueError("step_size is PGD's; FGSM takes one step of eps (got attack='fgsm' with step_size)")
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need one entry per channel and std > 0, got mean={mean}, std={std}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("adversarial attacks need input gradients: call them outside torch.inference_mode()")
    return mean, std


def _pixels(x, mean, std):
    """``x`` mapped back to [0, 1] pixels, in float32 at least (half and bfloat16 pixels would round a step of
    1/255 by up to a quarter of it), with the float ``mean``/``std`` tensors; ValueError when the channels or
    the range do not fit.  The range is checked to 1e-3 plus the rounding of ``x``'s own dtype."""
    if x.dim() != 4 or x.shape[1] != len(mean):
        raise ValueError(f"images must be [N, C, H, W] with C = len(mean) = {len(mean)}, got shape {tuple(x.shape)}")
    work = torch.promote_types(x.dtype, torch.float32)
    m, s = _stats(mean, std, work, x.device)
    pix = x.detach().to(work) * s + m
    lo, hi = float(pix.min()), float(pix.max())
    slack = 1e-3 + torch.finfo(x.dtype).eps * float(x.detach().abs().max()) * max(std) if x.numel() else 1e-3
    if lo < -slack or hi > 1 + slack:
        raise ValueError(f"the images span [{lo:.3g}, {hi:.3g}] in pixel units under mean={tuple(mean)}, "
                         f"std={tuple(std)}, not [0, 1]: pass the normalization the images were made with")
    return pix.clamp(0, 1), m, s


def _stats(mean, std, dtype, device):
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, dtype=dtype, device=device).view(shape),
            torch.tensor(std, dtype=dtype, device=device).view(shape))


def _input_grad(model, x, y):
    """d CE(model(x), y) / dx, without touching any parameter's ``.grad``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = run_model(model, x)
        check_labels(y, logits)  # a label of -100 would be cross-entropy's "ignore": no attack at all
        loss = F.cross_entropy(logits, y.long(), reduction="sum")
        (g,) = torch.autograd.grad(loss, [x], allow_unused=True) if loss.requires_grad else (None,)
    if g is None:
        raise ValueError("the attack needs the model's logits to depend on the images through autograd, but "
                         "model(x) gave logits with no gradient path to x (a forward under torch.no_grad(), a "
                         ".detach(), or one that ignores its input)")
    return g


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mean, std, eps: float,
                         attack: str = "pgd", steps: int | None = None, step_size: float | None = None,
                         random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """The attacked images of one batch: ``x`` normalized ``[N, C, H, W]`` (the model's input), ``y`` labels;
    returns new normalized images of ``x``'s dtype, each within ``eps`` of its original in [0, 1] pixel space
    (to the rounding of that dtype; ``eps=0`` returns a copy of ``x``), see the module docstring.
    ``step_size`` and ``random_start`` are PGD's.  The model is used as it is (put it in eval mode first);
    ``x`` is not modified."""
    check_model(model)
    mean, std = _check(attack, eps, steps, step_size, mean, std)
    random_start = check_bool(random_start, "random_start")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of normalized images, got {got}")
    steps = PGD_STEPS if steps is None else int(steps)
    eps = float(eps)  # a Fraction or numpy scalar passes the check but not every tensor operation
    step_size = None if step_size is None else float(step_size)
    pix, m, s = _pixels(x, mean, std)

    def to_input(p):
        return ((p - m) / s).to(x.dtype)

    if attack == "fgsm" or eps == 0:
        if eps == 0:  # no attack, but the labels are checked as for any other budget
            with torch.no_grad():
                check_labels(y, run_model(model, x))
            return x.detach().clone()
        # the gradient w.r.t. the pixels is the input's gradient divided by std: same sign
        g = _input_grad(model, to_input(pix), y)
        return to_input((pix + eps * g.sign()).clamp(0, 1))
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    adv = pix.clone()
    if random_start:
        noise = torch.rand(pix.shape, generator=generator, dtype=pix.dtype, device="cpu").to(pix.device)
        adv = (pix + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        g = _input_grad(model, to_input(adv), y)
        adv = adv + alpha * g.sign()
        adv = torch.min(torch.max(adv, pix - eps), pix + eps).clamp(0, 1)
    return to_input(adv)


def adversarial_accuracy(model: nn.Module, data, *, mean, std, eps: float = 2 / 255, attack: str = "pgd",
                         steps: int | None = None, step_size: float | None = None, random_start: bool = True,
                         batch_size: int = 500, device="cpu", seed: int = 0, progress: bool = False) -> RobustResult:
    """Accuracy of ``model`` on ``data`` (a DataLoader, a Dataset or an ``(images, labels)`` pair of normalized
    images, as :func:`kcengine.evaluate.evaluate` takes) as given and under ``attack``; see the module
    docstring.  ``mean``/``std``: the per-channel normalization of the images (``LoadedModel.mean/std``)."""
    check_model(model)
    mean, std = _check(attack, eps, steps, step_size, mean, std)
    random_start = check_bool(random_start, "random_start")
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    device = check_device(device)
    gen = torch.Generator().manual_seed(int(seed))
    clean = robust = total = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=_length(data), desc=f"{attack} eps {eps_text(eps)}", unit="img", leave=False)
    t0 = time.perf_counter()
    try:
        with eval_mode(model):
            for x, y in _batches(data, batch_size):
                x, y = x.to(device), (y.to(device) if isinstance(y, torch.Tensor) else y)
                with torch.no_grad():
                    logits = run_model(model, x)
                    check_labels(y, logits)
                    ok = logits.argmax(1) == y
                adv = adversarial_examples(model, x, y, mean=mean, std=std, eps=eps, attack=attack, steps=steps,
                                           step_size=step_size, random_start=random_start, generator=gen)
                with torch.no_grad():
                    ok_adv = model(adv).argmax(1) == y
                clean += int(ok.sum())
                robust += int((ok & ok_adv).sum())
                total += int(y.shape[0])
                if bar is not None:
                    bar.update(int(y.shape[0]))
    finally:
        if bar is not None:
            bar.close()
    if total == 0:
        raise ValueError("data holds no images")
    steps = 1 if attack == "fgsm" else (PGD_STEPS if steps is None else int(steps))
    alpha = eps if attack == "fgsm" else (step_size if step_size is not None else 2.5 * eps / steps)
    return RobustResult(attack, float(eps), steps, float(alpha), clean / total,
                        robust / total, clean, robust, total, time.perf_counter() - t0)
