"""``liverseg``: segment, train, evaluate and manage datasets from the command line.

Exit codes: 0 every case worked, 1 some case failed (the others were still done), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from LiverSegExtension import __version__
from LiverSegExtension.errors import LiverSegError, UsageError
from LiverSegExtension.io import OUTPUT_FORMATS, result_status
from LiverSegExtension.model.catalog import (
    FINE_TUNE_EMA,
    FINE_TUNE_ITERATIONS,
    FINE_TUNE_LR,
    TRAIN_EMA,
    TRAIN_ITERATIONS,
    TRAIN_VAL_EVERY,
)

log = logging.getLogger("liverseg")




class _Parser(argparse.ArgumentParser):
    """argparse, with the closest option suggested for a misspelt one (``--skip-exisiting``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib

        if "unrecognized arguments:" in message:
            options = sorted(_option_strings(self))
            for word in message.split(":", 1)[1].split():
                if word.startswith("--") and (close := difflib.get_close_matches(word.split("=")[0], options, n=1)):
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--"))
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                found |= _option_strings(action.choices[sub])
    return found


class _Version(argparse.Action):
    """``--version``: the package's version and the bundled model's, read only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the package's and "
                         "the bundled model's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        from LiverSegExtension.model.catalog import bundled_model_name

        print(f"liverseg {__version__}, bundled model {bundled_model_name()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="liverseg", description="Liver segmentation in abdominal CT.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the liver in CT volumes or DICOM folders",
                       description="Segment the liver. Each case gives OUT/<name>_liver.<format> on the input's "
                                   "own grid and a row in OUT/summary.csv (rows of earlier runs are kept).")
    s.add_argument("inputs", nargs="+", metavar="CT",
                   help="volume files (.nii[.gz], .nrrd, .mha, .mhd), DICOM folders, or folders to search for both")
    s.add_argument("--output-dir", "-o", required=True, type=Path, metavar="OUT",
                   help="folder for the masks and summary.csv (made if missing); not a file name")
    s.add_argument("--format", choices=list(OUTPUT_FORMATS), default="nii.gz",
                   help="mask file format (default: nii.gz; seg.nrrd is a Slicer segmentation; dicom-seg, for DICOM "
                        "series inputs, a DICOM Segmentation object in the source's study)")
    s.add_argument("--probabilities", action="store_true",
                   help="also write OUT/<name>_liver_prob.<nii.gz|nrrd>: the liver probability x 255 (uint8) on the "
                        "input grid; 128 and above is the mask")
    _common(s)
    s.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    s.add_argument("--skip-existing", action="store_true",
                   help="resume: skip, silently, cases whose output exists and is complete (without it they are "
                        "skipped with a note; an incomplete one fails)")
    s.add_argument("--shard", metavar="I/N", help="segment cases I, I+N, I+2N... (1-based) of the sorted case "
                                                   "list, for job arrays; the summary is summary_shardIofN.csv")

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
    _common(t, model=False)

    e = sub.add_parser("evaluate", help="Dice, HD95, surface distance and volume error per case")
    e.add_argument("--pred", type=Path, help="folder of predicted masks")
    e.add_argument("--ref", type=Path, help="folder of reference masks: <name>.<ext>, scored against "
                                             "<name>[_liver].<ext> in --pred (any format segment writes)")
    e.add_argument("--data", type=Path, help="MSD dataset to segment and score (with --model)")
    e.add_argument("--cases", default="", help="comma-separated case names to score (default: all)")
    e.add_argument("--output", type=Path, help="CSV file to write; a Markdown table goes beside it (.md)")
    _common(e)

    v = sub.add_parser("view", help="a PNG of a CT with its liver mask (axial, coronal, sagittal)",
                       description="Draw the CT with the liver tinted and outlined: three labelled panels through the "
                                   "slices where the liver is largest, cropped to the body.")
    v.add_argument("ct", type=Path, metavar="CT", help="the CT (any input segment reads)")
    v.add_argument("mask", type=Path, metavar="MASK", help="its liver mask (any format segment writes)")
    v.add_argument("--output", "-o", type=Path, required=True, metavar="PICTURE.png")
    v.add_argument("--height", type=int, default=400, help="panel height in pixels (default: 400)")
    v.add_argument("--overwrite", action="store_true", help="replace the picture if it exists")
    v.add_argument("--debug", action="store_true", help="show tracebacks")

    m = sub.add_parser("summary", help="merge the shard summaries of a job array into one summary.csv")
    msub = m.add_subparsers(dest="summary_command", required=True)
    mm = msub.add_parser("merge", help="merge OUT/summary_shardIofN.csv into OUT/summary.csv",
                         description="Merge the summaries that --shard I/N runs wrote into OUT/summary.csv, with the "
                                     "rules of every run's summary (rows kept, newest per input; a 'skipped' row never "
                                     "replaces the row that made the output). Exit 1 when a shard's summary is missing.")
    mm.add_argument("folder", type=Path, metavar="OUT", help="the --output-dir of the shards")
    mm.add_argument("--debug", action="store_true")

    from LiverSegExtension.review.status import add_parser as add_review_parser

    add_review_parser(sub)  # liverseg review status OUT

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
    return p


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto: a GPU when "
                                                     "PyTorch with CUDA or MPS is installed, else the CPU)")
    if model:
        p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"],
                       help="what runs the networks (default: auto: ONNX Runtime on the CPU, PyTorch on a GPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    from LiverSegExtension.io import quiet_native_logs

    quiet_native_logs(args.debug)
    logging.getLogger("highdicom").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        if args.command == "segment":
            return cmd_segment(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "summary":
            return cmd_summary(args)
        if args.command == "review":
            from LiverSegExtension.review.status import cmd_review

            return cmd_review(args)
        if args.command == "view":
            from LiverSegExtension.view import render

            print(render(args.ct, args.mask, args.output, args.height, args.overwrite))
            return 0
        return cmd_dataset(args)
    except KeyboardInterrupt:
        print("liverseg: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        _error(exc, args.debug)
        return 2
    except LiverSegError as exc:
        _error(exc, args.debug)
        return 1
    except MemoryError:
        _error(LiverSegError("not enough memory"), args.debug)
        return 1
    except OSError as exc:  # a full disk, a folder that went away: one line, not a traceback
        from LiverSegExtension.io import display_path

        where = f"{display_path(exc.filename)}: " if exc.filename else ""
        _error(LiverSegError(f"{where}{exc.strerror or exc}"), args.debug)
        return 1


def _error(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    print(f"liverseg: error: {exc}", file=sys.stderr)


def _segmenter(args: argparse.Namespace):  # noqa: ANN202 - avoids importing torch for --help
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    try:
        return LiverSegmenter(args.model, device=args.device, runtime=args.runtime)
    except LiverSegError as exc:
        raise UsageError(str(exc)) from None


class _Progress:
    """A per-case progress bar on a terminal; silent otherwise or with --quiet."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=label, unit="%", leave=True, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, fraction: float, stage: str) -> None:
        if self.bar is not None:
            self.bar.n = int(round(fraction * 100))
            self.bar.set_postfix_str(stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SegmentDoor:
    """The CLI's part of a batch (:mod:`LiverSegExtension.batch`): its engine in this process, a progress bar
    on a terminal, a line per case."""

    def __init__(self, args: argparse.Namespace, notes: list[str]) -> None:
        self.args, self.notes = args, notes  # notes: what the search for cases found
        self.segmenter = None
        self.show = not args.quiet and sys.stderr.isatty()

    def wanted(self, case, name: str) -> list[Path]:
        """The mask, and the probability map with --probabilities: one set, written or kept together."""
        from LiverSegExtension import io

        args = self.args
        return [io.mask_path(args.output_dir, name, args.format)] + (
            [io.probability_path(args.output_dir, name, args.format)] if args.probabilities else [])

    def prepare(self, planned) -> None:
        args = self.args
        for note in self.notes if not args.quiet else ():
            print(f"liverseg: {note}", file=sys.stderr)
        if args.format == "dicom-seg":
            for case, _ in planned:
                if not case.files and case.source.exists():
                    raise UsageError(f"{case.label}: --format dicom-seg needs a DICOM series as input (a SEG's frames "
                                     "reference the source's slices); this is not one: use nii.gz, nrrd or seg.nrrd")
        if args.overwrite or not all(t.exists() for _, wanted in planned for t in wanted):
            self.segmenter = _segmenter(args)  # a bad --model is a usage error, before any case
            if not args.quiet:
                print(f"liverseg: model {self.segmenter.model.name}, {self.segmenter.runs_on}", file=sys.stderr)

    def segment(self, case, name: str, existing: list[Path], row: dict, written: list[Path]) -> str:
        from LiverSegExtension import io

        args, segmenter, target = self.args, self.segmenter, self.wanted(case, name)[0]
        # Outputs of the set that exist are this input's (its record says so): replaced with the others.
        replace = args.overwrite or bool(existing)
        assert segmenter is not None
        bar = _Progress(case.stem, self.show)
        try:
            image = io.read_case(case)
            result = segmenter.segment_image(image, progress=bar, source=case.label, probabilities=args.probabilities)
        finally:
            bar.close()
        warnings = io.case_warnings(case, result.warnings)
        row.update(liver_ml=f"{result.liver_ml:.1f}", uncertainty=f"{result.uncertainty:.3f}", runtime=segmenter.runs_on,
                   warning="; ".join(warnings), status=result_status(result.liver_ml, warnings))
        source = None if case.files else case.source  # a NIfTI input's own qform and sform go along
        notes: list[str] = []
        if args.probabilities:  # uint8 255 x p: written as a mask is
            probability = io.probability_path(args.output_dir, name, args.format)
            io.write_mask(result.probability, image, probability, overwrite=replace, header_source=source)
            written.append(probability)
        if args.format != "dicom-seg":
            io.write_mask(result.mask, image, target, overwrite=replace, header_source=source)
            written.append(target)
        elif result.liver_ml > 0:
            from LiverSegExtension.io.dicom_seg import write_dicom_seg

            card = segmenter.model.card
            notes = write_dicom_seg(result.mask, case.files, target, str(card.get("name", "liverseg")),
                                    str(card.get("version", "")), overwrite=replace)
            written.append(target)
        else:  # no SEG without a segment frame; the warning says no liver was found
            row["output"] = ""
        for warning in warnings:  # shown even with --quiet: the mask may be wrong
            print(f"liverseg: warning: {warning}", file=sys.stderr)
        return "; ".join(notes)

    def report(self, index: int, total: int, case, row: dict, note: str) -> None:
        if row["error"]:
            _error(LiverSegError(row["error"]), False)
        if self.args.quiet:
            return
        if note:
            print(f"liverseg: {note}", file=sys.stderr)
        if not self.show:
            detail = f"{row['liver_ml']} mL" if row["liver_ml"] else ""
            print(f"{row['status']:7s} {case.label} {detail} ({row['seconds']} s)".replace("  (", " ("),
                  file=sys.stderr)


def cmd_segment(args: argparse.Namespace) -> int:
    from LiverSegExtension import io
    from LiverSegExtension.batch import check_options, run_batch

    out_dir: Path = args.output_dir
    shard = check_options(out_dir, args.overwrite, args.skip_existing, args.shard)
    notes: list[str] = []
    code, rows, summary = run_batch(args.inputs, out_dir, _SegmentDoor(args, notes), shard, args.overwrite,
                                    args.skip_existing, notes)
    if not args.quiet:
        print(f"liverseg: {len(rows)} case(s): {io.status_counts(rows)}; summary in {summary}", file=sys.stderr)
    return code


def needs_torch_extra(command: str) -> None:
    """The commands that train run on PyTorch and MONAI (the torch extra): one line when they are missing."""
    from LiverSegExtension.model.runtimes import TORCH_HINT, installed

    missing = [m for m in ("torch", "monai", "safetensors") if not installed(m)]
    if missing:
        raise LiverSegError(f"liverseg {command} needs {', '.join(missing)}, not installed here: {TORCH_HINT}")


def cmd_train(args: argparse.Namespace) -> int:
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
        from LiverSegExtension.training.loop import TrainConfig, train

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
    from LiverSegExtension.data.corrections import add_case, check_dataset, dataset_entries

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


if __name__ == "__main__":
    sys.exit(main())
