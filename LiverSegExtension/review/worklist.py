"""The worklist of a batch output folder: one case per row of its ``summary.csv``, most in need of review first
(failed cases, then those with a warning or no liver, then by uncertainty, highest first).

Columns are read by name, and each case's files are taken from its own row: the mask from ``output`` (masks
may lie in sub-folders that mirror the inputs), the CT from a column holding the input's resolved location
when the summary has one, else from ``input``. A relative path is looked for where the run most likely
stood: for a mask, below the output folder; for a CT, from the current folder and the output folder's parent.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import OUTPUT_FORMATS, VOLUME_SUFFIXES, InputCase, dicom_series

SUMMARY = "summary.csv"
#: columns that may hold the input's resolved location (used when they name something that exists)
INPUT_PATH_COLUMNS = ("input_path", "resolved_input", "input_resolved", "resolved_path", "input_realpath", "source_path")
SERIES_LABEL = re.compile(r"^(?P<path>.*) \(series (?P<uid>[0-9.]+)\)$")  # InputCase.label of one series of several
PROBABILITY_SUFFIXES = (".nii.gz", ".nrrd")  # what --probabilities writes beside a mask


@dataclass
class ReviewCase:
    """One row of the summary, as the review sees it."""

    key: str  # what review.csv records the case under: the row's key in the summary (input_path, else input)
    name: str  # for the table: the mask's place in the output folder, without ``_liver.<format>``
    status: str
    liver_ml: float | None
    uncertainty: float | None
    warning: str
    error: str
    mask: Path | None  # the model's mask (None: the case failed, or gave no mask file)
    row: dict[str, str] = field(default_factory=dict)  # the whole summary row, for the export's provenance

    @property
    def priority(self) -> tuple[int, float, str]:
        """Sort key: failed first, then warned (or no liver), then the rest; each by uncertainty, highest first."""
        rank = 0 if self.status == "failed" else 1 if (self.status in ("warning", "empty") or self.warning) else 2
        return rank, -(self.uncertainty if self.uncertainty is not None else -1.0), self.name

    @property
    def probability(self) -> Path | None:
        """The liver probability map written beside the mask (``--probabilities``), if it is there."""
        if self.mask is None:
            return None
        stem = _strip_mask_suffix(self.mask.name)
        for suffix in PROBABILITY_SUFFIXES:
            candidate = self.mask.with_name(f"{stem}_liver_prob{suffix}")
            if candidate.is_file():
                return candidate
        return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _strip_mask_suffix(name: str) -> str:
    for suffix in sorted(OUTPUT_FORMATS.values(), key=len, reverse=True):
        if name.lower().endswith(f"_liver{suffix}"):
            return name[: -len(f"_liver{suffix}")]
    return name


def read_summary(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/summary.csv``; a LiverSegError names the file and what is wrong."""
    folder = Path(folder)
    path = folder / SUMMARY
    if not path.is_file():
        shards = sorted(folder.glob("summary_shard*of*.csv")) if folder.is_dir() else []
        hint = " (shard summaries are there: run `liverseg summary merge` first)" if shards else ""
        raise LiverSegError(f"{folder}: no {SUMMARY}: not a LiverSeg batch output folder{hint}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"input", "status", "output"} - set(reader.fieldnames or ())
            if missing:
                raise LiverSegError(f"{path}: not a LiverSeg summary (no column {', '.join(sorted(missing))})")
            return [{k: v or "" for k, v in row.items() if k is not None} for row in reader if row.get("input")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LiverSegError(f"{path}: unreadable summary ({exc})") from None


def resolve_mask(text: str, folder: Path) -> Path | None:
    """Where the row's ``output`` is: as written when absolute and there; else the longest tail of it that
    exists below the output folder (``out/a/ct_liver.nii.gz`` from another folder is ``OUT/a/ct_liver.nii.gz``).
    An output that is nowhere is returned as written (below the folder when relative): loading it says so."""
    if not text:
        return None
    path = Path(text)
    if path.is_absolute() and path.exists():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for start in range(len(parts)):
        candidate = Path(folder, *parts[start:])
        if candidate.exists():
            return candidate
    return path if path.is_absolute() else Path(folder, *parts[-1:])


def read_worklist(folder: str | Path) -> list[ReviewCase]:
    """The folder's cases, most in need of review first."""
    folder = Path(folder)
    cases = []
    for row in read_summary(folder):
        mask = resolve_mask(row.get("output", ""), folder)
        if mask is not None:
            try:
                shown = mask.relative_to(folder).as_posix()
            except ValueError:
                shown = mask.name
            name = _strip_mask_suffix(shown)
        else:
            name = _input_stem(row["input"])
        cases.append(ReviewCase(key=row.get("input_path") or row["input"], name=name, status=row.get("status", ""),
                                liver_ml=_number(row.get("liver_ml")), uncertainty=_number(row.get("uncertainty")),
                                warning=row.get("warning", ""), error=row.get("error", ""), mask=mask, row=row))
    return sorted(cases, key=lambda c: c.priority)


def _input_stem(label: str) -> str:
    """A case without a mask is named by its input: its file and folder (patients' files often share names)."""
    match = SERIES_LABEL.match(label)
    name = "/".join(Path(match["path"] if match else label).parts[-2:])
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return f"{name}_{match['uid'].split('.')[-1]}" if match else name


def _input_text(row: dict[str, str]) -> str:
    """The input's location: a resolved-location column where the summary has one that exists, else ``input``."""
    columns = [c for c in INPUT_PATH_COLUMNS if c in row]
    columns += [c for c in row if c not in columns and ("resolved" in c or "realpath" in c)]
    for column in columns:
        value = row.get(column, "")
        match = SERIES_LABEL.match(value)
        if value and Path(match["path"] if match else value).exists():
            return value
    return row["input"]


def ct_input(case: ReviewCase, folder: str | Path) -> InputCase:
    """The case's CT as the batch found it: a volume file, or one DICOM series (by its UID where the folder
    holds several). A LiverSegError says where it was looked for when it is not there."""
    folder = Path(folder)
    text = _input_text(case.row)
    match = SERIES_LABEL.match(text)
    path_text, uid = (match["path"], match["uid"]) if match else (text, None)
    uid = case.row.get("series_uid") or uid
    path = Path(path_text)
    bases = [Path()] if path.is_absolute() else [Path.cwd(), folder.parent, folder]
    found = next((base / path for base in bases if (base / path).exists()), None)
    if found is None:
        where = "" if path.is_absolute() else f" (looked from {', '.join(map(str, bases))})"
        raise LiverSegError(f"{path_text}: the CT of this case is not there{where}")
    if not found.is_dir():
        return InputCase(found)
    series = [c for c in dicom_series(found) if os.path.samefile(c.source, found)]
    chosen = [c for c in series if c.series_uid == uid] if uid else series
    if uid and not chosen and len(series) == 1:  # the folder's only series is named without its UID
        import SimpleITK as sitk

        chosen = series if uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(found)) else []
    if len(chosen) != 1:
        what = f"no DICOM series {uid}" if uid else f"{len(chosen)} DICOM series, not one"
        raise LiverSegError(f"{found}: {what} in this folder")
    return chosen[0]
