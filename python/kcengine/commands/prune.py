"""``kcengine prune``: cluster a model's conv weights with a plan; report accuracy and compression."""
from __future__ import annotations

import re
from pathlib import Path

from .eval import add_model_data_arguments, check_backend_arg, load_data_arg, load_model_arg, save_clustered

HELP = "cluster conv weights with a plan (ratio, inertia, elbow, per-layer map, by channels)"
OUT_FILES = ("report.json", "report.md", "model.pt")  # what the command writes in --out


def add_arguments(parser) -> None:
    add_model_data_arguments(parser)
    g = parser.add_argument_group("plan", "one of --ratio or --plan is required")
    g.add_argument("--ratio", type=float, default=None, help="k = round(N * RATIO) for every layer")
    g.add_argument("--plan", default=None,
                   help="R (a ratio, as --ratio R) | ratio=R | inertia=X | relative_inertia=F | elbow[=A:B:STEP] | "
                        "map:NAME=K,... | channels:C=K,...")
    g.add_argument("--granularity", default="filter", choices=("filter", "kernel", "element"), help="(default filter)")
    g.add_argument("--layers", default=None,
                   help="'first', comma-separated names, or a regex (full match) (default: every conv)")
    g.add_argument("--threshold", type=float, default=None, help="filters farther than this keep their weights (default: none kept)")
    g.add_argument("--cosine", action="store_true", help="cluster normalized filters, keep each norm")
    g.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    g.add_argument("--backend", default="auto", help="k-means backend: auto, cpu, torch, cuda, triton (default auto)")
    parser.add_argument("--no-eval", action="store_true", help="skip accuracy (allows --weights none)")
    parser.add_argument("--out", default=None, help="folder for report.json, report.md and model.pt (the clustered "
                        "model, compact: --weights of eval and kcengine.load_compressed read it; default: none, the "
                        "report is only printed)")


def _layers_arg(text):
    """--layers: 'first', a list of layer names when the text is names joined by commas (each made of letters,
    digits, '_', '.' and '-'), else a regex, which may hold commas itself (``layer[12]\\.[0-9]{1,2}\\..*``)."""
    if text is None or text == "first":
        return text
    parts = [t.strip() for t in text.split(",")]
    if len(parts) > 1 and all(re.fullmatch(r"[\w.-]+", t) for t in parts if t):
        return [t for t in parts if t]
    return text


def _progress(msg: str) -> None:
    """compress's progress lines go to stderr, so stdout carries only the report."""
    import sys

    print(f"kcengine prune: {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from ..cli import UserError
    from ..compress import compress
    from ..models.zoo import OUT_MODEL_NAME

    if args.plan is None and args.ratio is None:
        raise UserError("give --ratio R or --plan PLAN (e.g. --ratio 0.5, --plan elbow, --plan map:conv1=8)")
    if args.plan is not None and args.ratio is not None:
        raise UserError(f"give --ratio R or --plan PLAN, not both (got --ratio {args.ratio} and --plan {args.plan})")
    check_backend_arg(args.backend)
    if args.plan is not None and args.plan.strip().lower().startswith("sensitivity"):
        raise UserError(f"--plan {args.plan} splits the unique filters by the network's outputs on training images, "
                        f"which prune does not read: kcengine finetune --plan {args.plan} measures it (and recovers)")
    lm = load_model_arg(args, need_trained=not args.no_eval)
    data = None if args.no_eval else load_data_arg(args, lm)
    try:
        model, report = compress(lm.model, args.plan, ratio=args.ratio, granularity=args.granularity,
                                 layers=_layers_arg(args.layers), threshold=args.threshold, cosine=args.cosine,
                                 eval_data=data, eval_batch_size=args.batch_size, seed=args.seed,
                                 backend=args.backend, progress=_progress)
    except ValueError as exc:
        raise UserError(cli_words(str(exc), ratio=args.ratio is not None)) from None
    print(report.to_markdown(title=f"{lm.name}: {report.plan}, {report.granularity}"))
    _recovery_hint(args, report)
    if args.out:
        out = Path(args.out)
        report.to_json(out / "report.json")
        report.to_markdown(out / "report.md", title=f"{lm.name}: {report.plan}, {report.granularity}")
        save_clustered(lm, model, out / OUT_MODEL_NAME)
        print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'model.pt'}")
    return 0


def _recovery_hint(args, report) -> None:
    """When clustering cost accuracy at a granularity finetune trains, say (on stderr) that these figures come
    without retraining and which command recovers them with the same plan."""
    from ..train.finetune import GRANULARITIES  # what finetune can cluster and train

    before, after = report.accuracy_before, report.accuracy_after
    if before is None or after is None or after >= before or args.granularity not in GRANULARITIES:
        return
    import shlex

    from ..models import is_cifar_model
    from ..models.zoo import OUT_MODEL_NAME

    q = shlex.quote
    # the command as the user can paste it: their model, weights and (CIFAR: the same folder) data
    same = "".join([f" --model {q(args.model)}" if args.model != "resnet20" else "",
                    f" --data {q(str(args.data))}" if args.data is not None and is_cifar_model(args.model) else ""])
    weights = "" if args.weights == "pretrained" else f" --weights {q(str(args.weights))}"
    plan = f"--ratio {args.ratio:g}" if args.ratio is not None else f"--plan {q(args.plan)}"
    if args.layers is not None:  # finetune has no --layers: the layers this run clustered, at the ks it chose
        plan = "--plan " + q("map:" + ",".join(f"{lr.name}={lr.k}" for lr in report.layers))
    extra = "" if args.granularity == "filter" else f" --granularity {args.granularity}"
    extra += f" --kmeans-seed {args.seed}" if args.seed != 0 else ""
    dropped = [flag for flag, on in (("--cosine", args.cosine), ("--threshold", args.threshold is not None)) if on]
    dropped_note = f" (without {' and '.join(dropped)}, which finetune does not take)" if dropped else ""
    also = ""
    if args.out:  # the clustered model this run writes, trained as it is, refit and distilled from the dense one
        also = (f"; `python -m kcengine finetune{same} --weights {q(str(Path(args.out) / OUT_MODEL_NAME))} "
                f"--teacher {q(str(args.weights))}` trains the model written to --out")
    _progress(f"accuracy {before:.2%} -> {after:.2%} is right after clustering, without retraining; "
              f"`python -m kcengine finetune{same}{weights} {plan}{extra}`{dropped_note} clusters again and recovers "
              f"most of it "
              f"(CIFAR ResNets and torchvision models; kcengine.finetune for any model){also}")


def plan_map_words(msg: str) -> str:
    """The dict form of a per-layer plan in a compress error as the ``--plan map:...`` a CLI user types."""
    return re.sub(r"pass \{'layers': \{'re:\.\*': (\d+)\}\}", r"pass --plan map:re:.*=\1", msg)


def cli_words(msg: str, ratio: bool = False) -> str:
    """A compress error's Python spellings as the flags a prune user types: ``plan=X`` -> ``--plan X``,
    ``layers=`` -> ``--layers`` (:func:`kcengine.cli.flag_words`), and the dict form of a per-layer plan ->
    ``--plan map:...``.  ``ratio``: the user gave ``--ratio`` (a plan's own ``ratio=R`` keeps its spelling)."""
    from ..cli import flag_words

    msg = plan_map_words(msg)
    flags = {"plan": "--plan", "layers": "--layers", "threshold": "--threshold", "seed": "--seed",
             "backend": "--backend", "eval_batch_size": "--batch-size", "granularity": "--granularity"}
    return flag_words(msg, {**flags, **({"ratio": "--ratio"} if ratio else {})})
