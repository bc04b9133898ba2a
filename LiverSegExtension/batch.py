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
from LiverSegExtension.errors import LiverSegError, OutputExistsError

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


def summary_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    """``summary.csv``, or ``summary_shardIofN.csv`` for one of several shards (tasks never share a file)."""
    i, n = shard
    return Path(out_dir) / ("summary.csv" if n == 1 else f"summary_shard{i}of{n}.csv")


def run_batch(inputs: Sequence[str | Path], out_dir: Path, door: Door, shard: tuple[int, int] = (1, 1),
              overwrite: bool = False, skip_existing: bool = False,
              notes: list[str] | None = None) -> tuple[int, list[dict], Path]:
    """Segment every case of ``inputs`` into ``out_dir``: (exit code, rows, summary path).

    An existing output is decided on before any work: complete ones are kept (``skipped``, with a note unless
    ``skip_existing``), an incomplete or unreadable one fails its case, ``overwrite`` replaces them. One case's
    failure is its row's, never the batch's: the others still run; the exit code is 1 if any case failed.
    Each row is merged into the summary as soon as its case ends. ``notes`` gets what the search found (a
    case given twice).
    """
    out_dir = Path(out_dir)
    io.clean_stale_temporaries(out_dir)  # what a killed run left
    cases = io.expand_inputs(list(inputs), out_dir, notes)
    if shard[1] > 1:
        cases = io.shard(cases, *shard)
    summary = summary_path(out_dir, shard)
    names = io.output_names(cases)
    planned = [(case, door.wanted(case, name)) for case, name in zip(cases, names)]
    door.prepare(planned)
    rows: list[dict] = []
    for index, ((case, wanted), name) in enumerate(zip(planned, names), 1):
        row = io.summary_row(case.label, str(wanted[0]))
        start = time.perf_counter()
        written: list[Path] = []
        note = ""
        try:
            existing = [] if overwrite else [w for w in wanted if w.exists()]
            for path in existing:
                if not io.complete_output(path):
                    raise LiverSegError(f"{path}: exists but is incomplete or unreadable; --overwrite replaces it")
            if existing and not skip_existing:
                note = f"{', '.join(map(str, existing))}: exists, kept (--overwrite replaces it)"
            if len(existing) == len(wanted):
                row["status"] = "skipped"
            else:
                note = "; ".join(n for n in (note, door.segment(case, name, existing, row, written)) if n)
        except OutputExistsError as exc:  # a concurrent run wrote it meanwhile: done if complete
            if all(io.complete_output(w) for w in wanted if w.exists()):
                row.update(status="skipped", liver_ml="", warning="")
                note = "written meanwhile by another run, kept"
            else:
                row.update(status="failed", output="", error=str(exc))
        except LiverSegError as exc:
            LOG.debug("%s failed", case.label, exc_info=True)  # the traceback, with --debug
            row.update(status="failed", output="", error=str(exc))
        except Exception as exc:  # one bad case must not stop the others
            LOG.debug("%s failed", case.label, exc_info=True)
            row.update(status="failed", output="", error=f"{case.label}: unexpected error: {exc}")
        if row["status"] == "failed":  # a failed case leaves no output of its own behind
            for path in written:
                path.unlink(missing_ok=True)
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
        out_dir.mkdir(parents=True, exist_ok=True)
        io.write_summary(summary, [row])
        door.report(index, len(planned), case, row, note)
    return (1 if any(r["status"] == "failed" for r in rows) else 0), rows, summary
