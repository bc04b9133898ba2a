"""One batch runner for every door (the CLI's ``segment``, Slicer's batch script): inputs, shards, names,
existing outputs, summary rows, statuses and the exit code are decided here, once. A door supplies only
how a case is segmented and written, and how a finished case is reported (:class:`Door`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from LiverSegExtension import io
from LiverSegExtension.errors import LiverSegError, UsageError
from LiverSegExtension.io import records

LOG = logging.getLogger("liverseg")


class Door(Protocol):
    """What a door supplies to :func:`run_batch`."""

    def wanted(self, case: io.InputCase, name: str) -> list[Path]:
        """The outputs a case should have; the first is the summary's ``output``."""

    def prepare(self, planned: list[tuple[io.InputCase, list[Path]]]) -> None:
        """Before any case: load what the cases need (a model), or raise what makes the whole run wrong."""

    def segment(self, case: io.InputCase, name: str, existing: list[Path], row: dict, written: list[Path]) -> str:
        """Segment the case and write its missing outputs (each added to ``written`` once it exists); fill
        ``row`` (liver_ml, uncertainty, warning, status, runtime). Returns a note for the report, or ""."""

    def report(self, index: int, total: int, case: io.InputCase, row: dict, note: str) -> None:
        """Tell the user how a case ended."""


def check_options(out_dir: Path, overwrite: bool, skip_existing: bool, shard: str | None) -> tuple[int, int]:
    """The options every batch door shares, checked before any work: the output folder (a folder that can be
    written, not a mask file's name), ``--overwrite`` against ``--skip-existing``, ``--shard I/N``. Returns the
    shard; a UsageError says what is wrong."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    if not out_dir.exists() and io.format_of(out_dir) is not None:
        # `-o liver.nii.gz` would make a folder of that name: say what -o is instead.
        raise UsageError(f"{out_dir}: --output-dir names a folder, not a mask file; each mask is written "
                         f"into it as <input name>_liver.<format>")
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other; give one")
    try:
        io.check_writable_folder(out_dir)
        return io.parse_shard(shard)
    except (LiverSegError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run_batch(inputs: Sequence[str | Path], out_dir: Path, door: Door, shard: tuple[int, int] = (1, 1),
              overwrite: bool = False, skip_existing: bool = False,
              notes: list[str] | None = None) -> tuple[int, list[dict], Path]:
    """Segment every case of ``inputs`` into ``out_dir``: (exit code, rows, summary path).

    Names come from the whole input list before it is split into shards, so every shard and every run gives
    a case the same name (:func:`io.output_names`). An existing output is decided on before any work, and
    only for its own input (its record, :mod:`LiverSegExtension.io.records`, names the input's content):
    complete ones are kept (``skipped``, with a note unless ``skip_existing``), an incomplete or unreadable
    one fails its case, ``overwrite`` replaces them; another input's outputs fail the case, even with
    ``overwrite``. One case's failure is its row's, never the batch's: the others still run; the exit code
    is 1 if any case failed. Each row is merged into the summary as soon as its case ends. ``notes`` gets
    what the search found (a case given twice).
    """
    out_dir = Path(out_dir)
    cases = io.expand_inputs(list(inputs), out_dir, notes)
    named = dict(zip((id(c) for c in cases), io.output_names(cases)))
    if shard[1] > 1:
        cases = io.shard(cases, *shard)
    names = [named[id(c)] for c in cases]
    for folder in {out_dir, *(io.mask_path(out_dir, name, "nii.gz").parent for name in names)}:
        io.clean_stale_temporaries(folder)  # what a killed run left
    summary = io.summary_path(out_dir, shard)
    planned = [(case, door.wanted(case, name)) for case, name in zip(cases, names)]
    door.prepare(planned)
    rows: list[dict] = []
    for index, ((case, wanted), name) in enumerate(zip(planned, names), 1):
        row = io.summary_row(case.label, str(wanted[0]))
        row["input_path"] = records.input_key(case)
        start = time.perf_counter()
        written: list[Path] = []
        try:
            ident = records.identity(case, key=row["input_path"])
            note = _run_case(case, name, wanted, out_dir, door, row, written, overwrite, skip_existing, ident)
        except LiverSegError as exc:
            LOG.debug("%s failed", case.label, exc_info=True)  # the traceback, with --debug
            row.update(status="failed", output="", error=str(exc))
            note = ""
        except Exception as exc:  # one bad case must not stop the others
            LOG.debug("%s failed", case.label, exc_info=True)
            row.update(status="failed", output="", error=f"{case.label}: unexpected error: {exc}")
            note = ""
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
        out_dir.mkdir(parents=True, exist_ok=True)
        io.write_summary(summary, [row])
        door.report(index, len(planned), case, row, note)
    return (1 if any(r["status"] == "failed" for r in rows) else 0), rows, summary


def _run_case(case: io.InputCase, name: str, wanted: list[Path], out_dir: Path, door: Door, row: dict,
              written: list[Path], overwrite: bool, skip_existing: bool, ident: dict[str, str]) -> str:
    """One case: its outputs kept, written or replaced together, for this input only. Returns the note."""
    record_path = records.record_path(out_dir, name)
    record = records.read_record(record_path)
    if reason := records.foreign(record, ident, wanted, overwrite):
        raise LiverSegError(reason)
    existing = [] if overwrite else [w for w in wanted if w.exists()]
    if existing and record is None:
        raise LiverSegError(f"{existing[0]}: exists, but no record ({record_path.name}) says which input it was made "
                            f"from, so it is not taken for {case.label}'s; --overwrite replaces it")
    for path in existing:
        if not io.complete_output(path):
            raise LiverSegError(f"{path}: exists but is incomplete or unreadable; --overwrite replaces it")
    note = "" if not existing or skip_existing else f"{', '.join(map(str, existing))}: exists, kept (--overwrite replaces it)"
    if existing and len(existing) == len(wanted):
        row.update({k: v for k, v in (record or {}).get("row", {}).items() if k in records.ROW_FIELDS and k != "status"})
        row["status"] = "skipped"
        return note
    taken, found = records.claim(record_path, ident, wanted, overwrite)
    if not taken:
        if reason := records.foreign(found, ident, wanted, overwrite):
            raise LiverSegError(reason)
        row.update(status="skipped", liver_ml="", warning="")
        return "being written meanwhile by another run of the same input; left to it"
    try:
        note = "; ".join(n for n in (note, door.segment(case, name, existing, row, written)) if n)
    except BaseException:  # Ctrl-C too
        _undo(record_path, found, written)
        raise
    outputs = [w for w in wanted if w.exists() and (w in written or w in existing)]
    for stale in records.recorded_outputs(record_path, found):  # an earlier run's output this run does not make
        if stale not in wanted:
            stale.unlink(missing_ok=True)
    records.complete(record_path, ident, outputs, row)
    return note


def _undo(record_path: Path, found: dict | None, written: list[Path]) -> None:
    """A failed case leaves no output of its own behind, and its record as it was before."""
    for path in written:
        path.unlink(missing_ok=True)
    if found is None:
        record_path.unlink(missing_ok=True)
    else:
        records.write_record(record_path, found)
