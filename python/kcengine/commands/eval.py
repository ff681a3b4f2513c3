"""``kcengine eval``: accuracy of a model on CIFAR-10 (full or subset) or an ImageNet-style folder.

Also holds the model/data arguments and loading shared by ``prune`` and ``sweep``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HELP = "evaluate a model (top-1/top-5, per-class accuracy, confusion matrix, accuracy under FGSM/PGD)"
OUT_FILES = ("eval.json", "confusion.png")  # what the command writes in --out


def add_model_data_arguments(parser, *, training: bool = False) -> None:
    """The model/weights/data options; ``training``: finetune's form (trains on the train split and evaluates on
    the whole test split, so no --split, and --limit counts training images)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="resnet20",
                   help="resnet20/32/44/56/110 (CIFAR) or a torchvision model name (default resnet20)")
    g.add_argument("--weights", default="pretrained",
                   help="'pretrained' (public weights via the torch hub cache, or for a CIFAR ResNet the same file in "
                        "../shared/data/checkpoints), a torchvision weights name, a checkpoint PATH (a state dict, "
                        + ("the dense model's, which finetune clusters with --ratio/--plan; or the model.pt of "
                           "prune/finetune --out, trained as it is clustered, with --teacher" if training else
                           "or the model.pt of prune/finetune --out: loaded clustered")
                        + "), or 'none' (default init: speed-only work); default pretrained")
    g.add_argument("--no-download", action="store_true", help="take pretrained weights only from the hub cache")
    g.add_argument("--data", default=None,
                   help="CIFAR-10 python-batches folder (CIFAR models; default ../shared/data), or for a "
                        "torchvision model a folder holding train/ and val/ class folders (ImageNet's layout)"
                        if training else
                   "CIFAR-10 python-batches folder (CIFAR models; default ../shared/data) or an ImageFolder root")
    if not training:
        g.add_argument("--split", default="test", choices=("test", "train"), help="CIFAR split (default test)")
    g.add_argument("--limit", type=int, default=None,
                   help="train on only N training images: CIFAR's first N, an image folder's N evenly spaced "
                        "(evaluation: the whole test split)" if training
                   else "use only N images: CIFAR's first N, an image folder's N evenly spaced (default: all)")
    g.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")


def cifar_root(data) -> Path | None:
    """The CIFAR-10 folder to use: ``--data`` when given, else ``../shared/data/cifar-10-batches-py``
    when present, else None (the caller decides whether that is an error or a skip)."""
    if data is not None:
        return Path(data)
    from ..bench.common import shared_data_dir

    shared = shared_data_dir()
    return shared / "cifar-10-batches-py" if shared is not None else None


def load_cifar_split(args, lm, split: str, limit=None):
    """One CIFAR-10 split for a CIFAR model from ``--data`` (or ../shared); UserError when absent or
    malformed."""
    from ..cli import UserError
    from ..data import Normalization, cifar10_dataset

    root = cifar_root(args.data)
    if root is None:
        raise UserError("no CIFAR-10 data: pass --data PATH (a cifar-10-batches-py folder)")
    try:
        return cifar10_dataset(root, split, Normalization(lm.mean, lm.std), limit=limit)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None


def save_clustered(lm, model, path) -> int:
    """Write ``model`` (``lm``'s architecture, clustered) as a compact checkpoint that ``--weights PATH`` and
    :func:`kcengine.load_compressed` (no skeleton needed: the builder is recorded) read back; returns bytes."""
    from ..conv.serialize import save_compressed
    from ..models.zoo import model_builder

    builder, kwargs = model_builder(lm.name, lm.num_classes)
    return save_compressed(model, path, builder=builder, builder_kwargs=kwargs)


def _shared_copy_of_pretrained(name: str) -> str | None:
    """For a CIFAR ResNet whose public checkpoint is not in the torch hub cache: the same file (same name, as
    published) in ``../shared/data/checkpoints`` when there is one, so that the default ``--weights
    pretrained`` works offline beside the shared data; else None (the hub cache or a download)."""
    from ..bench.common import shared_data_dir
    from ..models import CIFAR_CHECKPOINT_URLS, hub_cache_path

    from ..models.zoo import _cifar_depth

    depth = _cifar_depth(name)
    url = CIFAR_CHECKPOINT_URLS.get(f"resnet{depth}") if depth is not None else None
    if url is None or hub_cache_path(url).is_file():
        return None
    data = shared_data_dir()
    local = data / "checkpoints" / hub_cache_path(url).name if data is not None else None
    if local is None or not local.is_file():
        return None
    # the published name carries the start of the file's sha256 (what the hub's check_hash verifies)
    expected = local.name.rsplit("-", 1)[-1].split(".")[0]
    if hashlib.sha256(local.read_bytes()).hexdigest().startswith(expected):
        return str(local)
    print(f"note: {local} is not the published file (its sha256 does not start with {expected}): not used",
          file=sys.stderr)
    return None


