"""Train on a lent GPU machine where SimpleITK cannot be installed: pack here, run there, finish here.

    python scripts/device_train.py pack --data DATASET [--data ...] --out .devicepack [--init MODEL] [--val A,B]
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
from LiverSegExtension.training.options import add_train_options  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="here: the training cases on the model's grids, and the run's settings")
    pk.add_argument("--out", required=True, type=Path, help="the pack's folder (inside the repository, ignored)")
    pk.add_argument("--device", default="auto", help=argparse.SUPPRESS)  # recorded; finish names where it ran
    add_train_options(pk)  # liverseg train's, checked alike
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
