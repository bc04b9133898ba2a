"""The engine process's protocol, shared by the engine (``worker.py``) and the doors that start it (Slicer's
``LiverSegLib/engine.py``): JSON lines, one request per line on the engine's stdin, one message per line on
its stdout. Volumes travel as files. The requests' and messages' fields are built and read here only: the
engine reads requests as :class:`SegmentRequest`, :class:`TrainRequest`, :class:`ExportRequest` and builds its
messages with :func:`ready`, :func:`progress`, :func:`note`, :func:`error` and the outcomes' ``message``; the doors
build requests with the ``*_request`` functions and read messages with :class:`Ready`, :func:`read_progress`,
:func:`read_error` and the outcomes' ``read``.

Requests::

    {"cmd": "segment", "id": 1, "input": "ct.nrrd", "output": "mask.nrrd", "model": "", "device": "auto",
     "source": "CT name"}
    {"cmd": "train", "id": 2, "init": "model folder", "data": ["dataset folder"], "output": "new model folder",
     "device": "auto", "iterations": 200, "seed": 0, "version": "1.2.0"}
    {"cmd": "export", "id": 3, "dataset": "dataset folder", "image": "ct.nrrd", "label": "label.nrrd",
     "draft": "draft.nrrd (optional)", "provenance": {"model": "...", "annotator": "..."}}
    {"cmd": "quit"}

``segment`` may also name a ``runtime`` (``auto``, ``onnxruntime`` or ``torch``), and ask for ``attributes``: its
result then names
``draft_file`` and ``uncertain_file``, beside ``output``, holding the mask and the uncertain band as
``masktext`` strings.

Messages: ``{"event": "ready", "protocol": 2, "pid": N, "runtimes": {"onnxruntime": "1.x" or null, "torch":
"2.x" or null}, "devices": [...]}`` once the engine is imported (torch is not: it is imported only to look for
a GPU when a GPU build is installed, and to run on one), then per request ``progress`` (``fraction``,
``stage``), and one ``result`` (``liver_ml``, ``seconds``, ``warnings``, ``uncertainty``, ``model_name``, ``timings``,
``runtime``, ``device``) or ``error`` (``message``, ``user``: whether it is the user's to fix, ``details``). A
request that is not understood gets an ``error`` and the engine serves the next one.
A ``train`` request is a fine-tune (``finetune.fine_tune``): its ``progress`` also carries ``iteration``,
``total``, ``loss`` and, while the guard scores, ``model``, ``case`` and ``val_dice``; ``note`` messages
(``text``) say what the plan found; its ``result`` has ``model_dir``, ``accepted``, ``reason`` and ``rows``
(the parent-versus-new comparison). An ``export``'s ``result`` has ``case``, the name the case got.
The mask is written to ``output`` (uint8, on the input file's grid) before ``result`` is sent. Stdout carries
only these lines: whatever a library prints goes to stderr. The process ends at ``quit`` or when stdin closes
(its parent died), so it never outlives the door that started it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VERSION = 2  # "ready" says it; a door refuses an engine that speaks another

# events
READY, PROGRESS, NOTE, RESULT, ERROR = "ready", "progress", "note", "result", "error"
# commands, and the fields each needs
SEGMENT, TRAIN, EXPORT, QUIT = "segment", "train", "export", "quit"
REQUIRED = {SEGMENT: ("input", "output"), TRAIN: ("init", "data", "output"), EXPORT: ("dataset", "image", "label")}


class BadRequest(ValueError):
    """A line that is not a request the engine can serve: ``id`` is the request's, when it had a usable one."""

    def __init__(self, message: str, rid: Any = None) -> None:
        super().__init__(message)
        self.id = rid


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON: a request holding them is refused (they could not be echoed back)."""
    raise ValueError(f"{name} is not JSON")


def parse_request(line: str) -> dict[str, Any]:
    """One request line as a dict, or :class:`BadRequest` saying what is wrong with it."""
    try:
        request = json.loads(line, parse_constant=_no_constant)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise BadRequest(f"not a request (a JSON object per line): {line[:80]}")
    rid = request.get("id")
    if not isinstance(rid, (int, str, type(None))) or isinstance(rid, bool):
        raise BadRequest("a request's id must be a number or a string")
    command = request.get("cmd")
    missing = [k for k in REQUIRED.get(command, ()) if not request.get(k)]
    if missing:
        raise BadRequest(f"{command} request without {', '.join(missing)}", rid)
    if command not in (*REQUIRED, QUIT):
        raise BadRequest(f"unknown command {command!r}", rid)
    return request


def parse_message(line: bytes | str) -> dict[str, Any] | None:
    """One message from the engine, or None for a line that is not one (a library's stray output)."""
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def segment_request(rid: int, input_path: str, output: str, model: str = "", device: str = "auto",
                    source: str = "", attributes: bool = False, runtime: str = "auto") -> dict[str, Any]:
    return {"cmd": SEGMENT, "id": rid, "input": input_path, "output": output, "model": model, "device": device,
            "source": source, "attributes": attributes, "runtime": runtime}


def train_request(rid: int, init: str, data: list[str], output: str, device: str = "auto",
                  iterations: int | None = None, version: str | None = None) -> dict[str, Any]:
    return {"cmd": TRAIN, "id": rid, "init": init, "data": data, "output": output, "device": device,
            "iterations": iterations, "version": version}


def export_request(rid: int, dataset: str, files: dict[str, str], provenance: dict[str, Any]) -> dict[str, Any]:
    """``files``: ``image`` and ``label`` (and ``draft``), raw volumes the door wrote."""
    return {"cmd": EXPORT, "id": rid, "dataset": dataset, "provenance": provenance, "output": dataset, **files}


# -- requests, as the engine reads them ------------------------------------------------------------------------
@dataclass
class SegmentRequest:
    id: Any
    input: str
    output: str
    model: str = ""
    device: str = "auto"
    runtime: str = "auto"
    source: str = ""
    attributes: bool = False

    @classmethod
    def read(cls, request: dict[str, Any]) -> SegmentRequest:
        return cls(request.get("id"), str(request["input"]), str(request["output"]), str(request.get("model") or ""),
                   str(request.get("device") or "auto"), str(request.get("runtime") or "auto"),
                   str(request.get("source") or request["input"]), bool(request.get("attributes")))


@dataclass
class TrainRequest:
    id: Any
    init: str
    data: list[str]
    output: str
    device: str = "auto"
    iterations: int | None = None
    version: str | None = None

    @classmethod
    def read(cls, request: dict[str, Any]) -> TrainRequest:
        data = request["data"] if isinstance(request["data"], list) else [request["data"]]
        iterations = request.get("iterations")
        return cls(request.get("id"), str(request["init"]), [str(d) for d in data], str(request["output"]),
                   str(request.get("device") or "auto"), int(iterations) if iterations is not None else None,
                   request.get("version"))


@dataclass
class ExportRequest:
    id: Any
    dataset: str
    image: str
    label: str
    draft: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, request: dict[str, Any]) -> ExportRequest:
        provenance = request.get("provenance")
        return cls(request.get("id"), str(request["dataset"]), str(request["image"]), str(request["label"]),
                   str(request["draft"]) if request.get("draft") else None,
                   provenance if isinstance(provenance, dict) else {})


