"""``liverseg train``: training from scratch, or the guarded fine-tune with ``--init``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LiverSegExtension.cli.common import add_common
from LiverSegExtension.errors import LiverSegError, UsageError
from LiverSegExtension.model.catalog import (
    FINE_TUNE_EMA,
    FINE_TUNE_ITERATIONS,
    FINE_TUNE_LR,
    TRAIN_EMA,
    TRAIN_ITERATIONS,
    TRAIN_VAL_EVERY,
)


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    t = sub.add_parser(
        "train", help="train, or fine-tune a model on corrected cases (with --init)",
        description="With --init, fine-tune MODEL safely on a few corrected cases: the fine stage only, "
                    f"{FINE_TUNE_ITERATIONS} iterations, the parent's training data replayed when found, one "
                    "correction in five held back, then the new model and its parent are compared and the new "
                    "one is rejected (exit 1) if it is worse. Without --init, train a model from scratch.")
    t.add_argument("--data", required=True, action="append", type=Path, help="dataset folder (repeat to mix datasets)")
    t.add_argument("--output", required=True, type=Path, help="model folder to write (resumes if it holds a checkpoint)")
    t.add_argument("--init", type=Path, help="model folder to fine-tune from")
    t.add_argument("--val", default="", help="comma-separated validation case names (not trained on; with --init: "
                                             "the corrections to hold back, default one in five)")
    t.add_argument("--holdout", type=int, help="with --init and no --val: how many corrections to hold back")
    t.add_argument("--replay", default="auto", metavar="auto|none|DATASET",
                   help="with --init: the parent's training data to replay (auto: the datasets its card names, "
                        "at their recorded path or by name in $LIVERSEG_DATA_DIR, ~/.liverseg/data, ../shared/data)")
    t.add_argument("--iterations", type=int,
                   help=f"fine-stage iterations (coarse stage: half); default {FINE_TUNE_ITERATIONS} with --init, else "
                        f"{TRAIN_ITERATIONS}")
    t.add_argument("--max-minutes", type=float, help="wall-clock budget for the whole run")
    t.add_argument("--val-every", type=int, default=TRAIN_VAL_EVERY,
                   help=f"without --init: validate every N iterations (default {TRAIN_VAL_EVERY})")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--oversample", action="append", default=[], metavar="CASE=K",
                   help="draw a training case K times as often (repeat for several cases)")
    t.add_argument("--stages", help="stages to train, comma-separated; with --init the others are kept from it "
                                    "(default: fine with --init, else coarse,fine)")
    t.add_argument("--ema", type=float,
                   help=f"decay of the moving average of the weights that is validated and saved (0: off; default "
                        f"{FINE_TUNE_EMA} with --init, else {TRAIN_EMA})")
    t.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3; with --init the recipe's "
                                            f"{FINE_TUNE_LR}, rising over the first tenth of the iterations)")
    t.add_argument("--name", help="model name (default: the parent's when fine-tuning, else liverseg)")
    t.add_argument("--model-version", help="semantic version for the new model (default: parent's minor + 1)")
    add_common(t, model=False)



def needs_torch_extra(command: str) -> None:
    """The commands that train run on PyTorch and MONAI (the torch extra): one line when they are missing."""
    from LiverSegExtension.model.environment import TORCH_HINT, installed

    missing = [m for m in ("torch", "monai", "safetensors") if not installed(m)]
    if missing:
        raise LiverSegError(f"liverseg {command} needs {', '.join(missing)}, not installed here: {TORCH_HINT}")


def run(args: argparse.Namespace) -> int:
    from LiverSegExtension.model.catalog import STAGES

    needs_torch_extra("train")

    tuning = args.init is not None
    iterations = args.iterations if args.iterations is not None else (FINE_TUNE_ITERATIONS if tuning else TRAIN_ITERATIONS)
    if iterations < 1:
        raise UsageError("--iterations must be at least 1")
    if args.holdout is not None and (args.holdout < 0 or args.val or not tuning):
        raise UsageError("--holdout takes a count of at least 0, with --init and without --val")
    oversample = {}
    for spec in args.oversample:
        name, _, times = spec.partition("=")
        if not name or not times.isdigit() or int(times) < 1:
            raise UsageError(f"--oversample {spec}: expected CASE=K with K a whole number of at least 1")
        oversample[name] = int(times)
    from LiverSegExtension.model.catalog import safe_name

    for option, value in (("--name", args.name), ("--model-version", args.model_version)):
        if value is not None and not safe_name(value):
            raise UsageError(f"{option} {value!r}: use letters, digits, '.', '_', '+' or '-' (it names folders)")
    stages_arg = args.stages or ("fine" if tuning else ",".join(STAGES))
    stages = [s for s in stages_arg.split(",") if s]
    if not stages or set(stages) - set(STAGES):
        raise UsageError(f"--stages {stages_arg}: expected one or more of {', '.join(STAGES)}")

    def progress(info: dict) -> None:
        if args.quiet or info["stage"] == "guard":
            return
        it, total = info["iteration"], info["total"]
        if it % 10 == 0 or it == total:
            print(f"[{info['stage']}] {it}/{total} loss {info['loss']:.4f} ({info['elapsed_s']:.0f} s)",
                  file=sys.stderr, flush=True)

    common = dict(val_cases=[v for v in args.val.split(",") if v], max_minutes=args.max_minutes, device=args.device,
                  seed=args.seed, name=args.name, version=args.model_version, oversample=oversample)
    if not tuning:
        from LiverSegExtension.training.config import TrainConfig
        from LiverSegExtension.training.loop import train

        train(TrainConfig(data=args.data, output=args.output, iterations=iterations, val_every=args.val_every,
                          ema=TRAIN_EMA if args.ema is None else args.ema, lr=args.lr,
                          stages=[s for s in STAGES if s in stages], **common), progress=progress)
        return 0
    from LiverSegExtension.training.finetune import recipe

    cfg = recipe(args.data, args.output, args.init, iterations=iterations, stages=stages, ema=args.ema, lr=args.lr,
                 **common)
    from LiverSegExtension.training.finetune import fine_tune

    replay = args.replay if args.replay in ("auto", "none") else Path(args.replay)
    result = fine_tune(cfg, replay=replay, holdout=args.holdout, progress=progress,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"liverseg: {result.model_dir}: {result.reason}", file=sys.stderr)
    return 0 if result.accepted else 1
