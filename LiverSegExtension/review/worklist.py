"""The worklist of a batch output folder: one case per row of its ``summary.csv``, most in need of review first
(failed cases, then those with a warning or no liver, then by uncertainty, highest first).

Columns are read by name, and each case's files are taken from its own row: the mask from ``output`` (masks
may lie in sub-folders that mirror the inputs), the CT from a column holding the input's resolved location
when the summary has one, else from ``input``. A relative path is looked for where the run may have stood:
for a mask, below the output folder (each tail of the path as written); for a CT, from the output folder, its
parent, then the current folder. Before a case is shown, :func:`case_files` checks them: the batch's record
beside the mask (``<name>_liver.json``) must name this CT's content, and where no record says, the place must
leave no doubt; a case that more than one file (or none) fits is refused in one line.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import PROBABILITY_MARK, PROBABILITY_SUFFIXES, InputCase, dicom_series, output_stem, volume_stem
from LiverSegExtension.io.records import identity, read_record, same_input
from LiverSegExtension.io.summary import shard_summaries

SUMMARY = "summary.csv"
SERIES_LABEL = re.compile(r"^(?P<path>.*) \(series (?P<uid>[0-9.]+)\)$")  # InputCase.label of one series of several


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


def probability_beside(mask: Path | None) -> Path | None:
    """The liver probability map written beside a mask (``--probabilities``), if it is there."""
    if mask is None:
        return None
    stem = _strip_mask_suffix(mask.name)
    for suffix in PROBABILITY_SUFFIXES:
        candidate = mask.with_name(f"{stem}{PROBABILITY_MARK}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _strip_mask_suffix(name: str) -> str:
    """``a/ct`` for the mask ``a/ct_liver.<format>``; another name as it is."""
    stem = output_stem(name)
    return name if stem is None else stem


def read_summary(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/summary.csv``; a LiverSegError names the file and what is wrong."""
    folder = Path(folder)
    path = folder / SUMMARY
    if not path.is_file():
        shards = shard_summaries(folder) if folder.is_dir() else {}
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


def _distinct(paths) -> list[Path]:
    """The paths that exist, each file once (one reached through two spellings is one file)."""
    found: list[Path] = []
    for path in paths:
        if path.exists() and not any(os.path.samefile(path, other) for other in found):
            found.append(path)
    return found


def mask_candidates(text: str, folder: Path) -> list[Path]:
    """Every file the row's ``output`` may be: as written, when absolute and there; else each tail of it below the
    output folder that exists, longest first (``out/a/ct_liver.nii.gz`` from another folder is
    ``OUT/a/ct_liver.nii.gz``; ``OUT/ct_liver.nii.gz`` may be another patient's, which the record tells)."""
    if not text:
        return []
    path = Path(text)
    if path.is_absolute() and path.exists():
        return [path]
    parts = path.parts[1:] if path.is_absolute() else path.parts
    return _distinct(Path(folder, *parts[start:]) for start in range(len(parts)))


def resolve_mask(text: str, folder: Path) -> Path | None:
    """Where the row's ``output`` most likely is (its longest tail that exists: what the table names the case by;
    :func:`case_files` checks it before it is shown). An output that is nowhere is returned as written (below
    the folder when relative): loading it says so."""
    if not text:
        return None
    found = mask_candidates(text, folder)
    if found:
        return found[0]
    path = Path(text)
    return path if path.is_absolute() else Path(folder, *path.parts[-1:])


def record_of(mask: Path) -> Path:
    """The batch's record of what a mask was made from: ``<name>_liver.json`` beside ``<name>_liver.<format>``."""
    return mask.with_name(f"{_strip_mask_suffix(mask.name)}_liver.json")


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
    path = Path(match["path"] if match else label)
    name = "/".join([*path.parent.parts[-1:], volume_stem(path)])
    return f"{name}_{match['uid'].split('.')[-1]}" if match else name


