"""The engine as a long-lived process: ``python -m LiverSegExtension.worker``.

A door that must not run torch in its own process (3D Slicer: its main thread holds the GIL in the Qt
event loop, so a Python thread there starves, and Slicer ships no torch) starts this with its own Python,
writes one request per line on stdin and reads one message per line on stdout, as
:mod:`LiverSegExtension.protocol` says.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO

from LiverSegExtension import protocol


class _Channel:
    """The protocol's stdout: a private copy of fd 1, which is then pointed at stderr for everyone else."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)  # C libraries (ITK, OpenMP) that print to fd 1 land on stderr
        sys.stdout = sys.stderr

    def send(self, message: dict[str, Any]) -> None:
        """One message, built by :mod:`LiverSegExtension.protocol`."""
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()


_last_image: dict = {}  # the image the previous request read, by (path, mtime, size): one entry at most


def _read_once(path: str, read):
    """``read(path)``, or the image read from the same unchanged file by the previous request (a second
    click on one CT in Slicer hands over the same file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return read(path)  # says what is wrong with it
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _last_image:
        _last_image.clear()
        _last_image[key] = read(path)
    return _last_image[key]


def _segment(request: dict, channel: _Channel, segmenters: dict) -> None:
    import SimpleITK as sitk

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.inference.segmenter import LiverSegmenter
    from LiverSegExtension.io import atomic_write, mask_image, read_image

    req = protocol.SegmentRequest.read(request)
    rid, source = req.id, req.source

    def progress(fraction: float, stage: str) -> None:
        channel.send(protocol.progress(rid, fraction, stage))

    try:
        key = (req.model, req.device, req.runtime)
        if key not in segmenters:
            progress(0.0, "loading the model")
            segmenters[key] = LiverSegmenter(req.model or None, device=req.device, runtime=req.runtime)
        segmenter = segmenters[key]
        image = _read_once(req.input, read_image)
        result = segmenter.segment_image(image, progress=progress, source=source, probabilities=req.attributes)
        # Uncompressed: a private file on a local disk, read back at once; compression would cost seconds.
        mask = mask_image(result.mask, image)
        atomic_write(req.output, lambda tmp: sitk.WriteImage(mask, tmp, useCompression=False), overwrite=True)
        extra = {}
        if req.attributes:  # what Slicer keeps with the segmentation node, as text made here, off its main thread
            from pathlib import Path

            from LiverSegExtension.inference.masktext import encode_mask, uncertain_band

            for name, mask in (("draft", result.mask), ("uncertain", uncertain_band(result.probability))):
                path = Path(req.output).with_name(f"{name}.txt")  # a file: a long line would clog the pipe
                atomic_write(path, lambda tmp, m=mask: Path(tmp).write_text(encode_mask(m)), overwrite=True)
                extra[f"{name}_file"] = str(path)
        outcome = protocol.SegmentOutcome(result.liver_ml, result.seconds, segmenter.model.name, list(result.warnings),
                                          result.uncertainty, f"{segmenter.runtime.name} {segmenter.runtime.version}",
                                          str(segmenter.device), dict(result.timings), **extra)
        channel.send(outcome.message(rid))
    except LiverSegError as exc:
        channel.send(protocol.error(rid, str(exc), user=True))
    except Exception as exc:  # reported to the door, which shows it; the process serves the next request
        channel.send(protocol.error(rid, f"{source}: unexpected error: {exc}", False, traceback.format_exc()))


def _export(request: dict, channel: _Channel) -> None:
    """Add a CT and its corrected label (raw files the door wrote) to a training dataset: the compression
    and hashing happen here, not on the door's main thread."""
    import SimpleITK as sitk

    from LiverSegExtension.data.dataset import add_case_images
    from LiverSegExtension.errors import LiverSegError

    req = protocol.ExportRequest.read(request)
    rid = req.id
    try:
        channel.send(protocol.progress(rid, 0.0, "exporting"))
        image, label = sitk.ReadImage(req.image), sitk.ReadImage(req.label)
        draft = sitk.GetArrayFromImage(sitk.ReadImage(req.draft)) if req.draft else None
        name = add_case_images(req.dataset, image, label, req.provenance, draft)
        channel.send(protocol.export_result(rid, name))
    except LiverSegError as exc:
        channel.send(protocol.error(rid, str(exc), user=True))
    except Exception as exc:
        channel.send(protocol.error(rid, f"export failed: unexpected error: {exc}", False, traceback.format_exc()))


def _train(request: dict, channel: _Channel) -> None:
    from pathlib import Path

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.training.finetune import fine_tune, recipe

    req = protocol.TrainRequest.read(request)
    rid = req.id

    def progress(info: dict) -> None:
        if info["stage"] == "guard":  # two passes (parent, then new) over the guard's cases
            done = info["iteration"] + (info["total"] if info.get("model") == "new" else 0)
            fraction = 0.85 + 0.15 * done / (2 * info["total"])
            stage = f"comparing: {info.get('model')} model on {info.get('case')}, Dice {info['val_dice']:.3f}"
        else:
            fraction = 0.85 * info["iteration"] / info["total"]
            stage = f"training ({info['stage']}): iteration {info['iteration']} of {info['total']}, loss {info['loss']:.3f}"
        if info["stage"] == "guard" or info["iteration"] % 5 == 0 or info["iteration"] == info["total"]:
            channel.send(protocol.progress(rid, fraction, stage, **{k: v for k, v in info.items() if k != "stage"},
                                           step=info["stage"]))

    try:
        cfg = recipe([Path(d) for d in req.data], Path(req.output), Path(req.init), iterations=req.iterations,
                     device=req.device, version=req.version)
        result = fine_tune(cfg, progress=progress, log=lambda text: channel.send(protocol.note(rid, text)))
        channel.send(protocol.TrainOutcome(str(result.model_dir), result.accepted, result.reason, result.rows).message(rid))
    except LiverSegError as exc:
        channel.send(protocol.error(rid, str(exc), user=True))
    except Exception as exc:
        channel.send(protocol.error(rid, f"fine-tuning failed: unexpected error: {exc}", False, traceback.format_exc()))


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
        import LiverSegExtension.inference.segmenter  # noqa: F401 - all the engine needs: "ready" means the first request is quick
        from LiverSegExtension.model.environment import available_devices, runtimes_installed

        channel.send(protocol.ready(os.getpid(), runtimes_installed(), available_devices()))
    except ImportError as exc:  # the door installs the packages; say which one is missing
        channel.send(protocol.error(None, f"the LiverSeg engine cannot start: {exc}", user=True))
        return 1
    segmenters: dict = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = protocol.parse_request(line)
        except protocol.BadRequest as exc:
            channel.send(protocol.error(exc.id, str(exc), user=False))
            continue
        command = request["cmd"]
        if command == protocol.QUIT:
            break
        if command == protocol.SEGMENT:
            _segment(request, channel, segmenters)
        elif command == protocol.TRAIN:
            _train(request, channel)
        else:
            _export(request, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
