"""The summary every door writes: one row per case, its status, merged into summary.csv under a lock (never
replaced), and the shard summaries of a job array merged into one."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import InputCase, _modality
from LiverSegExtension.io.files import atomic_write, locked

# -- writing ---------------------------------------------------------------------------------------
#: ``input`` as the user gave it; ``input_path`` the input resolved (its key: any spelling of a file is one input);
#: ``model`` the name and version of the model that made the mask
SUMMARY_FIELDS = ["input", "output", "status", "liver_ml", "uncertainty", "seconds", "error", "warning", "runtime",
                  "input_path", "model"]


STATUSES = ("ok", "warning", "empty", "skipped", "failed")


def status_counts(rows: list[dict]) -> str:
    """``2 ok, 1 failed``: how a run's cases ended, for the last line of every door."""
    return ", ".join(f"{sum(r['status'] == k for r in rows)} {k}" for k in STATUSES if any(r["status"] == k for r in rows)) \
        or "none"


def result_status(liver_ml: float, warnings: list[str]) -> str:
    """The summary status of a segmented case, the same in every door: ``empty`` (no liver found),
    ``warning`` (a mask was made but may be wrong: too small, or the header misstates the anatomy) or ``ok``."""
    if liver_ml == 0:
        return "empty"
    return "warning" if warnings else "ok"


def case_warnings(case: InputCase, warnings: list[str]) -> list[str]:
    """The engine's warnings for a segmented case, and the doors' own: a DICOM series that says it is not
    CT (an MR series with CT-like values has passed the CT check, so it was segmented as CT)."""
    if not case.files:  # a NIfTI file whose two placements of the grid disagree: say which one was used
        from LiverSegExtension.io.formats.nifti import disagreement

        note = disagreement(case.source)
        return [*warnings, note] if note else list(warnings)
    modality = _modality(case.files[0])
    if modality and modality != "CT":
        return [*warnings, f"{case.label}: the series' Modality is {modality}, not CT, though its values look like "
                           "CT in HU; it was segmented as CT: check that this is the right series"]
    return list(warnings)


def summary_row(source: str, output: str) -> dict[str, str]:
    """A summary.csv row for one case before it runs: status ok, every other field empty."""
    return {**dict.fromkeys(SUMMARY_FIELDS, ""), "input": source, "output": output, "status": "ok"}


def summary_path(out_dir: Path, shard: tuple[int, int] = (1, 1)) -> Path:
    """``summary.csv``, or ``summary_shardIofN.csv`` for one of several shards (tasks never share a file)."""
    i, n = shard
    return Path(out_dir) / ("summary.csv" if n == 1 else f"summary_shard{i}of{n}.csv")


def shard_summaries(folder: Path) -> dict[tuple[int, int], Path]:
    """The shard summaries in ``folder`` by ``(I, N)``: the names :func:`summary_path` gives, read back."""
    found = {}
    for path in sorted(Path(folder).glob("summary_shard*of*.csv")):
        i, _, n = path.name[len("summary_shard"):-len(".csv")].partition("of")
        if i.isdigit() and n.isdigit() and summary_path(folder, (int(i), int(n))).name == path.name:
            found[(int(i), int(n))] = path
    return found


def row_key(row: dict) -> str:
    """What makes two rows one input's: its resolved path (rows of older summaries: the input as given)."""
    return row.get("input_path") or row["input"]


def write_summary(path: Path, rows: list[dict]) -> None:
    """Record this run's rows in ``summary.csv``, merged with what it already holds.

    Rows of earlier runs are kept: a row is replaced only by a newer row for the same input (the same
    ``input_path``, however the input was spelt), and a "skipped" row never replaces the row that recorded
    how the output was made. The file is read,
    merged and replaced under a lock, so concurrent runs into one folder lose no rows; the replacement
    is atomic, so an interrupted run still leaves a whole summary.
    """
    path = Path(path)
    with locked(path.parent, f".{path.name}.lock"):
        merged: dict[str, dict] = {}
        if path.exists():
            try:
                with open(path, newline="") as f:
                    for old in csv.DictReader(f):
                        if old.get("input"):
                            merged[row_key(old)] = {k: old.get(k) or "" for k in SUMMARY_FIELDS}
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise LiverSegError(f"{path}: unreadable summary ({exc}); move it away to start a new one") from None
        for row in rows:
            if row["status"] != "skipped" or row_key(row) not in merged:
                merged[row_key(row)] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()), overwrite=True)
        except OSError as exc:  # a full disk: the summary as it was stays whole
            raise LiverSegError(f"{path}: could not be written ({exc.strerror or exc}); it still holds the rows "
                                f"before this case ({', '.join(r['input'] for r in rows)})") from None


def merge_shard_summaries(folder: Path) -> tuple[int, list[str]]:
    """Merge ``folder/summary_shardIofN.csv`` into ``folder/summary.csv`` (with :func:`write_summary`'s rules);
    returns the number of rows read and the shards ``I/N`` with no summary."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LiverSegError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    shards = shard_summaries(folder)
    if not shards:
        raise LiverSegError(f"{folder}: no shard summaries (summary_shardIofN.csv) to merge")
    counts = {n for _, n in shards}
    if len(counts) > 1:
        raise LiverSegError(f"{folder}: shard summaries of different splits ({', '.join(f'of {n}' for n in sorted(counts))}): "
                            "merge the ones of one run")
    (n,) = counts
    rows = []
    for key in sorted(shards):
        try:
            with open(shards[key], newline="", encoding="utf-8") as f:
                rows += [{k: row.get(k) or "" for k in SUMMARY_FIELDS} for row in csv.DictReader(f) if row.get("input")]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LiverSegError(f"{shards[key]}: unreadable summary ({exc})") from None
    write_summary(folder / "summary.csv", rows)
    return len(rows), [f"{i}/{n}" for i in range(1, n + 1) if (i, n) not in shards]
