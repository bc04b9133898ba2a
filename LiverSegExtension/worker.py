"""The engine as a long-lived process that speaks JSON lines: ``python -m LiverSegExtension.worker``.

A door that must not run torch in its own process (3D Slicer: its main thread holds the GIL in the Qt
event loop, so a Python thread there starves, and Slicer ships no torch) starts this with its own Python,
writes one request per line on stdin and reads one message per line on stdout. Volumes travel as files.

Requests::

    {"cmd": "segment", "id": 1, "input": "ct.nrrd", "output": "mask.nrrd", "model": "", "device": "auto",
     "source": "CT name"}
    {"cmd": "train", "id": 2, "init": "model folder", "data": ["dataset folder"], "output": "new model folder",
     "device": "auto", "iterations": 200, "seed": 0, "version": "1.1.0"}
    {"cmd": "quit"}

Messages: ``{"event": "ready", "devices": [...], "torch": "2.x", "pid": N}`` once torch is imported, then per
request ``progress`` (``fraction``, ``stage``), and one ``result`` (``liver_ml``, ``seconds``, ``warnings``, ``uncertainty``,
``model_name``, ``timings``) or ``error`` (``message``, ``user``: whether it is the user's to fix, ``details``).
A ``train`` request is a fine-tune (``finetune.fine_tune``): its ``progress`` also carries ``iteration``,
``total``, ``loss`` and, while the guard scores, ``model``, ``case`` and ``val_dice``; ``note`` messages
(``text``) say what the plan found; its ``result`` has ``model_dir``, ``accepted``, ``reason`` and ``rows``
(the parent-versus-new comparison).
The mask is written to ``output`` (uint8, on the input file's grid) before ``result`` is sent. Stdout carries
only these lines: whatever a library prints goes to stderr. The process ends at ``quit`` or when stdin closes
(its parent died), so it never outlives the door that started it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, TextIO

PROTOCOL = 1


class _Channel:
    """The protocol's stdout: a private copy of fd 1, which is then pointed at stderr for everyone else."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)  # C libraries (ITK, OpenMP) that print to fd 1 land on stderr
        sys.stdout = sys.stderr

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()


def _segment(request: dict, channel: _Channel, segmenters: dict) -> None:
    import SimpleITK as sitk

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.inference import LiverSegmenter
    from LiverSegExtension.io import atomic_write, mask_image, read_image

    rid = request.get("id")
    source = str(request.get("source") or request.get("input"))

    def progress(fraction: float, stage: str) -> None:
        channel.send("progress", id=rid, fraction=round(float(fraction), 3), stage=stage)

    try:
        key = (request.get("model") or "", request.get("device") or "auto")
        if key not in segmenters:
            progress(0.0, "loading the model")
            segmenters[key] = LiverSegmenter(key[0] or None, device=key[1])
        segmenter = segmenters[key]
        image = read_image(request["input"])
        wanted = bool(request.get("probability_output"))
        result = segmenter.segment_image(image, progress=progress, source=source, probabilities=wanted)
        # Uncompressed: a private file on a local disk, read back at once; compression would cost seconds.
        mask = mask_image(result.mask, image)
        atomic_write(request["output"], lambda tmp: sitk.WriteImage(mask, tmp, useCompression=False), overwrite=True)
        if wanted:
            prob = mask_image(result.probability, image)
            atomic_write(request["probability_output"], lambda tmp: sitk.WriteImage(prob, tmp, useCompression=False),
                         overwrite=True)
        channel.send("result", id=rid, liver_ml=result.liver_ml, seconds=result.seconds, warnings=result.warnings,
                     model_name=segmenter.model.name, timings=result.timings, uncertainty=result.uncertainty)
    except LiverSegError as exc:
        channel.send("error", id=rid, message=str(exc), user=True)
    except Exception as exc:  # reported to the door, which shows it; the process serves the next request
        channel.send("error", id=rid, message=f"{source}: unexpected error: {exc}", user=False,
                     details=traceback.format_exc())


def _train(request: dict, channel: _Channel) -> None:
    from pathlib import Path

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.finetune import fine_tune, recipe

    rid = request.get("id")
    parent_pid = os.getppid()

    def progress(info: dict) -> None:
        if os.name != "nt" and os.getppid() != parent_pid:  # the door died mid-training: stop, do not linger
            os._exit(1)
        if info["stage"] == "guard":  # two passes (parent, then new) over the guard's cases
            done = info["iteration"] + (info["total"] if info.get("model") == "new" else 0)
            fraction = 0.85 + 0.15 * done / (2 * info["total"])
            stage = f"comparing: {info.get('model')} model on {info.get('case')}, Dice {info['val_dice']:.3f}"
        else:
            fraction = 0.85 * info["iteration"] / info["total"]
            stage = f"training ({info['stage']}): iteration {info['iteration']} of {info['total']}, loss {info['loss']:.3f}"
        if info["stage"] == "guard" or info["iteration"] % 5 == 0 or info["iteration"] == info["total"]:
            channel.send("progress", id=rid, fraction=round(fraction, 3), stage=stage,
                         **{k: v for k, v in info.items() if k != "stage"}, step=info["stage"])

    try:
        cfg = recipe([Path(d) for d in request["data"]], Path(request["output"]), Path(request["init"]),
                     iterations=request.get("iterations"), stages=request.get("stages"),
                     device=request.get("device") or "auto", seed=int(request.get("seed") or 0),
                     version=request.get("version"))
        result = fine_tune(cfg, progress=progress, log=lambda text: channel.send("note", id=rid, text=text))
        channel.send("result", id=rid, model_dir=str(result.model_dir), accepted=result.accepted,
                     reason=result.reason, rows=result.rows)
    except LiverSegError as exc:
        channel.send("error", id=rid, message=str(exc), user=True)
    except Exception as exc:
        channel.send("error", id=rid, message=f"fine-tuning failed: unexpected error: {exc}", user=False,
                     details=traceback.format_exc())


def main() -> int:
    channel = _Channel()
    try:
        import torch

        import LiverSegExtension.inference  # noqa: F401 - all the engine needs: "ready" means the first request is quick
        from LiverSegExtension.devices import available_devices

        channel.send("ready", protocol=PROTOCOL, pid=os.getpid(), torch=torch.__version__, devices=available_devices())
    except ImportError as exc:  # the door installs the packages; say which one is missing
        channel.send("error", id=None, message=f"the LiverSeg engine cannot start: {exc}", user=True)
        return 1
    segmenters: dict = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            channel.send("error", id=None, message=f"not a request: {line[:80]}", user=False)
            continue
        command = request.get("cmd")
        if command == "quit":
            break
        if command == "segment":
            _segment(request, channel, segmenters)
        elif command == "train":
            _train(request, channel)
        else:
            channel.send("error", id=request.get("id"), message=f"unknown command {command!r}", user=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
