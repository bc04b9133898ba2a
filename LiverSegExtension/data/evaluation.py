"""Scoring predicted masks against references, per case, as CSV and a Markdown table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.data.metrics import case_metrics
from LiverSegExtension.data.msd import load_msd
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import canonical, same_grid
from LiverSegExtension.io import MASK_MARK, atomic_write, format_of, output_stem, read_image
from LiverSegExtension.io.formats import DICOM_SEG, SEG_NRRD

COLUMNS = ["case", "dice", "nsd_2mm", "hd95_mm", "msd_mm", "pred_ml", "ref_ml", "volume_error_pct", "note", "error"]


def score(pred: sitk.Image, ref: sitk.Image, name: str) -> dict[str, Any]:
    """Metrics of one case. The prediction must cover the reference's voxels: the same grid, or the same
    voxel centres in another index order or extent (a Slicer ``.seg.nrrd``), compared in physical space."""
    pred = on_grid_of(pred, ref, name)
    p = sitk.GetArrayFromImage(pred) > 0
    r = sitk.GetArrayFromImage(ref) > 0
    row: dict[str, Any] = {"case": name, **case_metrics(p, r, ref.GetSpacing()[::-1]), "note": "", "error": ""}
    if not p.any() or not r.any():
        row["note"] = "empty prediction" if not p.any() else "empty reference"
        if not p.any() and not r.any():
            row["note"] = "both empty"
    return row


def on_grid_of(mask: sitk.Image, ref: sitk.Image, name: str) -> sitk.Image:
    """``mask`` on ``ref``'s grid, exactly: only when every voxel centre of one is a voxel centre of the other
    (same spacing and axes up to order and sign, origins a whole number of voxels apart); else an error."""
    if same_grid(mask, ref):
        return mask
    a, b = canonical(mask), canonical(ref)
    offset = np.array(b.TransformPhysicalPointToContinuousIndex(a.GetOrigin()))
    if (np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
            and np.allclose(offset, np.round(offset), atol=1e-3)):
        return sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    raise LiverSegError(f"{name}: prediction and reference are not on the same grid")


def _strip(stem: str) -> str:
    """A prediction's case name: segment writes ``<name>_liver.<format>``."""
    return stem[: -len(MASK_MARK)] if stem.endswith(MASK_MARK) else stem


def _named(folder: Path, predictions: bool) -> dict[str, Path]:
    """Masks under ``folder`` by case name: the path below it without the format (``a/ct`` for
    ``a/ct_liver.nii.gz``, as ``segment`` mirrors a cohort's folders); predictions also as DICOM SEG."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        kind = format_of(p)
        seg = predictions and kind is DICOM_SEG and output_stem(p.name) is not None
        if kind is None or not (kind.volume or kind is SEG_NRRD or seg) or not p.is_file() or p.name.startswith("."):
            continue
        stem = kind.stem(p.name)
        name = (p.parent.relative_to(folder) / (_strip(stem) if predictions else stem)).as_posix()
        if name in found:
            raise LiverSegError(f"{folder}: two {'predictions' if predictions else 'references'} for case {name} "
                                f"({found[name].name}, {p.name})")
        found[name] = p
    return found


def _read_prediction(path: Path, ref: sitk.Image) -> sitk.Image:
    if format_of(path) is DICOM_SEG:  # its frames placed on the reference's grid
        from LiverSegExtension.io.dicom_seg import read_dicom_seg

        return read_dicom_seg(path, ref)
    return read_image(path)


def evaluate_folders(pred_dir: Path, ref_dir: Path, cases: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(a row per reference that has a prediction, the names of the references without one).

    Files pair by case name: ``<name>.<ext>`` in ``ref_dir``, ``<name>[_liver].<ext>`` in ``pred_dir``, in
    every format ``segment`` writes (DICOM SEG included), in the same sub-folders. ``cases`` keeps only those
    names."""
    for d in (pred_dir, ref_dir):
        if not d.is_dir():
            raise LiverSegError(f"{d}: no such folder")
    preds, refs = _named(pred_dir, True), _named(ref_dir, False)
    if cases:
        unknown = sorted(set(cases) - set(refs))
        if unknown:
            raise LiverSegError(f"{ref_dir}: no reference for case(s) {', '.join(unknown)}")
        refs = {n: r for n, r in refs.items() if n in cases}
    if not refs:
        raise LiverSegError(f"{ref_dir}: no reference masks found")
    rows, missing = [], []
    for name, ref in refs.items():
        if name not in preds:
            missing.append(name)
            continue
        try:
            reference = read_image(ref)
            rows.append(score(_read_prediction(preds[name], reference), reference, name))
        except LiverSegError as exc:
            rows.append({"case": name, "error": str(exc)})
    return rows, missing


def evaluate_dataset(data: Path, model: Path | None, cases: list[str], device: str = "auto",
                     runtime: str = "auto") -> list[dict[str, Any]]:
    """Segment the dataset's cases with ``model`` and score them."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    segmenter = LiverSegmenter(model, device=device, runtime=runtime)
    all_cases = load_msd(data)
    unknown = sorted(set(cases) - {c.name for c in all_cases})
    if unknown:
        raise LiverSegError(f"{data}: no case named {', '.join(unknown)}")
    chosen = [c for c in all_cases if not cases or c.name in cases]
    rows = []
    for c in chosen:
        try:
            image = read_image(c.image)
            result = segmenter.segment_image(image, source=str(c.image))
            pred = sitk.GetImageFromArray(result.mask)
            pred.CopyInformation(image)
            row = score(pred, read_image(c.label), c.name)
            row["seconds"] = result.seconds
            rows.append(row)
        except LiverSegError as exc:
            rows.append({"case": c.name, "error": str(exc)})
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return "" if v is None else str(v)


def write_report(rows: list[dict[str, Any]], csv_path: Path | None) -> str:
    """Write the CSV (when a path is given) and a Markdown table beside it; return the Markdown."""
    cols = COLUMNS + (["seconds"] if any("seconds" in r for r in rows) else [])
    scored = [r for r in rows if not r.get("error")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    if scored:
        mean = {c: float(np.nanmean([r[c] for r in scored])) if any(not math.isnan(r[c]) for r in scored) else math.nan
                for c in ("dice", "nsd_2mm", "hd95_mm", "msd_mm", "volume_error_pct")}
        lines.append("| **mean** | " + " | ".join(_fmt(mean.get(c, "")) if c in mean else "" for c in cols[1:]) + " |")
    markdown = "\n".join(lines) + "\n"
    if csv_path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in cols})
        # A report is meant to be rewritten, but never left half-written.
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue()), overwrite=True)
        atomic_write(csv_path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown), overwrite=True)
    return markdown
