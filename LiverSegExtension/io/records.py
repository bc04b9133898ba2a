"""What each case's outputs were made from: a small record beside them (``<name>_liver.json``) holding the
input's identity (its resolved path and a fingerprint of its content), the outputs written and the summary
row. An existing output is reused only when its record names the same input; a run never writes over, or
records as its own, the output of another input.

The record is also the claim: it is written (state ``writing``, with the writer's host and pid) before any
output, under a lock, so two runs that would give two inputs one name cannot both write it, and is
completed (state ``done``) once every output of the case is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import InputCase, display_path
from LiverSegExtension.io.files import _HOST, atomic_write, locked

#: bytes read from each end of an input file for its fingerprint: enough to hold any header (so two patients'
#: scans differ), cheap on a multi-GB file
_SAMPLE = 1 << 20

#: the summary fields a record keeps, so that a later run that skips the case still reports them
ROW_FIELDS = ("status", "liver_ml", "uncertainty", "warning", "runtime", "model")


def record_path(out_dir: Path, name: str) -> Path:
    """``OUT/<name>_liver.json``: one record for every output format of a case."""
    return Path(out_dir) / f"{name}_liver.json"


def input_key(case: InputCase) -> str:
    """The input as one key, whatever its spelling (relative, absolute, through links): its resolved path,
    with the series UID where a folder holds several series."""
    path = display_path(os.path.realpath(case.source))
    return f"{path} (series {case.series_uid})" if case.series_uid else path


def _sample(path: str, digest: hashlib._Hash) -> None:  # type: ignore[name-defined]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(f"{size}:".encode())
        digest.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(-_SAMPLE, os.SEEK_END)
            digest.update(f.read(_SAMPLE))


def fingerprint(case: InputCase) -> str:
    """A digest of the input's content: size and both ends of a file; for a DICOM series, its UID, the
    slices' names and sizes and the first slice's header (which names the patient)."""
    digest = hashlib.sha256()
    try:
        if case.files:
            digest.update((case.series_uid or "").encode())
            for file in case.files:
                digest.update(f"{os.path.basename(file)}:{os.path.getsize(file)};".encode())
            _sample(case.files[0], digest)
        else:
            _sample(str(case.source), digest)
    except OSError:  # missing, a folder with nothing to read...: the reader says why, in its words
        from LiverSegExtension.io.read import read_case

        read_case(case)
        raise LiverSegError(f"{case.label}: cannot be read") from None
    return digest.hexdigest()[:32]


def identity(case: InputCase, key: str | None = None) -> dict[str, str]:
    """What a record says of its input: how it was given, its key (:func:`input_key`, when the caller has it
    already) and its content's fingerprint."""
    return {"input": case.label, "key": key or input_key(case), "fingerprint": fingerprint(case)}


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None when there is none. An unreadable one is an error: it may belong to
    another input, so its outputs are not touched."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LiverSegError(f"{path}: unreadable record of what these outputs were made from ({exc}); "
                            "move it and the outputs beside it away") from None
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise LiverSegError(f"{path}: not a LiverSeg record of what these outputs were made from; move it away")
    return record


def same_input(record: dict, ident: dict[str, str]) -> bool:
    """Whether ``record`` was made from this input: the same content (a moved or renamed folder is the same
    scan; a replaced file at the same path is not)."""
    return record["identity"].get("fingerprint") == ident["fingerprint"]


def _writer_gone(record: dict) -> bool:
    """A claim whose writer died (killed on this host): it no longer holds the name."""
    writer = str(record.get("writer", ""))
    host, _, pid = writer.rpartition("-")
    if record.get("state") != "writing" or host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def foreign(record: dict | None, ident: dict[str, str], outputs: list[Path], overwrite: bool = False) -> str:
    """Why this input may not use outputs recorded for another one (""; they are its own, or free). A claim
    left by a killed writer with none of its outputs written frees the name; a file changed since its outputs
    were made is still the same input to ``overwrite``."""
    if record is None or same_input(record, ident):
        return ""
    if overwrite and record["identity"].get("key") == ident["key"]:
        return ""
    if _writer_gone(record) and not any(p.exists() for p in outputs):
        return ""
    other = record["identity"].get("key") or record["identity"].get("input", "another input")
    if record["identity"].get("key") == ident["key"]:
        return (f"{ident['input']}: changed since its outputs ({outputs[0].name}...) were made; "
                "--overwrite replaces them")
    return (f"{ident['input']}: {outputs[0]} is the output of another input, {other}; not overwritten. Segment "
            "the two in one run (their names then differ) or into separate output folders")


def write_record(path: Path, record: dict) -> None:
    """Replace the record at ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8"),
                 overwrite=True)


def claim(path: Path, ident: dict[str, str], outputs: list[Path], overwrite: bool = False) -> tuple[bool, dict | None]:
    """Take the name for this input before writing its outputs: ``(taken, record found)``. Not taken when
    another input's record holds it (:func:`foreign` says why) or a live run is writing this same input."""
    path = Path(path)
    with locked(path.parent, f".{path.name}.lock"):
        record = read_record(path)
        if foreign(record, ident, outputs, overwrite):
            return False, record
        if record is not None and record.get("state") == "writing" and not _writer_gone(record) \
                and record.get("writer") != f"{_HOST}-{os.getpid()}":
            return False, record
        write_record(path, {"identity": ident, "state": "writing", "writer": f"{_HOST}-{os.getpid()}",
                      "outputs": (record or {}).get("outputs", []), "row": (record or {}).get("row", {})})
        return True, record


def complete(path: Path, ident: dict[str, str], outputs: list[Path], row: dict) -> None:
    """Record the case as done: its outputs (names relative to the record) and its summary fields."""
    path = Path(path)
    names = [os.path.relpath(p, path.parent) for p in outputs]
    write_record(path, {"identity": ident, "state": "done", "outputs": names, "row": {k: row.get(k, "") for k in ROW_FIELDS}})


def recorded_outputs(path: Path, record: dict | None) -> list[Path]:
    """The outputs a record lists, as paths."""
    return [Path(path).parent / name for name in (record or {}).get("outputs", []) if isinstance(name, str)]