# -- messages, as the engine builds them ----------------------------------------------------------------------
def ready(pid: int, runtimes: dict[str, str | None], devices: list[str]) -> dict[str, Any]:
    return {"event": READY, "protocol": VERSION, "pid": pid, "runtimes": runtimes, "devices": devices}


def progress(rid: Any, fraction: float, stage: str, **info: Any) -> dict[str, Any]:
    return {"event": PROGRESS, "id": rid, "fraction": round(float(fraction), 3), "stage": stage, **info}


def note(rid: Any, text: str) -> dict[str, Any]:
    return {"event": NOTE, "id": rid, "text": text}


def error(rid: Any, message_text: str, user: bool, details: str = "") -> dict[str, Any]:
    return {"event": ERROR, "id": rid, "message": message_text, "user": user, **({"details": details} if details else {})}


@dataclass
class SegmentOutcome:
    """A segment request's ``result``: the figures of the mask written to the request's ``output``."""

    liver_ml: float
    seconds: float
    model_name: str
    warnings: list[str] = field(default_factory=list)
    uncertainty: float = 0.0
    runtime: str = ""
    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    draft_file: str | None = None  # the mask as masktext, with ``attributes``
    uncertain_file: str | None = None  # the uncertain band as masktext, with ``attributes``

    def message(self, rid: Any) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        return {"event": RESULT, "id": rid, **fields}

    @classmethod
    def read(cls, message_: dict[str, Any]) -> SegmentOutcome:
        return cls(float(message_["liver_ml"]), float(message_["seconds"]), str(message_.get("model_name", "")),
                   [str(w) for w in message_.get("warnings") or []], float(message_.get("uncertainty") or 0.0),
                   str(message_.get("runtime", "")), str(message_.get("device", "")), dict(message_.get("timings") or {}),
                   message_.get("draft_file"), message_.get("uncertain_file"))


@dataclass
class TrainOutcome:
    """A train request's ``result``: the new model's folder and the guard's verdict."""

    model_dir: str
    accepted: bool
    reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def message(self, rid: Any) -> dict[str, Any]:
        return {"event": RESULT, "id": rid, **self.__dict__}

    @classmethod
    def read(cls, message_: dict[str, Any]) -> TrainOutcome:
        return cls(str(message_["model_dir"]), bool(message_["accepted"]), str(message_.get("reason", "")),
                   list(message_.get("rows") or []))


def export_result(rid: Any, case: str) -> dict[str, Any]:
    return {"event": RESULT, "id": rid, "case": case}


def exported_case(message_: dict[str, Any]) -> str:
    """The name an ``export``'s ``result`` says the case got."""
    return str(message_["case"])


# -- messages, as the doors read them ---------------------------------------------------------------------------
def quit_request() -> dict[str, Any]:
    return {"cmd": QUIT}


def event_of(message_: dict[str, Any]) -> str:
    return str(message_.get("event", ""))


def id_of(message_: dict[str, Any]) -> Any:
    return message_.get("id")


@dataclass
class Ready:
    """The engine's ``ready``: the protocol it speaks, its own pid (behind a launcher), what it can run on."""

    protocol: Any
    pid: int | None
    devices: list[str]
    runtimes: dict[str, Any]

    @classmethod
    def read(cls, message_: dict[str, Any]) -> Ready:
        pid = message_.get("pid")
        pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
        return cls(message_.get("protocol"), pid, [str(d) for d in message_.get("devices") or []],
                   dict(message_.get("runtimes") or {}))


def read_progress(message_: dict[str, Any]) -> tuple[float, str]:
    """(fraction done, what is being done) of a ``progress`` message; the rest of it is the request's own."""
    return float(message_["fraction"]), str(message_["stage"])


def read_error(message_: dict[str, Any]) -> tuple[str, str]:
    """(the one-line message, the details: a traceback for an error the engine did not expect) of an ``error``."""
    return str(message_.get("message") or "the engine failed"), str(message_.get("details") or "")


def note_text(message_: dict[str, Any]) -> str:
    return str(message_.get("text", ""))
