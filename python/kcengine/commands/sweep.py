"""``kcengine sweep``: per-layer sensitivity (each layer clustered alone, for each k)."""
from __future__ import annotations

from pathlib import Path

from .eval import add_model_data_arguments, check_backend_arg, load_data_arg, load_model_arg

# sensitivity_sweep's keywords as the flags that set them (its errors name the keyword, the CLI's the flag)
_FLAGS = {"layers": "--layers", "seed": "--seed", "granularity": "--granularity", "ratios": "--ratios",
          "batch_size": "--batch-size", "backend": "--backend"}
HELP = "per-layer sensitivity sweep: accuracy and F = acc/(unique/total) for each layer and k"
OUT_FILES = ("sweep.csv", "sweep.md", "sweep.png")  # what the command writes in --out


def add_arguments(parser) -> None:
    add_model_data_arguments(parser)
    parser.add_argument("--granularity", default="filter", choices=("filter", "kernel", "element"),
                        help="(default filter)")
    parser.add_argument("--layers", default=None,
                        help="'first', comma-separated names, or a regex (full match) (default: every conv)")
    parser.add_argument("--ratios", default=None,
                        help="comma-separated k/N values (default 1/16, 2/16, ..., 1)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    parser.add_argument("--backend", default="auto",
                        help="k-means backend: auto, cpu, torch, cuda, triton (default auto)")
    parser.add_argument("--out", default=None,
                        help="folder for sweep.csv, sweep.md and sweep.png (default: none; without it the table "
                             "is only printed)")


def _ratios(text):
    from ..cli import UserError

    if text is None:
        return None
    try:
        rs = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--ratios must be comma-separated numbers in (0, 1], got {text!r}") from None
    bad = [r for r in rs if not 0 < r <= 1]
    if not rs or bad:
        raise UserError(f"--ratios must be comma-separated numbers in (0, 1], got {text!r}")
    return rs


def run(args) -> int:
    import torch

    from ..bench.common import markdown_table, write_csv
    from ..cli import UserError, flag_words
    from ..compress import sensitivity_sweep
    from ..compress.sensitivity import DEFAULT_SWEEP_RATIOS
    from .prune import _layers_arg

    ratios = _ratios(args.ratios) or DEFAULT_SWEEP_RATIOS
    check_backend_arg(args.backend)
    lm = load_model_arg(args, need_trained=True)
    data = load_data_arg(args, lm)
    if hasattr(data, "images"):
        x, y = data.images, data.labels
    else:  # an ImageFolder: gather into memory (the sweep re-evaluates many times)
        xs, ys = zip(*[data[i] for i in range(len(data))])
        x, y = torch.stack(xs), torch.tensor(ys)
    try:
        res = sensitivity_sweep(lm.model, x, y, granularity=args.granularity, layers=_layers_arg(args.layers),
                                ratios=ratios, batch_size=args.batch_size, progress=True, seed=args.seed,
                                backend=args.backend)
    except ValueError as exc:
        raise UserError(flag_words(str(exc), _FLAGS)) from None
    cols = ["layer", "n_points", "k", "k_ratio", "accuracy", "unique_ratio", "F", "F_local_max"]
    print(f"baseline accuracy {100 * res.baseline_accuracy:.2f}%; {res.n_evaluations} evaluations in "
          f"{res.seconds:.1f} s")
    print(markdown_table(res.rows, cols))
    if args.out:
        out = Path(args.out)
        write_csv(out / "sweep.csv", res.rows)
        (out / "sweep.md").write_text(markdown_table(res.rows, cols))
        res.plot(out / "sweep.png", title=f"{lm.name} sensitivity ({args.granularity})")
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 0