def _input_text(row: dict[str, str]) -> str:
    """The input's location: the summary's ``input_path`` (the input resolved) where it exists, else ``input``."""
    value = row.get("input_path", "")
    match = SERIES_LABEL.match(value)
    if value and Path(match["path"] if match else value).exists():
        return value
    return row["input"]


def _series_of(found: Path, uid: str | None) -> InputCase:
    """The input at ``found``: the file, or the folder's one DICOM series (the one of ``uid`` among several)."""
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


def ct_candidates(case: ReviewCase, folder: str | Path) -> list[Path]:
    """Every place the case's CT may be (a relative input from the output folder, its parent, then the current
    folder); a LiverSegError says where it was looked for when it is nowhere."""
    folder = Path(folder)
    text = _input_text(case.row)
    match = SERIES_LABEL.match(text)
    path = Path(match["path"] if match else text)
    bases = [Path()] if path.is_absolute() else [folder, folder.parent, Path.cwd()]
    found = _distinct(base / path for base in bases)
    if not found:
        where = "" if path.is_absolute() else f" (looked from {', '.join(map(str, dict.fromkeys(bases)))})"
        raise LiverSegError(f"{path}: the CT of this case is not there{where}")
    return found


def _series_uid(case: ReviewCase) -> str | None:
    match = SERIES_LABEL.match(_input_text(case.row))
    return case.row.get("series_uid") or (match["uid"] if match else None)


def ct_input(case: ReviewCase, folder: str | Path) -> InputCase:
    """The case's CT as the batch found it: a volume file, or one DICOM series (by its UID where the folder
    holds several). A LiverSegError says where it was looked for when it is not there, and which files it
    could be when it could be more than one."""
    return case_files(case, folder, need_mask=False)[0]


def case_files(case: ReviewCase, folder: str | Path, need_mask: bool = True) -> tuple[InputCase, Path | None]:
    """(the case's CT, its mask or None), checked to be this row's before they are shown: the batch's record
    beside a mask must name the CT's content (another input's record: refused); without a record the place alone
    decides, and only where one file fits. More than one fitting, or none: a LiverSegError naming them."""
    folder = Path(folder)
    uid = _series_uid(case)
    places = ct_candidates(case, folder)
    text = case.row.get("output", "")
    masks = mask_candidates(text, folder)
    if need_mask and text and not masks:
        raise LiverSegError(f"{text}: the mask summary.csv records for {case.name} is not there (looked below {folder})")
    records = {mask: read_record(record_of(mask)) for mask in masks}
    if any(record is not None for record in records.values()):
        cts = [_series_of(place, uid) for place in places]
        idents = [identity(ct) for ct in cts]
        fits = [(ct, mask) for mask, record in records.items() if record is not None
                for ct, ident in zip(cts, idents) if same_input(record, ident)]
        fitting = _distinct(dict.fromkeys(mask for _, mask in fits))
        if not fitting:
            named = next(r for r in records.values() if r is not None)["identity"]
            raise LiverSegError(f"{case.name}: the record beside its mask ({record_of(next(iter(records)))}) names "
                                f"another input ({named.get('key') or named.get('input')}), not this CT "
                                f"({cts[0].label}): it is not shown, being another patient's")
        if len(fitting) > 1:
            raise LiverSegError(f"{case.name}: more than one mask fits this row: {', '.join(map(str, fitting))}")
        return next(ct for ct, mask in fits if mask == fitting[0]), fitting[0]
    if len(places) > 1:  # the same content in two places is still two candidates: which one the run read is unknown
        raise LiverSegError(f"{case.name}: the CT could be any of {', '.join(map(str, places))}; give the "
                            "summary's input as an absolute path (input_path)")
    if len(masks) > 1:
        raise LiverSegError(f"{case.name}: its mask could be any of {', '.join(map(str, masks))}, and no record "
                            "beside them says which")
    return _series_of(places[0], uid), (masks[0] if masks else None)
