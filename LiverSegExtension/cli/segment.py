"""``liverseg segment``: the CLI's door onto the batch runner (:mod:`LiverSegExtension.batch`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LiverSegExtension.cli.common import add_common, print_error
from LiverSegExtension.errors import LiverSegError, UsageError
from LiverSegExtension.io import OUTPUT_FORMATS, result_status
from LiverSegExtension.model.catalog import model_label


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
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
    add_common(s)
    s.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    s.add_argument("--skip-existing", action="store_true",
                   help="resume: skip, silently, cases whose output exists and is complete (without it they are "
                        "skipped with a note; an incomplete one fails)")
    s.add_argument("--shard", metavar="I/N", help="segment cases I, I+N, I+2N... (1-based) of the sorted case "
                                                   "list, for job arrays; the summary is summary_shardIofN.csv")



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


class SegmentDoor:
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
                   model=model_label(segmenter.model.card),
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
            print_error(LiverSegError(row["error"]), False)
        if self.args.quiet:
            return
        if note:
            print(f"liverseg: {note}", file=sys.stderr)
        if not self.show:
            detail = f"{row['liver_ml']} mL" if row["liver_ml"] else ""
            print(f"{row['status']:7s} {case.label} {detail} ({row['seconds']} s)".replace("  (", " ("),
                  file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from LiverSegExtension import io
    from LiverSegExtension.batch import check_options, run_batch

    out_dir: Path = args.output_dir
    shard = check_options(out_dir, args.overwrite, args.skip_existing, args.shard)
    notes: list[str] = []
    code, rows, summary = run_batch(args.inputs, out_dir, SegmentDoor(args, notes), shard, args.overwrite,
                                    args.skip_existing, notes)
    if not args.quiet:
        print(f"liverseg: {len(rows)} case(s): {io.status_counts(rows)}; summary in {summary}", file=sys.stderr)
    return code
