"""``finetune``: recover the accuracy of a clustered model.

Modes
-----
``"frozen"``       the clustered codebooks are fixed; BN, the linear layer and any dense convs train
                   (the seeds' method).
``"centroids"``    the codebooks train with the index fixed, so every filter stays equal to its
                   centroid (weight sharing holds by construction: gradients of all the filters sharing
                   a centroid are summed into it).
``"progressive"``  cluster one group of layers at a time (``order``), recover for ``stage_epochs``, then
                   move on; earlier stages keep training (``stage_training="keep"``) or are frozen
                   (``"freeze"``: a stage's codebooks train in its own phase only, so the ``epochs``
                   after the last stage train BN and the dense layers, as ``"frozen"`` does); ``epochs``
                   more epochs follow the last stage.

Every mode distils from the ``teacher`` (KL on temperature-softened logits, weight ``alpha``, plus
``(1 - alpha)`` cross-entropy, plus ``feature_weight`` times the relative squared error of each block's
output against the dense model's), and starts with two cheap steps: the output-aware refit of the clustered
layers to the dense model's (:mod:`kcengine.train.calibrate`) and BatchNorm recalibration.  The teacher is
the unclustered model by default; another (a larger network) gives its logits, and the dense model its layers.
The refit runs by default when finetune clusters the dense model itself (``plan=``, the recipe); a model that
arrives clustered keeps its codebooks and index as given unless ``output_calibration=True`` (with a teacher of
its architecture): on resnet20 at C_out/2 training starts from 17.8% with BN recalibrated alone, 75.1% after
the refit (bench/results/recovery_resnet20_seeds_b64.md).

The defaults are the recommended recipe (see bench/results/recovery_resnet20.md for the figures):
output-aware refit + BN recalibration, then 20 epochs of codebook training with distillation (T=4,
alpha=0.9, block features at weight 2) on mixup batches (lam ~ U(0, 1); the teacher scores the same mixed
images), SGD with Nesterov momentum, one-cycle LR peaking at 0.01 per 128 images of batch (scaled with the
loader's batch size: 0.005 at the recommended batch of 64, ``RECOMMENDED_BATCH``), CIFAR crop+flip
augmentation.

Why these: at k = C_out/2 on resnet20 the student ends at 91-92% top-1 on its own training images where the
dense teacher scores 99.7% -- it underfits -- so what pays is more distillation signal per image (mixup with
the teacher scoring the mixed images: 86.9% against 85.1% without, at batch 128; the block features) and
more steps (batch 64: 87.9 / 87.2 / 86.8% over finetune seeds 0-2, against 86.5 / 86.4 / 85.0% at 128,
both calibrated on the first 512 training images; on 512 evenly spaced, as now, 86.5 / 87.7 / 86.6%),
while regularizers cost accuracy.  About sixty alternatives measured and not kept (optimizers, LRs,
temperatures, feature weights, augmentations, teachers, clustering starts, index changes during training,
dense filters pulled together before clustering, progressive schedules, other splits of the mixed plan's
budget) are listed with their figures in
bench/RECOVERY.md.  A 20-epoch run on the 4,660-image CIFAR sample moves by up to about +-1 point with the
seed or the thread count.

The caller's ``model`` (and ``teacher``) are never modified: the run trains a copy, returned as
``FinetuneResult.model``.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import math
import numbers
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_bool, check_device, check_float, check_int
from ..compress.layers import ElementClusteredConv2d
from ..conv.module import ClusteredConv2d
from ..data.datasets import evenly_spaced, tensor_pair
from .._modes import eval_mode
from ..evaluate.metrics import check_data, check_float_images, check_labels, image_label_pair, run_model
from . import distributed as dd
from .augment import cifar_augment
from .bn import recalibrate_bn
from .calibrate import calibrate_outputs, layer_mismatch
from .checkpoint import CHECKPOINT_NAME, apply_layout, clustered_layout, load_checkpoint, save_checkpoint
from .distill import FeatureTap, distillation_loss, feature_loss, feature_points
from .progressive import conv_names, resolve_order

__all__ = ["finetune", "FinetuneResult", "MODES", "SCHEDULES", "OPTIMIZERS", "STAGE_TRAINING", "GRANULARITIES",
           "DEFAULT_EPOCHS", "DEFAULT_LR", "LR_REFERENCE_BATCH", "RECOMMENDED_BATCH", "default_lr", "finetune_defaults",
           "lr_factor"]

MODES = ("frozen", "centroids", "progressive")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
STAGE_TRAINING = ("keep", "freeze")  # progressive: what earlier stages' codebooks do
GRANULARITIES = ("filter", "kernel")  # what finetune can cluster and train
DEFAULT_EPOCHS = {"frozen": 4, "centroids": 20, "progressive": 4}
# Peak LR for a batch of LR_REFERENCE_BATCH images; the default scales linearly with the loader's batch size
# (default_lr).  sgd 0.002 at 128: resnet20 k=C_out/2, 8 epochs 83.3% vs 84.8% at 0.01.
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
LR_REFERENCE_BATCH = 128
RECOMMENDED_BATCH = 64  # the recipe's batch (bench/results/recovery_resnet20.md)
POSTFIX_EVERY = 20  # batches between the progress bar's loss updates (each one reads the running sum back)


def default_lr(optimizer: str, batch_size: int | None) -> float:
    """The peak LR ``finetune`` uses when ``lr`` is not given: ``DEFAULT_LR[optimizer]`` scaled by
    ``batch_size / LR_REFERENCE_BATCH`` (the same step per image whatever the batch; a loader without a
    ``batch_size`` gets the reference LR)."""
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {tuple(DEFAULT_LR)}, got optimizer={optimizer!r}")
    if batch_size is None:
        return DEFAULT_LR[optimizer]
    return DEFAULT_LR[optimizer] * batch_size / LR_REFERENCE_BATCH


def finetune_defaults() -> dict:
    """``{option: default}`` of :func:`finetune`'s keyword options: the recipe, for the CLI and the benchmark
    texts that name it (one place to change it)."""
    return {n: p.default for n, p in inspect.signature(finetune).parameters.items()
            if p.default is not inspect.Parameter.empty}


@dataclass
class FinetuneResult:
    """``model``: the trained model (eval mode, on the device it trained on).
    ``history``: one dict per epoch: phase, epoch, loss, train_top1, eval_top1 (None without eval_data),
    lr (at the epoch's end), seconds.  ``stages``: progressive: the layers clustered at each stage, in order.
    ``accuracy_clustered``: eval top-1 right after clustering (progressive: after the first stage's);
    ``accuracy_start``: the same once refit and BN-recalibrated, before any training (None without eval_data).
    ``calibration``: per-layer results of the output-aware refit.  ``resumed_from``: (phase, epoch) of the
    checkpoint the run continued from, or None.  ``layer_ks``: k of every clustered layer of ``model`` (with
    ``plan={"sensitivity": r}``, the split the sweep chose)."""

    model: nn.Module
    mode: str
    history: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    accuracy_start: float | None = None
    accuracy_clustered: float | None = None
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: tuple | None = None
    layer_ks: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        """Eval top-1 after the last epoch (or at the start when there was no epoch)."""
        for h in reversed(self.history):
            if h.get("eval_top1") is not None:
                return h["eval_top1"]
        return self.accuracy_start

    def plot(self, path, title: str = "") -> Path:
        from .plots import plot_history

        return plot_history(self.history, path, title)


def lr_factor(schedule: str, t: float) -> float:
    """Multiplier of the peak LR at fraction ``t`` in [0, 1] of a phase's steps.

    onecycle: linear warm-up from 1/25 over the first 15%, then cosine to 0; cosine: cosine from 1 to 0;
    step: 1, 0.1 from 50%, 0.01 from 75%; constant: 1."""
    t = min(max(t, 0.0), 1.0)
    if schedule == "onecycle":
        warm = 0.15
        if t < warm:
            return 1 / 25 + (1 - 1 / 25) * t / warm
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={schedule!r}")


def _dataset_images(loader, idx: list[int]) -> torch.Tensor:
    """The images ``idx`` of the loader's dataset, read from the dataset, not through the loader's sampler or
    batching (so the same on every process)."""
    ds = loader.dataset
    pair = tensor_pair(ds)  # (a subclass that transforms its items is read through them)
    if pair is not None:
        x = pair[0][torch.tensor(idx, dtype=torch.long)]
    else:
        xs = []
        for i in idx:
            item = ds[i]
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
                got = (f"({', '.join(type(e).__name__ for e in item)})" if isinstance(item, (tuple, list))
                       else type(item).__name__)
                raise ValueError(f"train_loader's dataset must give (image tensor, label) pairs, item {i} is {got}")
            xs.append(item[0])
        x = torch.stack(xs) if xs else torch.empty(0)
    check_float_images(x, "train_loader's images")
    if x.shape[0] == 0:
        raise ValueError("train_loader's dataset holds no images")
    if x.dim() != 4:  # [N, H, W] went into the convs as one unbatched image of N channels
        raise ValueError(f"train_loader's images must be [C, H, W] each (batches [N, C, H, W]), got images of shape "
                         f"{tuple(x.shape[1:])}")
    return x


SENSITIVITY_EVAL_IMAGES = 1024


def sensitivity_images(size: int, calibration_images: int) -> tuple[list[int], list[int]]:
    """``(calibration, held_out)`` indices into a training set of ``size`` items for ``plan={"sensitivity": r}``:
    finetune's calibration images (``calibration_images`` evenly spaced) and ``SENSITIVITY_EVAL_IMAGES`` of the
    others, evenly spaced over them (empty when there is no other)."""
    calib = evenly_spaced(size, calibration_images)
    taken = set(calib)
    rest = [i for i in range(size) if i not in taken]
    return calib, [rest[i] for i in evenly_spaced(len(rest), SENSITIVITY_EVAL_IMAGES)] if rest else []


def _resolve_sensitivity(model, train_loader, calib, calibration_images: int, ratio: float, seed: int,
                         progress: bool) -> dict:
    """``plan={"sensitivity": ratio}`` as a per-layer plan (:func:`kcengine.train.sensitivity_plan`): each layer
    refit on the calibration images, the KL measured on ``SENSITIVITY_EVAL_IMAGES`` other training images evenly
    spaced over the rest of the set (the calibration images themselves when there is no other).  Under
    torch.distributed rank 0 measures it and the others receive its plan, so that every process builds the same
    layers."""
    from .sensitivity import sensitivity_plan

    plan = None
    if dd.is_main():
        _, held_idx = sensitivity_images(len(train_loader.dataset), calibration_images)
        held = _dataset_images(train_loader, held_idx) if held_idx else calib
        plan = sensitivity_plan(model, calib, held.to(calib.device), ratio, seed=seed, progress=progress)
    if dd.is_distributed():
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0)
        plan = box[0]
    return plan


def _loader_generators(loader) -> list:
    """The torch.Generators that draw ``loader``'s order: its own, and its sampler's or batch sampler's where
    they hold their own (``SubsetRandomSampler(idx, generator=g)``), each once."""
    found = {}
    for obj in (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


@dataclass
class _Phase:
    name: str
    epochs: int
    layers: list | None = None  # progressive: the layers this phase clusters


def _stable(v):
    """A compress option as the resume fingerprint keeps it: plain values as they are, others by type (a callable's
    repr holds its address, which differs in every process)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_stable(e) for e in v]
    return f"<{type(v).__name__}>"


def _state_digest(module: nn.Module | None) -> str | None:
    """A digest of ``module``'s state dict (names, dtypes, shapes and values, wherever it lives), for the resume
    fingerprint: a checkpoint continued with another model or teacher would train on from weights it never
    had."""
    if module is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue  # extra state
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reset_index_caches(model: nn.Module) -> None:
    """Drop each ClusteredConv2d's prepared-index cache (``set_index`` with its own index): a cache built
    under ``torch.inference_mode`` (e.g. by :func:`kcengine.evaluate`) holds inference tensors that autograd
    refuses to save for backward."""
    for m in model.modules():
        if isinstance(m, ClusteredConv2d):
            m.set_index(m.index.clone())


# The layers finetune trains as clustered: codebook + index (ClusteredConv2d, and compress's per-element layers)
_CLUSTERED = (ClusteredConv2d, ElementClusteredConv2d)


def _set_trainable(model: nn.Module, mode: str, stage_training: str, frozen_names: set[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for n, m in model.named_modules():
        if isinstance(m, _CLUSTERED) and (mode == "frozen" or n in frozen_names):
            m.codebook.requires_grad_(False)  # (session 55: per-element layers' codebooks trained in frozen mode)


def _make_optimizer(params, name, lr, momentum, nesterov, weight_decay):
    decay, no_decay = [], []
    for n, p in params:
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def finetune(model: nn.Module, train_loader, *, mode: str = "centroids", teacher: nn.Module | None = None,
             epochs: int | None = None, plan=None, granularity: str = "filter", order=None,
             stage_epochs=None, stage_training: str | None = None, optimizer: str = "sgd", lr: float | None = None,
             momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-5, schedule: str = "onecycle",
             temperature: float = 4.0, alpha: float = 0.9, feature_weight: float = 2.0, augment: bool = True,
             mixup: float = 1.0,
             output_calibration: bool | None = None,
             bn_recalibration: bool = True, calibration_images: int = 512, eval_data=None, eval_batch_size: int = 500,
             checkpoint_dir=None, resume: bool = True, plot_path=None, seed: int = 0, progress: bool = True,
             device=None, compress_options: dict | None = None) -> FinetuneResult:
    """Recover the accuracy of a clustered model; returns a :class:`FinetuneResult` (see the module docstring).

    Args:
        model: a model holding ``ClusteredConv2d`` layers (e.g. from :func:`kcengine.compress`), or a dense
            model together with ``plan``.  Not modified: a copy is trained.
        train_loader: any DataLoader of ``(image, label)`` batches.
        mode: ``"frozen"``, ``"centroids"`` or ``"progressive"``.
        teacher: the model whose logits to distil from: the unclustered model, or any other of the same classes
            (a larger network).  Default: the dense ``model`` itself when ``plan`` is given, else no distillation.
            The output-aware refit and the block features match the student's layers to its dense counterpart
            (the same conv layers by name and shape, :func:`kcengine.train.calibrate.layer_mismatch`): the dense
            ``model`` when ``plan`` is given, else the teacher where it is one.  A teacher of another architecture
            gives its logits only.
        epochs: training epochs (progressive: after the last stage).  Default ``DEFAULT_EPOCHS[mode]``.
        plan: a :func:`kcengine.compress` plan (a ratio such as 0.5, a dict, ...): cluster the dense ``model`` first
            (required for ``progressive``; each layer gets the k this plan gives it on the dense model).
            ``{"sensitivity": r}`` (``"sensitivity=r"``) spends the unique filters of ratio ``r`` where the
            network's outputs suffer least, measured before training
            (:func:`kcengine.train.sensitivity_plan`: each layer clustered alone and refit on the calibration
            images, the KL from the dense model on 1,024 other training images); filter granularity.  Recorded
            as "the mixed plan" in bench/results/recovery_resnet20.md and recovery_resnet56.md.
        granularity: ``"filter"`` or ``"kernel"``, used with ``plan``.
        order: progressive stages: list of layer names, module names (``"layer2"``), regexes or lists of names
            (default: top-level groups, deepest first, e.g. layer3, layer2, layer1, conv1).
        stage_epochs: progressive: recovery epochs after each stage (an int, or one int per stage; default 1).
        stage_training: progressive: ``"keep"`` (earlier stages' codebooks keep training; the default) or
            ``"freeze"`` (each stage's codebooks are frozen after its own phase, so the final ``epochs`` train no
            codebook, only BN, biases and unclustered layers).  ``order``, ``stage_epochs`` and ``stage_training``
            given with another mode are refused.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``; ``lr`` its peak LR (default
            :func:`default_lr`: ``DEFAULT_LR[optimizer]`` for a batch of 128, scaled linearly with
            ``train_loader.batch_size``: sgd 0.005 at 64, 0.01 at 128); ``weight_decay`` on weights (not on BN/bias).
        schedule: per-step LR schedule over each phase, one of ``SCHEDULES`` (see :func:`lr_factor`).
        temperature, alpha: distillation temperature and weight.
        feature_weight: weight of feature distillation (needs the dense counterpart, see ``teacher``): the outputs
            of every block holding a conv (:func:`kcengine.train.distill.feature_points`; a ResNet's residual
            blocks) are matched to the dense model's on the same images, ``||s - t||^2 / ||t||^2`` averaged over
            blocks, added to the loss.
        augment: CIFAR's augmentation on each batch (:func:`kcengine.train.cifar_augment`): a random crop of the
            image zero-padded by 1/8 of its shorter side (4 pixels on CIFAR's 32 x 32, 28 on 224 x 224), and a
            horizontal flip.
        mixup: when > 0, each batch is mixed with a shuffled copy of itself, ``lam * x + (1 - lam) * x[perm]``
            with ``lam ~ Beta(mixup, mixup)`` (default 1.0: lam uniform in [0, 1]; 0 turns it off); the teacher
            sees the same mixed images (distillation matches the teacher on them) and the cross-entropy term
            mixes the two labels with the same weights.
        output_calibration: refit the clustered layers to the dense counterpart's outputs (centroids, assignment
            and BN; see :mod:`kcengine.train.calibrate`) before training; needs one (see ``teacher``; ValueError
            when asked for without).  Default (None): on when
            finetune clusters the model itself (``plan=``), off for a model that arrives clustered, whose
            codebooks and indices are then left exactly as given (a frozen run changes none of them).
        bn_recalibration: re-estimate BN statistics after clustering, before training.
        calibration_images: images for the refit and BN statistics, evenly spaced over ``train_loader.dataset``
            (:func:`kcengine.data.evenly_spaced`: a dataset stored class by class gives every class its share).
        eval_data: optional evaluation data (as :func:`kcengine.evaluate.evaluate` takes) scored every epoch.
        checkpoint_dir: write ``finetune_last.pt`` there after every epoch; with ``resume`` an existing one
            is continued (same arguments required: another setting, ``model`` or ``teacher`` is refused, named).
        plot_path: write the loss/accuracy curves PNG there at the end.
        seed: seeds every epoch's shuffling and augmentation (from seed, phase and epoch), through torch's
            global RNG, whose state the caller gets back as it was.
        progress: tqdm progress bars (rank 0 only).
        device: where to train (default: where the model is).
        compress_options: extra keyword arguments for :func:`kcengine.compress` (k-means ``seed``, ...).  With
            ``cosine=True`` each filter's norm (``scale``) and a conv's bias (``shift``) are buffers: the
            codebooks train, the norms and biases stay as clustering left them.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(train_loader, torch.utils.data.DataLoader):
        raise ValueError(f"train_loader must be a torch DataLoader, got {type(train_loader).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={schedule!r}")
    if stage_training is not None and stage_training not in STAGE_TRAINING:
        raise ValueError(f"stage_training must be one of {STAGE_TRAINING}, got stage_training={stage_training!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES} for finetuning, got granularity={granularity!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else epochs
    epochs = check_int(epochs, "epochs", 0)
    lr = default_lr(optimizer, train_loader.batch_size) if lr is None else lr
    lr = check_float(lr, "lr", 0.0, low_open=True)
    momentum = check_float(momentum, "momentum", 0.0, high=1.0)
    weight_decay = check_float(weight_decay, "weight_decay")
    temperature = check_float(temperature, "temperature", 0.0, low_open=True)
    alpha = check_float(alpha, "alpha", 0.0, high=1.0)
    feature_weight = check_float(feature_weight, "feature_weight")
    mixup = check_float(mixup, "mixup")
    calibration_images = check_int(calibration_images, "calibration_images", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    eval_batch_size = check_int(eval_batch_size, "eval_batch_size", 1)
    if stage_epochs is not None:
        if isinstance(stage_epochs, (str, bytes)) or not isinstance(stage_epochs, (numbers.Integral, Iterable)):
            raise ValueError(f"stage_epochs must be an int or a list of ints (one per stage), got {stage_epochs!r}")
        stage_epochs = (check_int(stage_epochs, "stage_epochs", 0) if isinstance(stage_epochs, numbers.Integral)
                        else [check_int(v, f"stage_epochs[{i}]", 0) for i, v in enumerate(stage_epochs)])
    for name, value in (("order", order), ("stage_epochs", stage_epochs), ("stage_training", stage_training)):
        if value is not None and mode != "progressive":
            raise ValueError(f"{name} sets the stages of mode='progressive'; mode={mode!r} clusters every layer at "
                             f"once, got {name}={value!r}")
    stage_epochs = 1 if stage_epochs is None else stage_epochs
    stage_training = "keep" if stage_training is None else stage_training
    if compress_options is not None and not isinstance(compress_options, dict):
        raise ValueError(f"compress_options must be a dict of keyword arguments for kcengine.compress (e.g. "
                         f"{{'seed': 1}}) or None, got {type(compress_options).__name__} {compress_options!r:.60}")
    if compress_options:
        own = sorted(set(compress_options) & {"plan", "ratio", "granularity"})
        if own:
            raise ValueError(f"compress_options may not set {own}: finetune's own plan= and granularity= do")
        if plan is None:
            raise ValueError("compress_options apply when finetune clusters the model (plan=); this model arrives "
                             "clustered")
    if plot_path is not None and not isinstance(plot_path, (str, os.PathLike)):
        raise ValueError(f"plot_path must be a file path or None, got {type(plot_path).__name__} {plot_path!r:.60}")
    if plot_path is not None:  # here, not after the last epoch
        from .._plot import check_path

        plot_path = check_path(plot_path, "plot_path")
    nesterov, augment = check_bool(nesterov, "nesterov"), check_bool(augment, "augment")
    bn_recalibration, resume = check_bool(bn_recalibration, "bn_recalibration"), check_bool(resume, "resume")
    progress = check_bool(progress, "progress")
    if output_calibration is not None:
        output_calibration = check_bool(output_calibration, "output_calibration")
    if eval_data is not None:
        check_data(eval_data, "eval_data")  # here, not after the refit and the first epoch
    if output_calibration is None:
        output_calibration = plan is not None
    if mode == "progressive" and plan is None:
        raise ValueError("mode='progressive' needs plan= (e.g. plan={'ratio': 0.5}): it clusters the dense "
                         "model stage by stage")
    sensitivity_ratio = None
    if plan is not None:
        from ..compress.plan import OutputSensitivity, parse_plan

        parsed = parse_plan(plan)
        if isinstance(parsed, OutputSensitivity):
            if granularity != "filter":
                raise ValueError(f"plan {plan!r} splits filters between layers: it needs granularity='filter', got "
                                 f"granularity={granularity!r}")
            sensitivity_ratio = parsed.ratio

    if checkpoint_dir is not None:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise ValueError(f"checkpoint_dir must be a path (str or os.PathLike) or None, got "
                             f"{type(checkpoint_dir).__name__}")
        if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
            raise ValueError(f"checkpoint_dir must be a directory (it is created if missing), got "
                             f"checkpoint_dir={str(checkpoint_dir)!r}, an existing file")
        above = next((p for p in Path(checkpoint_dir).absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} cannot be made: {str(above)!r} is a file")
        if (Path(checkpoint_dir) / CHECKPOINT_NAME).is_dir():
            raise ValueError(f"{Path(checkpoint_dir) / CHECKPOINT_NAME} is a folder, where finetune keeps its "
                             f"checkpoint file; move it away or use another checkpoint_dir")

    from ..compress import compress

    if device is None:
        p0 = next(model.parameters(), None)
        device = p0.device if p0 is not None else torch.device("cpu")
    device = check_device(device)
    copts = dict(compress_options or {})
    work = copy.deepcopy(model).to(device)
    given_teacher = teacher is not None
    if teacher is None and plan is not None:
        teacher = copy.deepcopy(model)
    elif teacher is not None:
        teacher = copy.deepcopy(teacher)
    # The refit and the block features match the student's layers to a dense counterpart: the dense model
    # given with plan=, else the teacher where it is one (a teacher of another architecture gives its logits).
    reference = None
    if plan is not None:
        reference = copy.deepcopy(model) if given_teacher else teacher
    elif teacher is not None:
        mismatch = layer_mismatch(work, teacher)
        reference = teacher if mismatch is None else None
        if output_calibration and reference is None:
            raise ValueError(f"output_calibration=True refits the clustered layers to a dense counterpart of "
                             f"the model, and the teacher is not one ({mismatch}): pass the dense model with "
                             f"plan=, or output_calibration=False")
    elif output_calibration:
        raise ValueError("output_calibration=True needs a dense counterpart of the model: a teacher, or the "
                         "dense model with plan=")
    for net in {id(m): m for m in (teacher, reference) if m is not None}.values():
        net.to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
    if plan is not None and any(isinstance(m, _CLUSTERED) for m in work.modules()) and mode != "progressive":
        raise ValueError("model already holds ClusteredConv2d layers; pass plan=None to finetune it as it is")

    try:
        n_train = len(train_loader.dataset)
    except TypeError:
        raise ValueError(f"train_loader's dataset has no length ({type(train_loader.dataset).__name__}, an "
                         f"iterable dataset?): finetune reads its calibration images by index") from None
    calib = _dataset_images(train_loader, evenly_spaced(n_train, calibration_images)).to(device)
    # the images against the model (shape, dtype: session 55, float64 images gave torch's "expected scalar type
    # Double") and a teacher whose outputs do not fit (it failed at the first step, after the refit), on two images
    with torch.no_grad(), eval_mode(work):
        s_out = run_model(work, calib[:2])
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(calib[:2])
        if not isinstance(t_out, torch.Tensor) or t_out.shape != s_out.shape:
            got = f"shape {tuple(t_out.shape)}" if isinstance(t_out, torch.Tensor) else type(t_out).__name__
            raise ValueError(f"teacher's outputs must be logits of the model's shape {tuple(s_out.shape)} (the same "
                             f"classes), got {got}")
    resolved: list = []

    def layer_plan():  # the plan as compress takes it: a sensitivity plan is measured once, when first needed
        if sensitivity_ratio is None:
            return plan
        if not resolved:
            # measured on the dense model's copy on `device`, where calib is
            resolved.append(_resolve_sensitivity(reference, train_loader, calib, calibration_images,
                                                 sensitivity_ratio, seed, progress))
        return resolved[0]

    if mode == "progressive" and sensitivity_ratio is not None:
        # the sweep is the long step: the stages it will feed are checked before it (a sensitivity plan gives
        # every conv of groups 1 its k, so those are the planned layers)
        from ..compress.apply import conv_layers

        convs = conv_layers(model)
        planned = [n for n, m in convs if m.groups == 1]
        if copts.get("layers") is not None:  # compress_options' layers= narrows the stages too
            from ..compress.plan import select_layers

            chosen = set(select_layers([n for n, _ in convs], copts["layers"], model))
            planned = [n for n in planned if n in chosen]
        pre = resolve_order(order, planned)
        if not isinstance(stage_epochs, int) and len(stage_epochs) != len(pre):
            raise ValueError(f"stage_epochs has {len(stage_epochs)} entries for {len(pre)} stages")

    # ---- phases
    stages: list[list[str]] = []
    ks: dict[str, int] = {}
    if mode == "progressive":
        _, rep = compress(model, layer_plan(), granularity=granularity, **copts)
        ks = {lr_.name: lr_.k for lr_ in rep.layers}
        planned = [n for n in conv_names(model) if n in ks]
        stages = resolve_order(order, planned)
        per = [stage_epochs] * len(stages) if isinstance(stage_epochs, int) else stage_epochs  # checked above
        if len(per) != len(stages):
            raise ValueError(f"stage_epochs has {len(per)} entries for {len(stages)} stages")
        phases = [_Phase(f"stage {i + 1}", e, s) for i, (s, e) in enumerate(zip(stages, per))]
        phases.append(_Phase("final", epochs))
    else:
        phases = [_Phase(mode, epochs)]

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    # What a resumed run must share with the one that wrote the checkpoint: the phases and everything that
    # shapes the model, the loss or the optimizer (a changed plan gave back the old plan's model).
    fingerprint = {"mode": mode, "phases": [(p.name, p.epochs, p.layers) for p in phases], "seed": seed,
                   "schedule": schedule, "optimizer": optimizer, **({"mixup": mixup} if mixup else {}),
                   **({"feature_weight": feature_weight} if feature_weight else {}),
                   "plan": None if plan is None else repr(plan), "granularity": granularity, "lr": lr,
                   "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay, "augment": augment,
                   "temperature": temperature, "alpha": alpha, "output_calibration": bool(output_calibration),
                   "bn_recalibration": bn_recalibration, "calibration_images": calibration_images,
                   "compress_options": [(key, _stable(v)) for key, v in sorted(copts.items())]}
    if ckpt_path is not None:  # the weights it starts from and learns from (hashed only where it checkpoints)
        fingerprint.update(model=_state_digest(model), teacher=_state_digest(teacher if given_teacher else None))
    state = load_checkpoint(ckpt_path) if (ckpt_path is not None and resume) else None
    diff = []
    if state is not None:  # (a checkpoint written before a key existed is compared on the keys it has)
        old = state.get("fingerprint")
        keys, old = (set(old), old) if isinstance(old, dict) else (set(fingerprint), {})
        diff = [f"another {key} (its state dict differs)" if key in ("model", "teacher") else
                f"{key} {old.get(key)!r} -> {fingerprint.get(key)!r}"
                for key in sorted(keys) if old.get(key) != fingerprint.get(key)]
    if diff:
        raise ValueError(f"checkpoint {ckpt_path} was written by a run with other settings ({'; '.join(diff)}); "
                         f"use another checkpoint_dir or resume=False")

    result = FinetuneResult(model=work, mode=mode, stages=stages)
    loader = dd.distributed_loader(train_loader, seed) if dd.is_distributed() else train_loader
    main = dd.is_main()
    start_phase, start_epoch = 0, 0
    if state is not None:
        work = apply_layout(work, state["layout"])
        try:
            work.load_state_dict(state["model"])
        except RuntimeError as exc:  # load_state_dict's mismatch report
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model (written for another architecture?): "
                             f"{str(exc)[:300]}; use another checkpoint_dir or resume=False") from None
        result.history = list(state["history"])
        result.calibration = dict(state.get("calibration", {}))
        result.accuracy_start = state.get("accuracy_start")
        result.accuracy_clustered = state.get("accuracy_clustered")
        start_phase, start_epoch = state["phase"], state["epoch"]
        result.resumed_from = (start_phase, start_epoch)
    elif mode != "progressive" and plan is not None:
        work, _ = compress(work, layer_plan(), granularity=granularity, **copts)
    if not any(isinstance(m, _CLUSTERED) for m in work.modules()) and mode != "progressive":
        raise ValueError("model has no ClusteredConv2d layer: pass a clustered model (kcengine.compress) or plan=")

    def evaluate_now(net):  # the model being trained (progressive stages replace it)
        if eval_data is None:
            return None
        from ..evaluate import evaluate

        acc = evaluate(net, eval_data, batch_size=eval_batch_size, device=device).top1
        _reset_index_caches(net)
        return acc

    # the epochs seed the loader's own generators (shuffling): the caller gets them back as they were
    gen_states = [(g, g.get_state()) for g in _loader_generators(train_loader)]
    try:
        _run_phases(work, teacher, reference, loader, train_loader, phases, state, start_phase, start_epoch, result,
                    mode=mode, stage_training=stage_training, ks=ks, granularity=granularity, copts=copts,
                    output_calibration=output_calibration, bn_recalibration=bn_recalibration, calib=calib,
                    calibration_images=calibration_images, evaluate_now=evaluate_now, optimizer=optimizer, lr=lr,
                    momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, schedule=schedule,
                    temperature=temperature, alpha=alpha, feature_weight=feature_weight, augment=augment,
                    mixup=mixup, seed=seed, progress=progress, device=device, ckpt_path=ckpt_path,
                    fingerprint=fingerprint, main=main)
    finally:
        for g, st in gen_states:
            g.set_state(st)
    work = result.model
    work.eval()
    result.layer_ks = {n: m.num_clusters for n, m in work.named_modules() if isinstance(m, _CLUSTERED)}
    result.seconds = time.perf_counter() - t_start
    if plot_path is not None and main and result.history:
        result.plot(plot_path, title=f"finetune ({mode})")
    return result


def _run_phases(work, teacher, reference, loader, train_loader, phases, state, start_phase, start_epoch, result, *,
                mode, stage_training, ks, granularity, copts, output_calibration, bn_recalibration, calib,
                calibration_images, evaluate_now, optimizer, lr, momentum, nesterov, weight_decay, schedule,
                temperature, alpha, feature_weight, augment, mixup, seed, progress, device, ckpt_path, fingerprint,
                main):
    """finetune's phases in order from (start_phase, start_epoch): a progressive stage clusters its layers,
    refits and recalibrates them, then every phase trains its epochs; ``result.model`` is the model at the end."""
    from ..compress import compress

    frozen_names: set[str] = set()
    for pi, phase in enumerate(phases):
        if pi < start_phase:
            if stage_training == "freeze" and phase.layers:
                frozen_names.update(phase.layers)
            continue
        resumed_here = state is not None and pi == start_phase
        if not resumed_here:
            if phase.layers:  # progressive stage: cluster these layers now
                # the stage's layers are among those compress_options' layers= selected (the plan was made so)
                stage_opts = {key: v for key, v in copts.items() if key != "layers"}
                work, _ = compress(work, {"layers": {n: ks[n] for n in phase.layers}}, granularity=granularity,
                                   layers=list(phase.layers), **stage_opts)
                work.to(device)
            if phase.layers or pi == 0:
                if pi == 0:
                    result.accuracy_clustered = evaluate_now(work)
                if output_calibration and reference is not None and (phase.layers or mode != "progressive"):
                    result.calibration.update(calibrate_outputs(work, reference, calib, layers=phase.layers,
                                                                seed=seed))
                if bn_recalibration:
                    recalibrate_bn(work, calib, max_images=calibration_images)
                if pi == 0:
                    result.accuracy_start = evaluate_now(work)
        _set_trainable(work, mode, stage_training, frozen_names)
        _reset_index_caches(work)
        first_epoch = start_epoch if resumed_here else 0
        if phase.epochs > first_epoch:
            # each epoch seeds torch's global RNG from `seed` (shuffling, augmentation, mixup): the caller's
            # stream is put back as it was afterwards
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices):
                _train_phase(work, teacher, loader, train_loader, phase, pi, first_epoch, result,
                             state if resumed_here else None, optimizer=optimizer, lr=lr, momentum=momentum,
                             nesterov=nesterov, weight_decay=weight_decay, schedule=schedule, temperature=temperature,
                             alpha=alpha, feature_weight=feature_weight, augment=augment, mixup=mixup, seed=seed,
                             progress=progress and main, device=device, evaluate_now=evaluate_now,
                             ckpt_path=ckpt_path if main else None, fingerprint=fingerprint, reference=reference,
                             main=main)
        if stage_training == "freeze" and phase.layers:
            frozen_names.update(phase.layers)
    result.model = work


def _train_phase(work, teacher, loader, orig_loader, phase, pi, first_epoch, result, state, *, optimizer, lr,
                 momentum, nesterov, weight_decay, schedule, temperature, alpha, feature_weight, augment, mixup, seed,
                 progress, device, evaluate_now, ckpt_path, fingerprint, main, reference):
    params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"phase {phase.name!r} has no trainable parameter")
    opt = _make_optimizer(params, optimizer, lr, momentum, nesterov, weight_decay)
    steps_per_epoch = max(1, len(loader))
    total = phase.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(schedule, s / total))
    if state is not None and "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    taps = None
    if reference is not None and feature_weight > 0:  # the blocks of the dense counterpart (finetune's `reference`)
        t_names = dict(reference.named_modules())
        points = [n for n in feature_points(work) if n in t_names]
        if points:
            taps = (FeatureTap(work, points), FeatureTap(reference, points))
    try:
        _run_epochs(work, teacher, reference, loader, orig_loader, phase, pi, first_epoch, result, opt, sched, taps,
                    temperature=temperature, alpha=alpha, feature_weight=feature_weight, augment=augment,
                    mixup=mixup, seed=seed, progress=progress, device=device, evaluate_now=evaluate_now,
                    ckpt_path=ckpt_path, fingerprint=fingerprint)
    finally:
        for tap in taps or ():
            tap.close()


def _run_epochs(work, teacher, reference, loader, orig_loader, phase, pi, first_epoch, result, opt, sched, taps, *,
                temperature, alpha, feature_weight, augment, mixup, seed, progress, device, evaluate_now, ckpt_path,
                fingerprint):
    net = work
    if dd.is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(work, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(first_epoch, phase.epochs):
        t0 = time.perf_counter()
        eseed = (seed * 1_000_003 + pi * 10_007 + epoch) % (2 ** 63)
        torch.manual_seed(eseed)
        for ld in {id(loader): loader, id(orig_loader): orig_loader}.values():
            for g in _loader_generators(ld):
                g.manual_seed(eseed)
            if hasattr(ld.sampler, "set_epoch"):
                ld.sampler.set_epoch(eseed)
        gen = torch.Generator().manual_seed(eseed * 31 + dd.rank())
        net.train()
        # Running sums kept where the model runs (float64: the same sums as Python floats would give), read
        # back once per epoch and every POSTFIX_EVERY batches for the progress bar: a read per batch waits
        # for the device each step.
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct
        tot_n = 0
        it = loader
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(loader, desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}", leave=False, unit="batch")
            it = bar
        for bi, batch in enumerate(it):
            x, y_batch = image_label_pair(batch)
            x, y = x.to(device), y_batch.to(device)
            if augment:  # the shift scales with the image: 4 pixels on CIFAR's 32 x 32, 28 on 224 x 224
                x = cifar_augment(x, gen, padding=max(1, min(x.shape[-2:]) // 8))
            target = y
            if mixup > 0:  # mixed images; the CE target mixes the two labels with the same weights
                lam = float(torch.distributions.Beta(mixup, mixup).sample())
                perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
                x = lam * x + (1.0 - lam) * x[perm]
            t_logits = None
            with torch.no_grad():
                if teacher is not None and (alpha > 0 or (taps is not None and reference is teacher)):
                    t_logits = teacher(x)
                if taps is not None and reference is not teacher:  # the block features' own dense model
                    reference(x)
            out = net(x)
            check_labels(y_batch, out)  # the loader's copy (on the host, as a rule): no wait for the device
            if mixup > 0:
                onehot = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
                target = lam * onehot + (1.0 - lam) * onehot[perm]
            loss = distillation_loss(out, t_logits if alpha > 0 else None, target, temperature=temperature,
                                     alpha=alpha)
            if taps is not None:  # intermediate features of the student's blocks matched to the teacher's
                loss = loss + feature_weight * feature_loss(taps[0].take(), taps[1].take())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = y.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += (out.detach().argmax(1) == y).sum()
            tot_n += n
            if bar is not None and bi % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{float(sums[0]) / tot_n:.4f}", refresh=False)
        if bar is not None:
            bar.close()
        tot_loss, tot_correct = sums.tolist()
        tot_loss, tot_correct, tot_n = dd.all_sum([tot_loss, tot_correct, float(tot_n)], device=device)
        if tot_n == 0:
            raise ValueError(f"train_loader yielded no batch in {phase.name} epoch {epoch + 1} (a dataset smaller "
                             f"than a batch with drop_last=True?)")
        if not math.isfinite(tot_loss):  # checked once an epoch: a check per batch would wait for the device
            raise ValueError(f"the training loss became {tot_loss / tot_n} in {phase.name} epoch {epoch + 1}: NaN "
                             f"or Inf in the training images, the model or the teacher, or a learning rate too "
                             f"large (lr={opt.defaults.get('lr')}); no checkpoint was written for this epoch")
        row = {"phase": phase.name, "epoch": epoch + 1, "loss": tot_loss / tot_n,
               "train_top1": tot_correct / tot_n, "eval_top1": evaluate_now(work),
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        result.history.append(row)
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "phase": pi, "epoch": epoch + 1, "layout": clustered_layout(work),
                "model": work.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": result.history, "calibration": result.calibration,
                "accuracy_start": result.accuracy_start, "accuracy_clustered": result.accuracy_clustered})
