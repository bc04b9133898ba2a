"""The engine as a long-lived process that speaks JSON lines: ``python -m LiverSegExtension.worker``.

A door that must not run torch in its own process (3D Slicer: its main thread holds the GIL in the Qt
event loop, so a Python thread there starves, and Slicer ships no torch) starts this with its own Python,
writes one request per line on stdin and reads one message per line on stdout. Volumes travel as files.

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
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO

PROTOCOL = 2  # the door refuses an engine that speaks another version


REQUIRED = {"segment": ("input", "output"), "train": ("init", "data", "output"), "export": ("dataset", "image", "label")}


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON: a request holding them is refused (they could not be echoed back)."""
    raise ValueError(f"{name} is not JSON")


class _Channel:
    """The protocol's stdout: a private copy of fd 1, which is then pointed at stderr for everyone else."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)  # C libraries (ITK, OpenMP) that print to fd 1 land on stderr
        sys.stdout = sys.stderr

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()


def _read_once(path: str, read, cache: dict):
    """``read(path)``, or the image read from the same unchanged file by the previous request (a second
    click on one CT in Slicer hands over the same file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return read(path)  # says what is wrong with it
    key = ("image", path, stat.st_mtime_ns, stat.st_size)
    if key not in cache:
        for old in [k for k in cache if k[0] == "image"]:
            del cache[old]
        cache[key] = read(path)
    return cache[key]


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
        key = (str(request.get("model") or ""), str(request.get("device") or "auto"), str(request.get("runtime") or "auto"))
        if key not in segmenters:
            progress(0.0, "loading the model")
            segmenters[key] = LiverSegmenter(key[0] or None, device=key[1], runtime=key[2])
        segmenter = segmenters[key]
        image = _read_once(str(request["input"]), read_image, segmenters)
        attributes = bool(request.get("attributes"))
        wanted = bool(request.get("probability_output")) or attributes
        result = segmenter.segment_image(image, progress=progress, source=source, probabilities=wanted)
        # Uncompressed: a private file on a local disk, read back at once; compression would cost seconds.
        mask = mask_image(result.mask, image)
        atomic_write(request["output"], lambda tmp: sitk.WriteImage(mask, tmp, useCompression=False), overwrite=True)
        extra = {}
        if attributes:  # what Slicer keeps with the segmentation node, as text made here, off its main thread
            from pathlib import Path

            from LiverSegExtension.masktext import encode_mask, uncertain_band

            for name, mask in (("draft", result.mask), ("uncertain", uncertain_band(result.probability))):
                path = Path(request["output"]).with_name(f"{name}.txt")  # a file: a long line would clog the pipe
                atomic_write(path, lambda tmp, m=mask: Path(tmp).write_text(encode_mask(m)), overwrite=True)
                extra[f"{name}_file"] = str(path)
        if request.get("probability_output"):
            prob = mask_image(result.probability, image)
            atomic_write(request["probability_output"], lambda tmp: sitk.WriteImage(prob, tmp, useCompression=False),
                         overwrite=True)
        channel.send("result", id=rid, liver_ml=result.liver_ml, seconds=result.seconds, warnings=result.warnings,
                     model_name=segmenter.model.name, timings=result.timings, uncertainty=result.uncertainty,
                     runtime=f"{segmenter.runtime.name} {segmenter.runtime.version}", device=segmenter.device,
                     **extra)
    except LiverSegError as exc:
        channel.send("error", id=rid, message=str(exc), user=True)
    except Exception as exc:  # reported to the door, which shows it; the process serves the next request
        channel.send("error", id=rid, message=f"{source}: unexpected error: {exc}", user=False,
                     details=traceback.format_exc())


def _export(request: dict, channel: _Channel) -> None:
    """Add a CT and its corrected label (raw files the door wrote) to a training dataset: the compression
    and hashing happen here, not on the door's main thread."""
    import SimpleITK as sitk

    from LiverSegExtension.dataset import add_case_images
    from LiverSegExtension.errors import LiverSegError

    rid = request.get("id")
    try:
        channel.send("progress", id=rid, fraction=0.0, stage="exporting")
        image, label = sitk.ReadImage(str(request["image"])), sitk.ReadImage(str(request["label"]))
        draft = sitk.GetArrayFromImage(sitk.ReadImage(str(request["draft"]))) if request.get("draft") else None
        provenance = request.get("provenance") if isinstance(request.get("provenance"), dict) else {}
        name = add_case_images(str(request["dataset"]), image, label, provenance, draft)
        channel.send("result", id=rid, case=name)
    except LiverSegError as exc:
        channel.send("error", id=rid, message=str(exc), user=True)
    except Exception as exc:
        channel.send("error", id=rid, message=f"export failed: unexpected error: {exc}", user=False,
                     details=traceback.format_exc())


def _train(request: dict, channel: _Channel) -> None:
    from pathlib import Path

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.finetune import fine_tune, recipe

    rid = request.get("id")

    def progress(info: dict) -> None:
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


def _end_with_parent() -> None:
    """End this process when its parent goes (POSIX: it is then adopted, and its parent pid changes).

    The parent is the door, or the launcher between them (``PythonSlicer``): a launcher that is killed
    leaves its child running, which would compute on, or a fine-tune write into a folder already removed.
    A thread: the main one may be deep in a computation that does not read stdin."""
    if os.name == "nt":
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="liverseg-parent-watch", daemon=True).start()


def main() -> int:
    _end_with_parent()
    channel = _Channel()
    try:
        import LiverSegExtension.inference  # noqa: F401 - all the engine needs: "ready" means the first request is quick
        from LiverSegExtension.runtimes import available_devices, runtimes_installed

        channel.send("ready", protocol=PROTOCOL, pid=os.getpid(), runtimes=runtimes_installed(),
                     devices=available_devices())
    except ImportError as exc:  # the door installs the packages; say which one is missing
        channel.send("error", id=None, message=f"the LiverSeg engine cannot start: {exc}", user=True)
        return 1
    segmenters: dict = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line, parse_constant=_no_constant)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            channel.send("error", id=None, message=f"not a request (a JSON object per line): {line[:80]}", user=False)
            continue
        if not isinstance(request.get("id"), (int, str, type(None))) or isinstance(request.get("id"), bool):
            channel.send("error", id=None, message="a request's id must be a number or a string", user=False)
            continue
        missing = [k for k in REQUIRED.get(request.get("cmd"), ()) if not request.get(k)]
        if missing:
            channel.send("error", id=request.get("id"), message=f"{request.get('cmd')} request without "
                         f"{', '.join(missing)}", user=False)
            continue
        command = request.get("cmd")
        if command == "quit":
            break
        if command == "segment":
            _segment(request, channel, segmenters)
        elif command == "train":
            _train(request, channel)
        elif command == "export":
            _export(request, channel)
        else:
            channel.send("error", id=request.get("id"), message=f"unknown command {command!r}", user=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
