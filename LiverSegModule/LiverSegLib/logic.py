"""``LiverSegLogic``: the module's logic, usable without the GUI (scripts, batch runs, self-tests).

``start()`` hands the CT to the engine process (see ``engine.py``) and returns a :class:`SegmentRun` to
poll; ``finish()`` writes its mask into the scene. ``process()`` runs the engine synchronously in this
process (the batch, where nothing waits on an event loop): ONNX Runtime on the CPU only, never torch, even
with device "auto" where a torch that can reach a GPU is installed (GPUs go through ``start()``).
The scene is only changed once a mask exists: an error or a cancel leaves it as it was. Nothing here
imports torch. What the logic runs is given to it: the engine process by ``engineFactory``, the in-process
segmenter of ``process`` by ``segmenterFactory``, and ``dataset.json`` is read with ``readText`` (tests give
fakes, a threshold segmenter, a reader that counts).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # plain Python with only slicer-core (batch runs): the base adds nothing we use there
    ScriptedLoadableModuleLogic = object  # type: ignore[misc,assignment]

from LiverSegExtension import protocol
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegLib import mrml
from LiverSegLib.corrections import CorrectionsMixin
from LiverSegLib.engine import EngineProcess, SegmentRun, TrainRun, outcome
from LiverSegLib.exporting import ExportMixin

__all__ = ["LiverSegLogic", "SlicerResult"]


def _text(path: str | None) -> str | None:
    return Path(path).read_text() if path and Path(path).is_file() else None


def onnx_segmenter(model_path: str | Path | None, device: str):
    """The in-process segmenter ``process`` uses: ONNX Runtime (Slicer's process never imports torch); the
    bundled or default model when ``model_path`` is empty."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    return LiverSegmenter(model_path or None, device=device, runtime="onnxruntime")


@dataclass
class SlicerResult:
    """What a finished run produced in Slicer: the segmentation node holding the "Liver" segment, and its figures."""

    segmentation_node: Any
    segment_id: str
    liver_ml: float
    seconds: float
    model_name: str
    warnings: list[str] = field(default_factory=list)  # e.g. no liver found, or a header that misstates the anatomy
    uncertainty: float = 0.0  # see LiverSegExtension.data.metrics.uncertainty_of
    runtime: str = ""  # what ran the networks, and where: "onnxruntime 1.20.1 on cpu"


class LiverSegLogic(CorrectionsMixin, ExportMixin, ScriptedLoadableModuleLogic):
    """Segment the liver of a scalar volume into a segmentation node."""

    def __init__(self, engineFactory=EngineProcess, segmenterFactory=onnx_segmenter,
                 readText: Callable[[Path], str] = Path.read_text) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # type: ignore[arg-type]
        self.engineFactory = engineFactory  # () -> an unstarted EngineProcess
        self.segmenterFactory = segmenterFactory  # (model path or None, device) -> a LiverSegmenter
        self._readText = readText
        self._segmenters: dict[tuple[str, str], Any] = {}
        self._engine: EngineProcess | None = None
        self._datasetCounts: dict[str, tuple[float, int | None]] = {}
        self._ctCache: tuple[tuple, Path] | None = None  # the last CT handed to the engine, and what it was
        self._undo: dict[str, list[tuple[str, str]]] = {}  # segmentation ID -> (mask, fixes) before each fix
        self._training: list[TrainRun] = []  # fine-tunes started here, each in its own engine process
        self._ids = itertools.count(1)

    # -- parameters ------------------------------------------------------------------------------
    def getParameterNode(self):
        from LiverSegLib.parameters import LiverSegParameterNode

        return LiverSegParameterNode(super().getParameterNode())

    # -- models and devices ------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list[Path]:
        from LiverSegExtension.model.catalog import list_models

        return list_models()

    def engineDevices(self) -> list[str] | None:
        """Devices present, as the engine process found them (None until it has started: Slicer itself
        never imports torch)."""
        ready = self._engine.ready if self._engine is not None else None
        return (protocol.Ready.read(ready).devices or ["cpu"]) if ready else None

    @staticmethod
    def modelCard(model_path: str | Path | None) -> dict[str, Any]:
        """The model's card for display; empty when there is no model or its card is unusable (the model
        selector must still open; running it then reports the engine's error)."""
        from LiverSegExtension.model.catalog import default_model_dir, read_card

        folder = Path(model_path) if model_path else default_model_dir()
        if folder is None:
            return {}
        try:
            return read_card(folder)
        except LiverSegError:
            return {}

    def segmenter(self, model_path: str | Path | None = None, device: str = "auto"):
        """A cached in-process segmenter (for ``process``; loading a model takes a moment): ONNX Runtime on the
        CPU, since this is Slicer's process; a GPU device is refused with where to run it instead."""
        if str(device or "auto").lower().startswith(("cuda", "mps")):
            raise LiverSegError(f"device '{device}' runs in the LiverSeg engine process (start(), as the panel "
                                "does); in Slicer's process LiverSeg runs ONNX Runtime on the CPU")
        key = (str(model_path or ""), device)
        if key not in self._segmenters:
            self._segmenters[key] = self.segmenterFactory(model_path or None, device)
        return self._segmenters[key]

    # -- the engine process ----------------------------------------------------------------------
    def engine(self) -> EngineProcess:
        """The warm engine process, started (again) when it is not running."""
        if self._engine is None or not self._engine.running:
            self._engine = self.engineFactory().start()
        return self._engine

    def shutdown(self) -> None:
        """End the engine processes (module cleanup, Slicer exit): a fine-tune still running is cancelled."""
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
        if self._ctCache is not None:
            shutil.rmtree(self._ctCache[1].parent, ignore_errors=True)
            self._ctCache = None
        for run in self._training:
            run.cancel()
        self._training = []

    # -- running -------------------------------------------------------------------------------
    def _check_inputs(self, input_volume) -> None:
        if input_volume is None:
            raise LiverSegError("no input volume selected")
        if not input_volume.IsA("vtkMRMLScalarVolumeNode") or input_volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise LiverSegError(f"{input_volume.GetName()}: not a scalar CT volume")
        if input_volume.GetImageData() is None:
            raise LiverSegError(f"{input_volume.GetName()}: the volume holds no voxels")

    def start(self, inputVolume, outputSegmentation=None, device: str = "auto",
              modelPath: str | Path | None = None, source: str | None = None) -> SegmentRun:
        """Hand the volume to the engine process and return the run to poll (``run.poll()``), then
        call ``finish(run)``. The nodes are fixed now: the result goes to these, whatever is selected later.
        Arguments as ``process``'s."""
        self._check_inputs(inputVolume)
        source = source or inputVolume.GetName()
        workdir = Path(tempfile.mkdtemp(prefix="LiverSeg-"))  # private (0700), removed by finish or cancel
        try:
            ct_path = self._ctFile(inputVolume)
            engine = self.engine()
            request = protocol.segment_request(next(self._ids), str(ct_path), str(workdir / "mask.nrrd"),
                                               str(modelPath or ""), device, source, attributes=True)
            engine.send(request)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return SegmentRun(engine, request, workdir, inputVolume.GetScene(), inputVolume.GetID(),
                          outputSegmentation.GetID() if outputSegmentation is not None else None, source)

    def _ctFile(self, volume) -> Path:
        """The volume as a raw NRRD for the engine (uncompressed: written and read at disk speed; the engine
        reads exactly this grid). Written again only when the voxels or the geometry changed since the last
        run: a second click on the same CT writes nothing, and the engine reuses what it read."""
        from LiverSegExtension.geometry import image_from_array

        array, matrix = mrml.volume_array_and_matrix(volume)
        key = (volume.GetID(), volume.GetImageData().GetMTime(), array.shape, str(array.dtype), matrix.tobytes())
        if self._ctCache is not None and self._ctCache[0] == key and self._ctCache[1].is_file():
            return self._ctCache[1]
        import SimpleITK as sitk

        folder = self._ctCache[1].parent if self._ctCache is not None else Path(tempfile.mkdtemp(prefix="LiverSeg-ct-"))
        path = folder / f"ct-{next(self._ids)}.nrrd"  # a new name: the engine's cache is keyed by the file
        for old in folder.glob("ct-*.nrrd"):
            old.unlink(missing_ok=True)
        sitk.WriteImage(image_from_array(array, matrix), str(path), False)
        self._ctCache = (key, path)
        return path

    def finish(self, run: SegmentRun, surface: bool = True) -> SlicerResult:
        """Write a finished run's mask into the scene (main thread), or raise its error. ``surface=False``
        leaves the 3D surface for later (``mrml.make_surface``), so that the segment shows sooner."""
        import SimpleITK as sitk

        try:
            outcome(run, f"{run.source}: the run")
            volume = run.scene.GetNodeByID(run.volume_id)
            if volume is None:
                raise LiverSegError(f"{run.source}: the input volume was removed during the run")
            segmentation = None
            if run.segmentation_id is not None:
                segmentation = run.scene.GetNodeByID(run.segmentation_id)
                if segmentation is None:
                    raise LiverSegError(f"{run.source}: the output segmentation was removed during the run")
            image = sitk.ReadImage(str(run.output_path))
            mask = sitk.GetArrayViewFromImage(image)  # no copy: ``image`` outlives the writing below
            result = protocol.SegmentOutcome.read(run.result)
            done = self._write_result(volume, segmentation, mask, result.liver_ml, result.seconds, result.model_name,
                                      result.warnings, draft=_text(result.draft_file), uncertain=_text(result.uncertain_file),
                                      surface=surface)
            done.uncertainty = result.uncertainty
            done.runtime = f"{result.runtime or '?'} on {result.device or '?'}"
            return done
        finally:
            run.cleanup()

    def _write_result(self, volume, segmentation, mask, liver_ml: float, seconds: float, model_name: str,
                      warnings: list[str], probability=None, draft: str | None = None,
                      uncertain: str | None = None, surface: bool = True) -> SlicerResult:
        """The mask into the scene, with the draft and the uncertain band as node attributes: given as text
        (from the engine process), or made here from the mask and the probability."""
        expected = mrml.volume_array_and_matrix(volume)[0].shape
        if tuple(mask.shape) != tuple(expected):
            raise LiverSegError(f"{volume.GetName()}: the mask ({'x'.join(map(str, mask.shape[::-1]))}) does not fit "
                                f"the volume ({'x'.join(map(str, expected[::-1]))}); was the volume changed during the run?")
        scene = volume.GetScene()
        created = segmentation is None
        if created:
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} liver")
        try:
            segment_id = mrml.write_liver_segment(segmentation, volume, mask, surface)
        except Exception:
            if created:
                scene.RemoveNode(segmentation)
            raise
        # Keep the model's draft and name with the node (saved with the scene, so a restart of Slicer
        # loses neither): the export measures how much the annotator changed.
        segmentation.SetAttribute(mrml.MODEL_ATTRIBUTE, model_name)
        segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, draft or masktext.encode_mask(mask))
        if uncertain is None and probability is not None and tuple(probability.shape) == tuple(expected):
            from LiverSegExtension.inference.masktext import uncertain_band

            uncertain = masktext.encode_mask(uncertain_band(probability))
        if uncertain is not None:
            segmentation.SetAttribute(mrml.UNCERTAIN_ATTRIBUTE, uncertain)
        if segmentation.GetSegmentation().GetSegmentIdBySegmentName(mrml.UNCERTAIN_SEGMENT):  # of an earlier run
            self.showUncertainRegions(segmentation, volume, True)
        for warning in warnings:
            logging.warning("LiverSeg: %s", warning)
        return SlicerResult(segmentation, segment_id, liver_ml, seconds, model_name, warnings)

    def process(self, inputVolume, outputSegmentation=None, device: str = "auto", modelPath: str | None = None,
                progress=None, cancel=None, source: str | None = None) -> SlicerResult:
        """Segment ``inputVolume`` into ``outputSegmentation`` (a new node when None), synchronously, in this
        process, with ONNX Runtime on the CPU (see ``segmenter``).

        ``progress(fraction, stage)`` and ``cancel() -> bool`` are called at every step of the engine;
        ``source`` names the input in warnings and errors (default: the volume's name; the batch gives its file).
        """
        from LiverSegExtension.geometry import image_from_array

        self._check_inputs(inputVolume)
        segmenter = self.segmenter(modelPath, device)
        source = source or inputVolume.GetName()
        image = image_from_array(*mrml.volume_array_and_matrix(inputVolume))
        result = segmenter.segment_image(image, progress=progress, cancel=cancel, source=source, probabilities=True)
        run = self._write_result(inputVolume, outputSegmentation, result.mask, result.liver_ml, result.seconds,
                                 segmenter.model.name, list(result.warnings), result.probability)
        run.uncertainty = result.uncertainty
        run.runtime = segmenter.runs_on
        return run

    # -- fine-tuning ---------------------------------------------------------------------------------
    def datasetCaseCount(self, datasetFolder: str | Path | None) -> int | None:
        """How many training cases ``dataset.json`` lists (None: no dataset there, or unreadable). Read
        again only when the file changed: the panel asks on every parameter change and keystroke."""

        if not datasetFolder:
            return None
        path = Path(datasetFolder) / "dataset.json"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._datasetCounts.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            entries = json.loads(self._readText(path)).get("training")
        except (OSError, ValueError, AttributeError):
            entries = None
        count = len(entries) if isinstance(entries, list) else None
        self._datasetCounts[str(path)] = (stamp, count)
        return count

    def startFineTune(self, datasetFolder: str | Path, device: str = "auto", modelPath: str | Path | None = None,
                      iterations: int | None = None, outputFolder: str | Path | None = None) -> TrainRun:
        """Fine-tune the model on the dataset's cases in an engine process of its own (the recipe and the
        regression guard of ``LiverSegExtension.training.finetune``); poll the run, then ``finishFineTune(run)``.
        The new model goes to a free ``<name>-v<version>`` folder of the user's models unless given."""
        from LiverSegExtension.model.catalog import default_model_dir, new_model_dir, read_card

        count = self.datasetCaseCount(datasetFolder)
        if not count:
            raise LiverSegError(f"{datasetFolder}: no training cases there (export corrected cases first)")
        parent = Path(modelPath) if modelPath else default_model_dir()
        if parent is None:
            raise LiverSegError("no model to fine-tune: install a trained model first")
        card = read_card(parent)
        if outputFolder:
            output, version = Path(outputFolder), None
        else:
            output, version = new_model_dir(card)
        request = protocol.train_request(next(self._ids), str(parent), [str(datasetFolder)], str(output), device,
                                         iterations, version)
        engine = self.engineFactory().start()
        try:
            engine.send(request)
        except Exception:
            engine.kill()
            raise
        run = TrainRun(engine, request)
        self._training = [r for r in self._training if not r.done] + [run]
        return run

    @staticmethod
    def finishFineTune(run: TrainRun) -> protocol.TrainOutcome:
        """A finished fine-tune's result (``model_dir``, ``accepted``, ``reason``, ``rows``), or its error."""
        return protocol.TrainOutcome.read(outcome(run, "the fine-tune"))
