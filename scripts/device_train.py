"""Train on a lent GPU machine where SimpleITK cannot be installed: pack here, run there, finish here.

    python scripts/device_train.py pack --data DATASET [--data ...] --out .devicepack [--init MODEL] [--val-cases A,B]
    python3 scripts/device_train.py run --pack .devicepack --out RUN_DIR [--minutes 8]     # on the lent machine
    python scripts/device_train.py finish --pack .devicepack --weights RUN_DIR --output MODEL_DIR

``pack`` reads the cases with ``liverseg train``'s loader onto each trained stage's grid (``training.loop.prepare``)
and writes ``cases.npz`` (int16 HU, uint8 label, bzip2: 28 % smaller than zip's deflate on CT noise) and
``manifest.json`` (the run's settings, the architecture, the cases in order, the model started from). ``run``
needs torch, numpy and MONAI only: it trains with ``training.steps``, the steps ``liverseg train`` takes, and
writes the moving average of the weights (``weights.safetensors``, the key layout of ``LiverModel``), a
checkpoint to resume from and ``run.json``. ``finish`` makes the model folder as ``liverseg train`` does (card,
safetensors, the ONNX twin checked against PyTorch), validates it on the held-out cases at their own
resolution, and for a pack made with ``--init`` applies the fine-tuning guard against that parent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LiverSegExtension.errors import LiverSegError  # noqa: E402
from LiverSegExtension.model.catalog import STAGES  # noqa: E402


def _oversample(spec: str) -> tuple[str, int]:
    name, _, times = spec.partition("=")
    if not name or not times.isdigit() or int(times) < 1:
        raise argparse.ArgumentTypeError(f"{spec}: expected CASE=K with K a whole number of at least 1")
    return name, int(times)


def _parser() -> argparse.ArgumentParser:
    from LiverSegExtension.model.catalog import TRAIN_VAL_EVERY

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="here: the training cases on the model's grids, and the run's settings")
    pk.add_argument("--data", required=True, action="append", type=Path, help="dataset folder (repeat to mix)")
    pk.add_argument("--out", required=True, type=Path, help="the pack's folder (inside the repository, ignored)")
    pk.add_argument("--init", type=Path, help="model folder to fine-tune from (liverseg train --init)")
    pk.add_argument("--val-cases", "--val", default="", type=lambda v: [c for c in v.split(",") if c],
                    help="comma-separated validation cases (with --init: the corrections held back)")
    pk.add_argument("--holdout", type=int, help="with --init and no --val-cases: how many corrections to hold back")
    pk.add_argument("--replay", default="auto", help="with --init: auto|none|DATASET, as liverseg train")
    pk.add_argument("--iterations", type=int, help="fine-stage iterations (coarse: half); liverseg train's default")
    pk.add_argument("--val-every", type=int, default=TRAIN_VAL_EVERY, help="recorded in the card's recipe")
    pk.add_argument("--stages", type=lambda v: v.split(","), help="stages to train (default as liverseg train)")
    pk.add_argument("--lr", type=float)
    pk.add_argument("--ema", type=float)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--oversample", action="append", type=_oversample, default=[], metavar="CASE=K")
    pk.add_argument("--name")
    pk.add_argument("--model-version")
    rn = sub.add_parser("run", help="on the lent machine: train within --minutes, resumable")
    rn.add_argument("--pack", required=True, type=Path)
    rn.add_argument("--out", required=True, type=Path, help="weights, checkpoint and run.json (resumed if there)")
    rn.add_argument("--resume", type=Path, help="a checkpoint.pt to go on from (default: in --out, else in --pack)")
    rn.add_argument("--minutes", type=float, default=8.0, help="this call's time (coarse stage: its quarter)")
    rn.add_argument("--device", default="auto")
    rn.add_argument("--stop-after", type=int, default=0, help="stop after this many iterations (a short check)")
    fn = sub.add_parser("finish", help="here: the model folder, its validation, and the guard with --init")
    fn.add_argument("--pack", required=True, type=Path)
    fn.add_argument("--weights", required=True, type=Path, help="the run's folder (weights.safetensors, run.json)")
    fn.add_argument("--output", required=True, type=Path, help="model folder to write")
    fn.add_argument("--device", default="auto", help="where to validate")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pack":  # what liverseg train refuses, refused alike
        args.oversample = dict(args.oversample)
        if args.iterations is not None and args.iterations < 1:
            _parser().error("--iterations must be at least 1")
        if args.holdout is not None and (args.holdout < 0 or args.val_cases or not args.init):
            _parser().error("--holdout takes a count of at least 0, with --init and without --val-cases")
        if args.stages and set(args.stages) - set(STAGES):
            _parser().error(f"--stages {','.join(args.stages)}: expected one or more of {', '.join(STAGES)}")
    try:
        if args.command == "pack":
            from LiverSegExtension.training.packed.pack import pack as step
        elif args.command == "run":
            from LiverSegExtension.training.packed.run import run as step
        else:
            from LiverSegExtension.training.packed.finish import finish as step
        return step(args)
    except LiverSegError as exc:
        print(f"device_train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
