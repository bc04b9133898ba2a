"""The options a training run is made of and the ``TrainConfig`` they ask for, checked once for ``liverseg train``
and ``scripts/device_train.py pack`` alike. No SimpleITK: the packing script imports it on a lent machine too."""

from __future__ import annotations

import argparse
from pathlib import Path

from LiverSegExtension.errors import UsageError
from LiverSegExtension.model.catalog import (
    FINE_TUNE_EMA,
    FINE_TUNE_ITERATIONS,
    FINE_TUNE_LR,
    TRAIN_EMA,
    TRAIN_ITERATIONS,
    TRAIN_VAL_EVERY,
)
from LiverSegExtension.training.config import TrainConfig


def add_train_options(t: argparse.ArgumentParser) -> None:
    """What a training run is made of, for ``liverseg train`` and for ``scripts/device_train.py pack``."""
    t.add_argument("--data", required=True, action="append", type=Path, help="dataset folder (repeat to mix datasets)")
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
    t.add_argument("--fine-spacing", type=float, metavar="MM",
                   help="train the fine stage on an isotropic grid of MM (default: the parent's; 2.5 from scratch)")
    t.add_argument("--name", help="model name (default: the parent's when fine-tuning, else liverseg)")
    t.add_argument("--model-version", help="semantic version for the new model (default: parent's minor + 1)")


def train_config(args: argparse.Namespace, output: Path) -> TrainConfig:
    """The run these options ask for, checked (a UsageError names the option): with ``--init`` the fine-tuning
    recipe, else training from scratch."""
    from LiverSegExtension.model.catalog import STAGES, safe_name
    from LiverSegExtension.training.finetune import recipe

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
    for option, value in (("--name", args.name), ("--model-version", args.model_version)):
        if value is not None and not safe_name(value):
            raise UsageError(f"{option} {value!r}: use letters, digits, '.', '_', '+' or '-' (it names folders)")
    stages_arg = args.stages or ("fine" if tuning else ",".join(STAGES))
    stages = [s for s in STAGES if s in stages_arg.split(",")]
    if not stages or set(stages_arg.split(",")) - set(STAGES):
        raise UsageError(f"--stages {stages_arg}: expected one or more of {', '.join(STAGES)}")
    if args.fine_spacing is not None and not (0.5 <= args.fine_spacing <= 6.0 and "fine" in stages):
        raise UsageError(f"--fine-spacing {args.fine_spacing}: expected 0.5 to 6 mm, with the fine stage trained")
    common = dict(fine_spacing_mm=args.fine_spacing,
                  val_cases=[v for v in args.val.split(",") if v], max_minutes=args.max_minutes, device=args.device,
                  seed=args.seed, name=args.name, version=args.model_version, oversample=oversample)
    if tuning:
        return recipe(args.data, output, args.init, iterations=iterations, stages=stages, ema=args.ema, lr=args.lr,
                      **common)
    return TrainConfig(data=args.data, output=output, iterations=iterations, val_every=args.val_every,
                       ema=TRAIN_EMA if args.ema is None else args.ema, lr=args.lr, stages=stages, **common)
