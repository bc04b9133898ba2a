"""The engine process's protocol, shared by the engine (``worker.py``) and the doors that start it (Slicer's
``LiverSegLib/engine.py``): JSON lines, one request per line on the engine's stdin, one message per line on
its stdout. Volumes travel as files. The requests' and messages' fields are built and read here only.

Requests::

    {"cmd": "segment", "id": 1, "input": "ct.nrrd", "output": "mask.nrrd", "model": "", "device": "auto",
     "source": "CT name"}
    {"cmd": "train", "id": 2, "init": "model folder", "data": ["dataset folder"], "output": "new model folder",
     "device": "auto", "iterations": 200, "seed": 0, "version": "1.1.0"}
    {"cmd": "export", "id": 3, "dataset": "dataset folder", "image": "ct.nrrd", "label": "label.nrrd",
     "draft": "draft.nrrd (optional)", "provenance": {"model": "...", "annotator": "..."}}
    {"cmd": "quit"}

``segment`` may also name a ``probability_output`` (the liver probability x 255, uint8, on the input grid), a
``runtime`` (``auto``, ``onnxruntime`` or ``torch``), and ask for ``attributes``: its result then names
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


def message(event: str, **fields: Any) -> str:
    """One message line (without its newline)."""
    return json.dumps({"event": event, **fields})


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