def check_backend_arg(backend: str) -> None:
    """--backend: one of kcengine's k-means backends that can run here (else a UserError, before any work); with
    --backend auto, the same of the ``KCENGINE_BACKEND`` override, which every auto call takes."""
    from .. import _registry
    from ..cli import UserError

    if backend not in ("auto",) + _registry.BACKENDS:
        raise UserError(f"--backend must be auto or one of {', '.join(_registry.BACKENDS)}, got {backend!r}")
    what = f"--backend {backend}"
    if backend == "auto":
        backend = _registry.env_backend()
        what = f"{_registry._ENV}={backend} (environment)"
        if backend not in ("auto",) + _registry.BACKENDS:
            raise UserError(f"{what} is not one of auto, {', '.join(_registry.BACKENDS)}; unset it or fix it")
    if backend != "auto":
        reason = _registry.backend_status(backend)
        if reason:
            raise UserError(f"{what}: {reason}")


def load_model_arg(args, *, need_trained: bool, flag: str = "--weights"):
    """The LoadedModel the arguments name (``--model`` with the weights of ``flag``: ``--weights``, or finetune's
    ``--teacher``); UserError for missing weights or unknown names."""
    from ..cli import UserError, flag_words
    from ..models import MissingWeightsError, load_model

    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    weights = None if str(given).lower() == "none" else given
    if weights == "pretrained":
        weights = _shared_copy_of_pretrained(args.model) or weights
    try:
        lm = load_model(args.model, weights, allow_download=not args.no_download)
    except (MissingWeightsError, ValueError) as exc:  # load_model's checks name its keywords
        raise UserError(flag_words(str(exc), {"name": "--model", "weights": flag})) from None
    if need_trained and not lm.pretrained:
        raise UserError(f"{args.model} has no trained weights ({flag} none); accuracy work needs them — pass "
                        f"{flag} PATH or 'pretrained' (speed-only work may use the default init)")
    return lm


def load_data_arg(args, lm):
    """The evaluation data for the model: in-memory CIFAR tensors or an ImageFolder dataset."""
    from ..cli import UserError
    from ..models import is_cifar_model

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if is_cifar_model(lm.name):
        return load_cifar_split(args, lm, args.split, limit=args.limit)
    if args.data is None:
        raise UserError(f"{lm.name} is an ImageNet model: pass --data PATH to an ImageFolder root (class "
                        f"folders of images); none is available on this machine")
    return load_image_folder(args.data, lm, args.limit)


def load_image_folder(root, lm, limit=None):
    """An ImageFolder for ``lm`` (its normalization, the evaluation transform at its input size); with ``limit``,
    that many images evenly spaced (a folder lists its images class by class); UserError when unreadable."""
    import torch

    from ..cli import UserError
    from ..data import Normalization, evenly_spaced, image_folder

    try:
        ds = image_folder(root, Normalization(lm.mean, lm.std), crop=lm.input_size[0])
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    _check_wnid_subset(root, ds.classes, lm)
    return ds if limit is None else torch.utils.data.Subset(ds, evenly_spaced(len(ds), limit))


def _check_wnid_subset(root, classes, lm) -> None:
    """UserError for a folder of some of ImageNet's class folders (``n01440764``-style names) under a model of
    more outputs: ImageFolder numbers the folders 0..n-1 in sorted order, which are ImageNet's indices only when
    every class is there, so every score would be wrong.  Folders of other names are the user's own labelling
    (class i is the i-th folder in sorted order) and pass."""
    import re

    outputs = getattr(lm, "num_classes", None)
    if not outputs or len(classes) >= outputs or not all(re.fullmatch(r"n\d{8}", c) for c in classes):
        return
    from ..cli import UserError

    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    raise UserError(f"{root} holds {len(classes)} ImageNet class folders ({shown}) but {lm.name} has {outputs} "
                    f"outputs: the folders are numbered 0..{len(classes) - 1} in sorted order, which are ImageNet's "
                    f"class indices only when all {outputs} classes are there, so every score would be wrong; pass "
                    f"a folder holding every class (ImageNet's val/), or weights of a model with {len(classes)} "
                    f"outputs")


