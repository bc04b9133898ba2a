"""The review state of a batch output folder: ``review.csv`` beside ``summary.csv``, one row per case.

A row says what was decided (``accepted`` unchanged, ``exported`` corrected into a dataset, ``skipped`` with a
reason), by whom and when, how much the annotator changed the model's mask (``dice_changed``: Dice between the
model's mask and the exported one; 1 for an accepted case), and who holds the case now (``claimed_by`` until
``claim_until``). A claim keeps a case from every other annotator until it expires; an annotator's own claim is
given back to them first, so that coming back resumes where they stopped. A decision is recorded only by the
annotator who holds the case: one whose claim ran out and was taken by another is told so, and a decided case
keeps its decision unless it is opened again for a re-review, whose decision then replaces it (the earlier one
kept in ``previous``).

Every change is read, merged and written under a lock shared by all processes (Slicer instances on other
machines included, where the file system's locks reach), and the file is replaced atomically (again, for a
moment, where Windows refuses to replace a file another process is reading): two annotators on one folder
never get the same case at once and never lose each other's records.
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import io
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import atomic_write, locked

REVIEW_FILE = "review.csv"
LOCK_NAME = f".{REVIEW_FILE}.lock"
REVIEW_FIELDS = ["input", "name", "decision", "who", "when", "reason", "dice_changed", "liver_ml", "dataset",
                 "dataset_case", "model", "claimed_by", "claim_until", "previous"]
DECISIONS = ("accepted", "exported", "skipped")
CLAIM_MINUTES = 15.0  # a claim not renewed for this long (Slicer closed or crashed) frees the case for others
#: Windows refuses to replace (or open) a file while another process has it open, as a reader of review.csv does
#: for a moment: tried again this many times, 0.1 s apart
SHARING_TRIES = 50


def default_annotator() -> str:
    """``user@computer``: distinct annotators by default, the same one after a restart."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "annotator"
    return f"{user}@{socket.gethostname()}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _parse_time(text: str) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _decided(row: dict[str, str]) -> str:
    """``accepted by ann at 2026-05-04T09:00:00+00:00``: a decision as ``previous`` keeps it."""
    return f"{row.get('decision')} by {row.get('who') or '?'} at {row.get('when') or '?'}"


def _shared(step: Callable[[], Any]) -> Any:
    """``step()``, tried again while Windows refuses it because another process has the file open (a reader of
    review.csv holds it for milliseconds; ``os.replace`` and ``open`` then fail with PermissionError)."""
    for attempt in range(SHARING_TRIES):
        try:
            return step()
        except PermissionError:
            if attempt == SHARING_TRIES - 1:
                raise
            time.sleep(0.1)
    return None


