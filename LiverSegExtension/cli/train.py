"""``liverseg train``: training from scratch, or the guarded fine-tune with ``--init``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LiverSegExtension.cli.common import add_common
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import (
    FINE_TUNE_ITERATIONS,
)
from LiverSegExtension.training.options import add_train_options, train_config


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    t = sub.add_parser(
        "train", help="train, or fine-tune a model on corrected cases (with --init)",
        description="With --init, fine-tune MODEL safely on a few corrected cases: the fine stage only, "
                    f"{FINE_TUNE_ITERATIONS} iterations, the parent's training data replayed when found, one "
                    "correction in five held back, then the new model and its parent are compared and the new "
                    "one is rejected (exit 1) if it is worse. Without --init, train a model from scratch.")
    t.add_argument("--output", required=True, type=Path, help="model folder to write (resumes if it holds a checkpoint)")
    add_train_options(t)
    add_common(t, model=False)



def needs_torch_extra(command: str) -> None:
    """The commands that train run on PyTorch and MONAI (the torch extra): one line when they are missing."""
    from LiverSegExtension.model.environment import TORCH_HINT, installed

    missing = [m for m in ("torch", "monai", "safetensors") if not installed(m)]
    if missing:
        raise LiverSegError(f"liverseg {command} needs {', '.join(missing)}, not installed here: {TORCH_HINT}")


def run(args: argparse.Namespace) -> int:
    needs_torch_extra("train")
    cfg = train_config(args, args.output)

    def progress(info: dict) -> None:
        if args.quiet or info["stage"] == "guard":
            return
        it, total = info["iteration"], info["total"]
        if it % 10 == 0 or it == total:
            print(f"[{info['stage']}] {it}/{total} loss {info['loss']:.4f} ({info['elapsed_s']:.0f} s)",
                  file=sys.stderr, flush=True)

    if cfg.init is None:
        from LiverSegExtension.training.loop import train

        train(cfg, progress=progress)
        return 0
    from LiverSegExtension.training.finetune import fine_tune

    replay = args.replay if args.replay in ("auto", "none") else Path(args.replay)
    result = fine_tune(cfg, replay=replay, holdout=args.holdout, progress=progress,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"liverseg: {result.model_dir}: {result.reason}", file=sys.stderr)
    return 0 if result.accepted else 1