def add_arguments(parser) -> None:
    add_model_data_arguments(parser)
    a = parser.add_argument_group("adversarial robustness (kcengine.evaluate.adversarial_accuracy)")
    a.add_argument("--attack", default=None, choices=("fgsm", "pgd"),
                   help="also report accuracy under this L-infinity attack (default: none)")
    a.add_argument("--eps", default=None,
                   help="the attack's budget per pixel in [0, 1] units, a number or N/255 (default 2/255)")
    a.add_argument("--attack-steps", type=int, default=None, help="PGD steps (default 10)")
    parser.add_argument("--out", default=None,
                        help="folder for eval.json and confusion.png (default: none; without it the results are "
                             "only printed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eps_arg(text: str) -> float:
    """``--eps``: a number or ``N/255``; UserError otherwise or outside [0, 1]."""
    from ..cli import UserError

    try:
        num, _, den = str(text).partition("/")
        val = float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--eps must be a number or N/255, got {text!r}") from None
    if not 0 <= val <= 1:
        raise UserError(f"--eps must be in [0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {text!r}")
    return val


def _print_per_class(r, where=None, most: int = 20) -> None:
    """Per-class accuracy: every class when there are at most ``most``; else the classes that have images
    when at most ``most`` do (an ImageNet model on a folder of a few classes), else the five lowest."""
    rows = list(zip(r.classes, r.per_class))
    if len(rows) > most:
        rows = [(n, a) for n, a in rows if a == a]  # NaN: no image of the class
        if len(rows) > most:
            print(f"  per-class accuracy of {len(rows)} classes {'in ' + where if where else '(--out writes it)'}; "
                  f"the lowest five:")
            rows = sorted(rows, key=lambda t: t[1])[:5]
    for name, acc in rows:
        print(f"  {name:>12s}: {'n/a' if acc != acc else f'{100 * acc:.1f}%'}")


def _clustering_line(c: dict) -> str | None:
    """For a clustered model (a prune/finetune --out file), from its ``conv_weight_counts``: how much of it is
    clustered, else None."""
    if not c["clustered"]:
        return None
    element = f" ({c['element']} per element)" if c["element"] else ""
    return (f"  clustered: {c['clustered']} of {c['clustered'] + c['dense']} conv layers{element}; conv weights "
            f"{c['weights']:,} applied, {c['stored']:,} stored ({c['weights'] / max(c['stored'], 1):.2f}x)")


def run(args) -> int:
    from ..cli import UserError
    from ..compress.layers import conv_weight_counts
    from ..evaluate import adversarial_accuracy, confusion_png, evaluate

    if not args.attack and (args.eps is not None or args.attack_steps is not None):
        raise UserError("--eps and --attack-steps set up an attack: add --attack fgsm or --attack pgd")
    eps = _eps_arg(args.eps if args.eps is not None else "2/255") if args.attack else None
    if args.attack == "fgsm" and args.attack_steps is not None:
        raise UserError("--attack-steps is PGD's: FGSM takes one step")
    steps = 10 if args.attack_steps is None else args.attack_steps
    if args.attack == "pgd" and steps < 1:
        raise UserError(f"--attack-steps must be >= 1, got {steps}")
    lm = load_model_arg(args, need_trained=True)
    data = load_data_arg(args, lm)
    r = evaluate(lm.model, data, batch_size=args.batch_size, progress=not args.no_progress, desc=lm.name)
    print(f"{lm.name} ({lm.weights}): top-1 {100 * r.top1:.2f}% ({r.correct}/{r.total}), top-5 {100 * r.top5:.2f}%, "
          f"{r.seconds:.1f} s")
    counts = conv_weight_counts(lm.model)
    clustering = _clustering_line(counts)
    if clustering:
        print(clustering)
    _print_per_class(r, where="eval.json" if args.out else None)
    robust = None
    if args.attack:
        robust = adversarial_accuracy(lm.model, data, mean=lm.mean, std=lm.std, eps=eps, attack=args.attack,
                                      steps=steps if args.attack == "pgd" else None, batch_size=args.batch_size,
                                      progress=not args.no_progress)
        print(f"under {robust.label()}: top-1 {100 * robust.robust_top1:.2f}% ({robust.correct_robust}/"
              f"{robust.total}; correct as given and after the attack), {robust.seconds:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        d = r.as_dict()
        d.update(model=lm.name, weights=lm.weights, conv_weight_counts=counts)
        if robust is not None:
            d["adversarial"] = robust.as_dict()
        (out / "eval.json").write_text(json.dumps(d, indent=2) + "\n")
        confusion_png(r.confusion, out / "confusion.png", classes=r.classes, title=f"{lm.name}: top-1 "
                      f"{100 * r.top1:.2f}%")
        print(f"wrote {out / 'eval.json'} and {out / 'confusion.png'}")
    return 0