class ReviewState:
    """``review.csv`` of one folder. ``clock`` gives the current UTC time (tests move it on)."""

    def __init__(self, folder: str | Path, claim_minutes: float = CLAIM_MINUTES,
                 clock: Callable[[], dt.datetime] = _now) -> None:
        self.folder = Path(folder)
        self.path = self.folder / REVIEW_FILE
        self.claim_minutes = claim_minutes
        self.clock = clock

    # -- reading ---------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, str]]:
        """Every case's row, by input (the file is replaced whole, so it can be read without the lock, which a
        read-only folder would refuse)."""
        return self._read()[0]

    def _read(self) -> tuple[dict[str, dict[str, str]], list[str]]:
        if not self.path.exists():
            return {}, list(REVIEW_FIELDS)
        try:
            text = _shared(lambda: self.path.read_bytes()).decode("utf-8")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            fields = list(reader.fieldnames or ())
            if "input" not in fields or "decision" not in fields:
                raise LiverSegError(f"{self.path}: not a LiverSeg review file (no input and decision columns); "
                                    "move it away to start the review afresh")
            rows = {row["input"]: {k: v or "" for k, v in row.items() if k is not None} for row in reader
                    if row.get("input")}
        except FileNotFoundError:
            return {}, list(REVIEW_FIELDS)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LiverSegError(f"{self.path}: unreadable ({exc}); move it away to start the review afresh") from None
        return rows, REVIEW_FIELDS + [f for f in fields if f not in REVIEW_FIELDS]  # columns of newer versions kept

    def claimed_by_other(self, record: dict[str, str] | None, who: str) -> bool:
        """Whether someone else holds a claim on the case that has not expired."""
        if not record or not record.get("claimed_by") or record["claimed_by"] == who:
            return False
        until = _parse_time(record.get("claim_until", ""))
        return until is not None and until > self.clock()

    # -- changing ----------------------------------------------------------------------------------------
    def _update(self, change: Callable[[dict[str, dict[str, str]]], Any]) -> Any:
        """Apply ``change`` to the rows under the lock, and write them back atomically if it changed any."""
        with locked(self.folder, LOCK_NAME):
            rows, fields = self._read()
            before = {k: dict(v) for k, v in rows.items()}
            result = change(rows)
            if rows != before:
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({**dict.fromkeys(fields, ""), **row} for row in rows.values())

                def write(tmp: str) -> None:
                    with open(tmp, "w", encoding="utf-8", newline="") as f:
                        f.write(buf.getvalue())
                        f.flush()
                        os.fsync(f.fileno())  # on disk before it replaces the file: a crash leaves old or new

                try:
                    _shared(lambda: atomic_write(self.path, write, overwrite=True))
                except OSError as exc:
                    raise LiverSegError(f"{self.path}: could not be written ({exc.strerror or exc}); the review "
                                        "state is as it was before this step") from None
            return result

    def _claim_row(self, rows: dict[str, dict[str, str]], key: str, who: str, name: str) -> None:
        row = rows.setdefault(key, {"input": key})
        until = self.clock() + dt.timedelta(minutes=self.claim_minutes)
        row.update(claimed_by=who, claim_until=_stamp(until))
        if name:
            row["name"] = name

    def claim_next(self, who: str, keys: Iterable[str], names: dict[str, str] | None = None) -> str | None:
        """The case ``who`` should review now, claimed: the one they already hold (resume), else the first of
        ``keys`` (in priority order) not decided and not claimed by another; None when none is left."""
        keys, names = list(keys), names or {}

        def pick(rows: dict[str, dict[str, str]]) -> str | None:
            own = [k for k in keys if rows.get(k, {}).get("claimed_by") == who and not rows[k].get("decision")]
            free = [k for k in keys if not rows.get(k, {}).get("decision") and not self.claimed_by_other(rows.get(k), who)]
            key = (own or free or [None])[0]
            if key is not None:
                self._claim_row(rows, key, who, names.get(key, ""))
            return key

        return self._update(pick)

    def claim(self, key: str, who: str, name: str = "", again: bool = False) -> None:
        """Claim one case (opened from the table); a LiverSegError when another annotator holds it, or when it
        was decided already, unless ``again`` (a re-review: its decision then replaces the earlier one)."""

        def take(rows: dict[str, dict[str, str]]) -> None:
            record = rows.get(key)
            if self.claimed_by_other(record, who):
                raise LiverSegError(f"{record.get('name') or key}: being reviewed by {record['claimed_by']} "
                                    f"(until {record['claim_until']}); pick another case")
            if record and record.get("decision") and not again:
                raise LiverSegError(f"{record.get('name') or key}: already {_decided(record)}; open it as a "
                                    "re-review to change that")
            self._claim_row(rows, key, who, name)

        self._update(take)

    def renew(self, key: str, who: str) -> bool:
        """Extend ``who``'s claim on the case (an open case stays theirs); False when they no longer hold it."""

        def extend(rows: dict[str, dict[str, str]]) -> bool:
            if rows.get(key, {}).get("claimed_by") != who:
                return False
            self._claim_row(rows, key, who, "")
            return True

        return self._update(extend)

    def release(self, key: str, who: str) -> None:
        """Give the case back undecided (its decision, if an earlier review made one, stays)."""

        def drop(rows: dict[str, dict[str, str]]) -> None:
            row = rows.get(key)
            if row is not None and row.get("claimed_by") == who:
                row.update(claimed_by="", claim_until="")
                if not row.get("decision"):
                    del rows[key]

        self._update(drop)

    def decide(self, key: str, who: str, decision: str, name: str = "", reason: str = "",
               dice_changed: float | None = None, again: bool = False, **details: Any) -> dict[str, str]:
        """Record a decision on a case ``who`` holds, and free it; ``details``: liver_ml, dataset, dataset_case,
        model. Refused (a LiverSegError, nothing written) when another annotator holds the case now, and, unless
        ``again`` (a re-review), when it was decided meanwhile: the earlier decision stays."""
        if decision not in DECISIONS:
            raise LiverSegError(f"unknown review decision {decision!r}: one of {', '.join(DECISIONS)}")
        if decision == "skipped" and not reason.strip():
            raise LiverSegError("a skipped case needs a reason (it tells the next annotator, and the model's makers, why)")
        unknown = set(details) - set(REVIEW_FIELDS) | (set(details) & {"previous", "claimed_by", "claim_until"})
        if unknown:
            raise LiverSegError(f"unknown review field(s): {', '.join(sorted(unknown))}")

        def record(rows: dict[str, dict[str, str]]) -> dict[str, str]:
            row = rows.get(key, {})
            shown = row.get("name") or name or key
            if row.get("decision") and not again:  # decided meanwhile (by another): that decision stays
                raise LiverSegError(f"{shown}: not recorded: already {_decided(row)}")
            if row.get("claimed_by") != who:  # the claim ran out and another took the case, or none was taken
                holder = row.get("claimed_by")
                raise LiverSegError(f"{shown}: not recorded: " + (
                    f"{holder} holds this case now (your claim on it ran out)" if holder else
                    "you do not hold this case (open it again to review it)"))
            if row.get("decision"):
                row["previous"] = "; ".join(p for p in (row.get("previous", ""), _decided(row)) if p)
            row.update({k: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
                        for k, v in details.items()})
            row.update(decision=decision, who=who, when=_stamp(self.clock()), reason=" ".join(reason.split()),
                       dice_changed="" if dice_changed is None else f"{dice_changed:.4f}", claimed_by="",
                       claim_until="")
            if name:
                row["name"] = name
            return dict(row)

        return self._update(record)
