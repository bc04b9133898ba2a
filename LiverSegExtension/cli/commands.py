"""The smaller commands: ``evaluate``, ``view``, ``summary merge`` and ``dataset add|check``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LiverSegExtension.cli.common import add_common
from LiverSegExtension.errors import LiverSegError, UsageError


def add_evaluate(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    e = sub.add_parser("evaluate", help="Dice, HD95, surface distance and volume error per case")
    e.add_argument("--pred", type=Path, help="folder of predicted masks")
    e.add_argument("--ref", type=Path, help="folder of reference masks: <name>.<ext>, scored against "
                                             "<name>[_liver].<ext> in --pred (any format segment writes)")
    e.add_argument("--data", type=Path, help="MSD dataset to segment and score (with --model)")
    e.add_argument("--cases", default="", help="comma-separated case names to score (default: all)")
    e.add_argument("--output", type=Path, help="CSV file to write; a Markdown table goes beside it (.md)")
    add_common(e)



def add_view(sub) -> None:  # noqa: ANN001
    v = sub.add_parser("view", help="a PNG of a CT with its liver mask (axial, coronal, sagittal)",
                       description="Draw the CT with the liver tinted and outlined: three labelled panels through the "
                                   "slices where the liver is largest, cropped to the body.")
    v.add_argument("ct", type=Path, metavar="CT", help="the CT (any input segment reads)")
    v.add_argument("mask", type=Path, metavar="MASK", help="its liver mask (any format segment writes)")
    v.add_argument("--output", "-o", type=Path, required=True, metavar="PICTURE.png")
    v.add_argument("--height", type=int, default=400, help="panel height in pixels (default: 400)")
    v.add_argument("--overwrite", action="store_true", help="replace the picture if it exists")
    v.add_argument("--debug", action="store_true", help="show tracebacks")



def add_summary(sub) -> None:  # noqa: ANN001
    m = sub.add_parser("summary", help="merge the shard summaries of a job array into one summary.csv")
    msub = m.add_subparsers(dest="summary_command", required=True)
    mm = msub.add_parser("merge", help="merge OUT/summary_shardIofN.csv into OUT/summary.csv",
                         description="Merge the summaries that --shard I/N runs wrote into OUT/summary.csv, with the "
                                     "rules of every run's summary (rows kept, newest per input; a 'skipped' row never "
                                     "replaces the row that made the output). Exit 1 when a shard's summary is missing.")
    mm.add_argument("folder", type=Path, metavar="OUT", help="the --output-dir of the shards")
    mm.add_argument("--debug", action="store_true")



def add_dataset(sub) -> None:  # noqa: ANN001
    d = sub.add_parser("dataset", help="build and check MSD-layout training datasets")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    da = dsub.add_parser("add", help="add a CT and its liver mask as a new case")
    da.add_argument("--dataset", required=True, type=Path)
    da.add_argument("--image", required=True, type=Path)
    da.add_argument("--label", required=True, type=Path,
                    help="the liver label: a volume holding 0 and one value, or a DICOM SEG of the CT")
    da.add_argument("--liver-values", metavar="V[,V...]",
                    help="the values that are liver in a label of several structures (1,2: liver and tumour)")
    da.add_argument("--annotator", default="")
    da.add_argument("--debug", action="store_true")
    dc = dsub.add_parser("check", help="check that every case is readable, on one grid and binary")
    dc.add_argument("dataset", type=Path)
    dc.add_argument("--debug", action="store_true")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from LiverSegExtension.data.evaluation import evaluate_dataset, evaluate_folders, write_report

    cases = [c for c in args.cases.split(",") if c]
    missing: list[str] = []
    if args.data and (args.pred or args.ref):
        raise UsageError("give --pred and --ref folders, or --data, not both")
    if args.data:
        rows = evaluate_dataset(args.data, args.model, cases, args.device, args.runtime)
    elif args.pred and args.ref:
        rows, missing = evaluate_folders(args.pred, args.ref, cases)
    else:
        raise UsageError("give --pred and --ref folders, or --data (and optionally --model)")
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"{args.output}: its folder {args.output.parent} does not exist")
    if rows:
        print(write_report(rows, args.output), end="")
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"liverseg: {len(missing)} reference(s) without a prediction, not scored: {shown}", file=sys.stderr)
    if not rows:
        raise LiverSegError(f"{args.pred}: no prediction matches a reference in {args.ref}")
    return 1 if any(r.get("error") for r in rows) else 0


def cmd_view(args: argparse.Namespace) -> int:
    from LiverSegExtension.view import render

    print(render(args.ct, args.mask, args.output, args.height, args.overwrite))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from LiverSegExtension import io

    merged, missing = io.merge_shard_summaries(args.folder)
    print(f"liverseg: {merged} row(s) from the shard summaries merged into {args.folder / 'summary.csv'}",
          file=sys.stderr)
    if missing:
        print(f"liverseg: error: no summary from shard(s) {', '.join(missing)}: still running, or failed?",
              file=sys.stderr)
        return 1
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from LiverSegExtension.data.dataset import add_case, check_dataset, dataset_entries

    if args.dataset_command == "add":
        try:
            values = tuple(int(v) for v in args.liver_values.split(",")) if args.liver_values else None
        except ValueError:
            raise UsageError(f"--liver-values takes whole numbers separated by commas, got {args.liver_values!r}") from None
        name = add_case(args.dataset, args.image, args.label, provenance={"annotator": args.annotator or None},
                        liver_values=values)
        print(f"added {name} to {args.dataset}")
        return 0
    problems = check_dataset(args.dataset)
    for p in problems:
        print(p)
    try:
        count = f"{len(dataset_entries(args.dataset))} case(s)"
    except LiverSegError:
        count = "no usable dataset.json"
    print(f"{args.dataset}: {count}, {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
