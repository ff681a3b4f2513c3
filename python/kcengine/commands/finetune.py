"""``kcengine finetune``: cluster a model with a plan and recover its accuracy (kcengine.finetune): a CIFAR
ResNet on CIFAR-10, or a torchvision model on an image folder with ImageNet's train/ and val/ layout.

Under ``torchrun --nproc_per_node N -m kcengine finetune ...`` the processes train together
(DistributedDataParallel; gloo on CPU, nccl on GPU); rank 0 prints and writes the outputs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .eval import add_model_data_arguments, load_cifar_split, load_image_folder, load_model_arg, save_clustered

HELP = ("cluster a model and recover accuracy (CIFAR-10 or an image folder; frozen / centroids / progressive, "
        "distillation, resume)")
OUT_FILES = ("model.pt", "history.json", "curves.png")  # what the command writes in --out


def add_arguments(parser) -> None:
    from ..train.finetune import (DEFAULT_EPOCHS, DEFAULT_LR, GRANULARITIES, LR_REFERENCE_BATCH, MODES, OPTIMIZERS,
                                  RECOMMENDED_BATCH, SCHEDULES, STAGE_TRAINING, finetune_defaults)

    ft = finetune_defaults()  # the training options' defaults are finetune's own (the recipe lives in one place)

    def add(group, *names, **kw):  # the help shows each default, so the recipe can be read off --help
        d = kw.get("default")
        if d is not None and kw.get("action") is None:
            kw["help"] = f"{kw.get('help', '')} (default {d:g})".strip() if isinstance(d, float) \
                else f"{kw.get('help', '')} (default {d})".strip()
        return group.add_argument(*names, **kw)

    add_model_data_arguments(parser, training=True)
    g = parser.add_argument_group("plan", "one of --ratio or --plan is required, unless --weights is already "
                                          "clustered")
    add(g, "--ratio", type=float, default=None, help="k = round(N * RATIO) for every layer")
    add(g, "--plan", default=None, help="as for prune: R | ratio=R | inertia=X | relative_inertia=F | "
        "elbow[=A:B:STEP] | map:NAME=K,... | channels:C=K,... ; or "
        "sensitivity=R: the unique filters of ratio R split between the layers by output sensitivity, measured on "
        "training images before training")
    add(g, "--granularity", default=ft["granularity"], choices=GRANULARITIES)
    add(g, "--kmeans-seed", type=int, default=0)
    t = parser.add_argument_group("training (defaults: the recommended recipe)")
    add(t, "--mode", default=ft["mode"], choices=MODES)
    add(t, "--epochs", type=int, default=None,
        help="epochs (progressive: after the last stage; default by mode: "
             + ", ".join(f"{m} {e}" for m, e in DEFAULT_EPOCHS.items()) + ")")
    add(t, "--order", default=None,
        help="progressive stages, ';'-separated; each a module (layer2), a regex or ','-separated names "
             "(default: top-level groups, deepest first: layer3;layer2;layer1;conv1 for a CIFAR ResNet); layers "
             "no stage names stay dense")
    add(t, "--stage-epochs", type=int, default=None, help="progressive: epochs after each stage (default 1)")
    add(t, "--stage-training", default=None, choices=STAGE_TRAINING,
        help="progressive: earlier stages keep training or are frozen (default keep)")
    add(t, "--optimizer", default=ft["optimizer"], choices=OPTIMIZERS)
    add(t, "--lr", type=float, default=None,
        help=f"peak learning rate (default: {DEFAULT_LR['sgd']:g} for sgd, {DEFAULT_LR['adamw']:g} for adamw, per "
             f"{LR_REFERENCE_BATCH} images of --train-batch-size)")
    add(t, "--schedule", default=ft["schedule"], choices=SCHEDULES)
    add(t, "--weight-decay", type=float, default=ft["weight_decay"])
    add(t, "--temperature", type=float, default=ft["temperature"], help="distillation temperature")
    add(t, "--alpha", type=float, default=ft["alpha"], help="weight of the distillation term (0: plain CE)")
    add(t, "--teacher", default=None,
        help="weights of the dense --model to distil from and refit to, spelled as for --weights (default: the "
             "dense --weights themselves; for a clustered --weights, none: it then trains on the labels alone, "
             "without distillation or refit)")
    add(t, "--feature-weight", type=float, default=ft["feature_weight"],
        help="weight of the block-output matching term (0: off)")
    add(t, "--no-augment", action="store_true", help="no random crop (1/8 of the side padded) + flip")
    add(t, "--mixup", type=float, default=ft["mixup"], help="mixup Beta(a, a) parameter (0: no mixup)")
    add(t, "--no-refit", action="store_true", help="skip the output-aware refit of clustered layers")
    add(t, "--train-batch-size", type=int, default=RECOMMENDED_BATCH)
    add(t, "--seed", type=int, default=ft["seed"])
    add(t, "--checkpoint-dir", default=None, help="checkpoint every epoch; an existing one is resumed")
    add(t, "--no-resume", action="store_true", help="start over even if --checkpoint-dir has a checkpoint")
    add(t, "--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    add(t, "--workers", type=int, default=0, help="DataLoader worker processes decoding an image folder's files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default=None, help="folder for model.pt (the trained model, compact: --weights of "
                        "eval and kcengine.load_compressed read it), history.json and curves.png (default: none; "
                        "without it nothing is written but --checkpoint-dir's checkpoints)")


def _order_arg(text):
    from ..cli import UserError

    if text is None:
        return None
    stages = []
    for part in text.split(";"):
        part = part.strip()
        if part:
            stages.append([s.strip() for s in part.split(",") if s.strip()] if "," in part else part)
    if not stages:  # ";;" or "" named no stage: not the default order in disguise
        raise UserError(f"--order {text!r} names no stage (stages are separated by ';', e.g. 'layer3;layer2')")
    return stages


def _image_folders(args, lm):
    """An ImageNet model's training and evaluation sets: ``--data``'s ``train/`` and ``val/`` image folders
    (ImageNet's layout), with the evaluation transform (resize, center crop at the weights' size); finetune
    adds its crop + flip.  ``--limit N`` keeps N training images evenly spaced over the folder, so that every
    class keeps its share (a folder lists its images class by class)."""
    from ..cli import UserError

    if args.data is None:
        raise UserError(f"{lm.name} is an ImageNet model: pass --data PATH to a folder holding train/ and val/ "
                        f"class folders (ImageNet's layout)")
    root = Path(args.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"--data {args.data} has no {split}/ folder: finetune of {lm.name} needs train/ and "
                            f"val/ class folders there (ImageNet's layout)")
    train, val = load_image_folder(root / "train", lm, args.limit), load_image_folder(root / "val", lm)
    # ImageFolder numbers each folder's classes in sorted order on its own: the labels agree only when the two
    # folders hold the same classes
    tc, vc = (getattr(d, "dataset", d).classes for d in (train, val))
    if tc != vc:
        only_t, only_v = sorted(set(tc) - set(vc)), sorted(set(vc) - set(tc))
        said = "; ".join(f"only in {sp}/: {', '.join(c[:5])}{' ...' if len(c) > 5 else ''} ({len(c)})"
                         for sp, c in (("train", only_t), ("val", only_v)) if c)
        raise UserError(f"--data {args.data}: train/ and val/ must hold the same class folders (each is numbered "
                        f"in sorted order), got {len(tc)} and {len(vc)} classes; {said}")
    return train, val


# finetune's keyword arguments as the CLI's flags: its checks name the keyword, the CLI's error names the flag the
# user typed (kcengine.cli.flag_words)
_FLAGS = {"epochs": "--epochs", "eval_batch_size": "--batch-size", "stage_epochs": "--stage-epochs",
          "stage_training": "--stage-training", "lr": "--lr", "weight_decay": "--weight-decay",
          "temperature": "--temperature", "alpha": "--alpha", "feature_weight": "--feature-weight",
          "mixup": "--mixup", "order": "--order", "checkpoint_dir": "--checkpoint-dir", "mode": "--mode",
          "plan": "--plan", "granularity": "--granularity", "optimizer": "--optimizer", "schedule": "--schedule",
          "seed": "--seed", "resume=False": "--no-resume", "output_calibration=False": "--no-refit",
          "another checkpoint_dir": "another --checkpoint-dir"}


def _flag_words(msg: str, ratio: bool = False) -> str:
    """``msg`` (a finetune error's message) with finetune's keywords spelled as their flags: "eval_batch_size must
    be an int >= 1, got eval_batch_size=0" -> "--batch-size must be an int >= 1, got 0".  ``ratio``: the user gave
    ``--ratio`` (which the CLI passes as the plan ``{'ratio': R}``)."""
    from ..cli import flag_words
    from .prune import plan_map_words

    return flag_words(plan_map_words(msg), {**_FLAGS, **({"ratio": "--ratio"} if ratio else {})})


def run(args) -> int:
    import torch

    from ..cli import UserError
    from ..compress.plan import OutputSensitivity, parse_plan
    from ..compress.layers import conv_weight_counts
    from ..conv import ClusteredConv2d
    from ..data import make_loader
    from ..models import is_cifar_model
    from ..models.zoo import OUT_MODEL_NAME
    from ..train import distributed as dd
    from ..train import finetune
    from ..train.finetune import DEFAULT_EPOCHS

    if args.plan is not None and args.ratio is not None:
        raise UserError(f"give --ratio R or --plan PLAN, not both (got --ratio {args.ratio} and --plan {args.plan})")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.train_batch_size < 1:
        raise UserError(f"--train-batch-size must be >= 1, got {args.train_batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.no_resume and args.checkpoint_dir is None:
        raise UserError("--no-resume starts over from a --checkpoint-dir's checkpoint; give --checkpoint-dir too")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    for flag, value in (("--seed", args.seed), ("--kmeans-seed", args.kmeans_seed)):
        if not 0 <= value < 2**63:
            raise UserError(f"{flag} must be in [0, 2**63 - 1], got {value}")
    lm = load_model_arg(args, need_trained=True)
    counts = conv_weight_counts(lm.model)
    clustered = counts["clustered"] > 0
    if counts["element"]:
        raise UserError(f"--weights {args.weights} holds per-element clustered layers (prune --granularity "
                        f"element), which finetune does not train: finetune trains filter or kernel clusters; pass "
                        f"the dense weights with --ratio/--plan and --granularity filter or kernel")
    if clustered and (args.plan is not None or args.ratio is not None):
        given = f"--plan {args.plan}" if args.plan is not None else f"--ratio {args.ratio}"
        raise UserError(f"--weights {args.weights} holds a clustered model (a prune/finetune --out file), which "
                        f"finetune trains as it is clustered; {given} would cluster dense weights: drop it, or pass "
                        f"the dense weights")
    if clustered and args.mode == "progressive":
        raise UserError(f"--mode progressive clusters dense weights stage by stage; --weights {args.weights} holds "
                        f"a clustered model: pass the dense weights with --ratio/--plan, or another --mode")
    if not clustered and args.plan is None and args.ratio is None:
        raise UserError("give --ratio R or --plan PLAN (e.g. --ratio 0.5, --plan map:conv1=8)")
    teacher = None
    if args.teacher is not None:
        teacher = load_model_arg(args, need_trained=True, flag="--teacher").model
        if conv_weight_counts(teacher)["clustered"]:
            raise UserError(f"--teacher {args.teacher} holds a clustered model: the teacher is the dense model to "
                            f"distil from and refit to; pass its dense weights")
    if is_cifar_model(lm.name):
        train = load_cifar_split(args, lm, "train", limit=args.limit)
        test = load_cifar_split(args, lm, "test")
        eval_data = (test.images, test.labels)
    else:
        train, eval_data = _image_folders(args, lm)
    plan = None if clustered else args.plan if args.plan is not None else {"ratio": args.ratio}
    # the recipe refits the clustered layers to the dense model: finetune does so when it clusters, and here also
    # for a clustered --weights with its dense --teacher (the library asks for it by output_calibration=True)
    refit = False if args.no_refit else (True if clustered and teacher is not None else None)
    dd.init_from_env()
    main = dd.is_main()
    if main and clustered and teacher is None:
        print(f"--weights {args.weights} is clustered and no --teacher is given: training on the labels alone (no "
              f"distillation, no refit); the recipe distils from the dense model: pass it as --teacher")
    try:
        res = finetune(lm.model, make_loader(train, args.train_batch_size, shuffle=True, seed=args.seed,
                                             num_workers=args.workers),
                       mode=args.mode, teacher=teacher, epochs=args.epochs, plan=plan,
                       granularity=args.granularity,
                       order=_order_arg(args.order), stage_epochs=args.stage_epochs,
                       stage_training=args.stage_training, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, schedule=args.schedule, temperature=args.temperature,
                       alpha=args.alpha, feature_weight=args.feature_weight, augment=not args.no_augment,
                       mixup=args.mixup,
                       output_calibration=refit, eval_data=eval_data,
                       eval_batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                       resume=not args.no_resume, seed=args.seed, progress=not args.no_progress,
                       compress_options=None if clustered else {"seed": args.kmeans_seed},
                       plot_path=Path(args.out) / "curves.png" if args.out else None)
    except ValueError as exc:
        raise UserError(_flag_words(str(exc), ratio=args.ratio is not None)) from None
    finally:
        dd.cleanup()
    if not main:
        return 0
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.2f}%")
    print(f"{lm.name} {args.mode}: clustered {pct(res.accuracy_clustered)}, after refit+BN {pct(res.accuracy_start)}, "
          f"after {len(res.history)} epochs {pct(res.accuracy)} ({res.seconds:.0f} s)")
    if res.history and res.accuracy is not None and res.accuracy_start is not None \
            and res.accuracy < res.accuracy_start:  # the model kept is the last epoch's, not the best one seen
        print(f"note: training ended at {pct(res.accuracy)}, below the {pct(res.accuracy_start)} it started from "
              f"(after the refit); the model kept is the last epoch's. Too few epochs for the schedule, or too high "
              f"an --lr, can do this: the recipe is {DEFAULT_EPOCHS[args.mode]} epochs of {args.mode} mode",
              file=sys.stderr)
    convs = [n for n, m in lm.model.named_modules() if isinstance(m, (torch.nn.Conv2d, ClusteredConv2d))]
    dense = [n for n in convs if n not in res.layer_ks]
    if dense:  # a plan or an --order that names some layers only leaves the others as they were
        print(f"  {len(res.layer_ks)} of {len(convs)} conv layers clustered; dense: {', '.join(dense[:6])}"
              + (f", ... ({len(dense)})" if len(dense) > 6 else ""))
    if plan is not None and isinstance(parse_plan(plan), OutputSensitivity):
        print(f"  k per layer (output sensitivity, {sum(res.layer_ks.values())} filters): "
              + ", ".join(f"{n}={k}" for n, k in res.layer_ks.items()))
    for h in res.history:
        print(f"  {h['phase']:>10} epoch {h['epoch']:>2}: loss {h['loss']:.4f}  train {pct(h['train_top1'])}  "
              f"eval {pct(h['eval_top1'])}  {h['seconds']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_clustered(lm, res.model, out / OUT_MODEL_NAME)
        (out / "history.json").write_text(json.dumps({
            "model": lm.name, "mode": args.mode, "plan": plan if plan is None or isinstance(plan, dict) else str(plan),
            "teacher": args.teacher,
            "accuracy_clustered": res.accuracy_clustered, "accuracy_start": res.accuracy_start,
            "accuracy": res.accuracy, "stages": res.stages, "layer_ks": res.layer_ks, "history": res.history,
            "seconds": res.seconds},
            indent=1))
        curves = f" and {out / 'curves.png'}" if (out / "curves.png").is_file() and res.history else ""
        print(f"wrote {out / 'model.pt'}, {out / 'history.json'}{curves}")
    return 0
