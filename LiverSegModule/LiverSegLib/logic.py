"""``LiverSegLogic``: the module's logic, usable without the GUI (scripts, batch runs, self-tests).

``start()`` hands the CT to the engine process (see ``engine.py``) and returns a :class:`SegmentRun` to
poll; ``finish()`` writes its mask into the scene. ``process()`` runs the engine synchronously in this
process (the batch, where nothing waits on an event loop): ONNX Runtime on the CPU only, never torch, even
with device "auto" where a torch that can reach a GPU is installed (GPUs go through ``start()``).
The scene is only changed once a mask exists: an error or a cancel leaves it as it was. Nothing here
imports torch. The engine process comes from ``engineFactory`` (tests may give a fake one).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # plain Python with only slicer-core (batch runs): the base adds nothing we use there
    ScriptedLoadableModuleLogic = object  # type: ignore[misc,assignment]

from LiverSegExtension import protocol
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegLib import mrml
from LiverSegLib.engine import EngineProcess, SegmentRun, TrainRun

FIXES_ATTRIBUTE = "LiverSeg.Fixes"  # the one-click fixes made on the node: JSON list, saved with the scene


def outcome(run, what: str) -> dict[str, Any]:
    """A finished engine run's result message, or its error raised (an unexpected one's traceback logged)."""
    run.poll()
    if run.error is not None:
        if run.details:
            logging.error("LiverSeg: %s\n%s", run.error, run.details)
        raise run.error
    if not run.done:
        raise LiverSegError(f"{what} has not finished")
    return run.result


def _text(path: str | None) -> str | None:
    return Path(path).read_text() if path and Path(path).is_file() else None


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


class LiverSegLogic(ScriptedLoadableModuleLogic):
    """Segment the liver of a scalar volume into a segmentation node."""

    def __init__(self, engineFactory=EngineProcess) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # type: ignore[arg-type]
        self.engineFactory = engineFactory  # () -> an unstarted EngineProcess
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
        return list(ready.get("devices") or ["cpu"]) if ready else None

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
        from LiverSegExtension.inference.segmenter import LiverSegmenter

        if str(device or "auto").lower().startswith(("cuda", "mps")):
            raise LiverSegError(f"device '{device}' runs in the LiverSeg engine process (start(), as the panel "
                                "does); in Slicer's process LiverSeg runs ONNX Runtime on the CPU")
        key = (str(model_path or ""), device)
        if key not in self._segmenters:
            self._segmenters[key] = LiverSegmenter(model_path or None, device=device, runtime="onnxruntime")
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

    def finish(self, run: SegmentRun) -> SlicerResult:
        """Write a finished run's mask into the scene (main thread), or raise its error."""
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
            result = run.result
            done = self._write_result(volume, segmentation, mask, result["liver_ml"], result["seconds"],
                                      result["model_name"], list(result.get("warnings", [])),
                                      draft=_text(result.get("draft_file")), uncertain=_text(result.get("uncertain_file")))
            done.uncertainty = float(result.get("uncertainty", 0.0))
            done.runtime = f"{result.get('runtime', '?')} on {result.get('device', '?')}"
            return done
        finally:
            run.cleanup()

    def _write_result(self, volume, segmentation, mask, liver_ml: float, seconds: float, model_name: str,
                      warnings: list[str], probability=None, draft: str | None = None,
                      uncertain: str | None = None) -> SlicerResult:
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
            segment_id = mrml.write_liver_segment(segmentation, volume, mask)
        except Exception:
            if created:
                scene.RemoveNode(segmentation)
            raise
        # Keep the model's draft and name with the node (saved with the scene, so a restart of Slicer
        # loses neither): the export measures how much the annotator changed.
        segmentation.SetAttribute("LiverSeg.Model", model_name)
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

    # -- where the model hesitates ------------------------------------------------------------------
    @staticmethod
    def uncertainBand(segmentationNode, volumeNode):
        """The last run's uncertain band (``[k, j, i]`` bool on the volume's grid), or None."""
        shape = mrml.volume_array_and_matrix(volumeNode)[0].shape
        band = masktext.decode_mask(segmentationNode.GetAttribute(mrml.UNCERTAIN_ATTRIBUTE), shape)
        return None if band is None else band > 0

    def showUncertainRegions(self, segmentationNode, volumeNode, show: bool) -> bool:
        """Show (or remove) the segment "Liver: uncertain": where the last run's liver probability lay
        between 0.1 and 0.9. It is for looking only: the export takes the "Liver" segment alone.
        False when there is no band to show (no run of this version on this node)."""
        segmentation = segmentationNode.GetSegmentation()
        old = segmentation.GetSegmentIdBySegmentName(mrml.UNCERTAIN_SEGMENT)
        if not show:
            if old:
                segmentation.RemoveSegment(old)
            return True
        band = self.uncertainBand(segmentationNode, volumeNode)
        if band is None:
            return False
        mrml.write_segment(segmentationNode, volumeNode, band.astype(np.uint8), mrml.UNCERTAIN_SEGMENT,
                           mrml.UNCERTAIN_COLOR)
        return True

    def jumpToUncertainRegion(self, segmentationNode, volumeNode):
        """Centre every slice view on the largest connected uncertain region; its RAS centre, or None."""
        from scipy import ndimage

        band = self.uncertainBand(segmentationNode, volumeNode)
        if band is None or not band.any():
            return None
        labels, n = ndimage.label(band, structure=np.ones((3, 3, 3), bool))
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        k, j, i = (float(v) for v in ndimage.center_of_mass(labels == largest))
        matrix = mrml.volume_array_and_matrix(volumeNode)[1]
        ras = (matrix @ np.array([i, j, k, 1.0]))[:3]
        scene = volumeNode.GetScene()
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByCentering(*ras)
        return ras

    # -- one-click fixes ---------------------------------------------------------------------------------
    def fixAt(self, segmentationNode, volumeNode, ras, kind: str) -> float:
        """``kind`` "add" (the region the last run gave a liver probability above 0.1, around ``ras``) or
        "remove" (the part beyond the narrowest neck between ``ras`` and the liver) on the "Liver" segment;
        other segments are left alone. The change is recorded on the node (the export lists it as the
        annotator's) and can be undone. Returns the volume change in mL."""
        from LiverSegExtension.data.metrics import volume_ml
        from LiverSegExtension.inference.fixes import add_here, remove_here

        segment_id = mrml.find_liver_segment(segmentationNode) if segmentationNode is not None else None
        if segment_id is None:
            raise LiverSegError("no 'Liver' segment to fix: segment the liver first")
        mask = mrml.segment_mask(segmentationNode, segment_id, volumeNode)
        array, matrix = mrml.volume_array_and_matrix(volumeNode)
        point = (np.linalg.inv(matrix) @ np.array([*ras[:3], 1.0]))[:3][::-1]  # (k, j, i)
        if kind == "add":
            draft = masktext.decode_mask(segmentationNode.GetAttribute(mrml.DRAFT_ATTRIBUTE), array.shape)
            band = self.uncertainBand(segmentationNode, volumeNode)
            if draft is None or band is None:
                raise LiverSegError("this segmentation keeps no probability of a LiverSeg run: run Segment Liver first")
            probability = np.where(draft > 0, 255, np.where(band, 128, 0)).astype(np.uint8)
            fixed, _ = add_here(mask, probability, point)
        elif kind == "remove":
            fixed, _ = remove_here(mask, point)
        else:
            raise LiverSegError(f"unknown fix {kind!r}: add or remove")
        self._undo.setdefault(segmentationNode.GetID(), []).append(
            (masktext.encode_mask(mask), segmentationNode.GetAttribute(FIXES_ATTRIBUTE) or "[]"))
        mrml.write_liver_segment(segmentationNode, volumeNode, fixed)
        change = volume_ml(fixed, volumeNode.GetSpacing()) - volume_ml(mask, volumeNode.GetSpacing())
        fixes = json.loads(segmentationNode.GetAttribute(FIXES_ATTRIBUTE) or "[]")
        fixes.append({"fix": kind, "ras": [round(float(v), 2) for v in ras[:3]], "ml": round(change, 2)})
        segmentationNode.SetAttribute(FIXES_ATTRIBUTE, json.dumps(fixes))
        return change

    def canUndoFix(self, segmentationNode) -> bool:
        return bool(self._undo.get(segmentationNode.GetID()))

    def undoFix(self, segmentationNode, volumeNode) -> bool:
        """Undo the last fix of this segmentation (False when there is none to undo)."""
        stack = self._undo.get(segmentationNode.GetID() if segmentationNode is not None else "", [])
        if not stack:
            return False
        encoded, fixes = stack.pop()
        shape = mrml.volume_array_and_matrix(volumeNode)[0].shape
        mrml.write_liver_segment(segmentationNode, volumeNode, masktext.decode_mask(encoded, shape))
        segmentationNode.SetAttribute(FIXES_ATTRIBUTE, fixes)
        return True

    # -- fine-tuning ---------------------------------------------------------------------------------
    def datasetCaseCount(self, datasetFolder: str | Path | None) -> int | None:
        """How many training cases ``dataset.json`` lists (None: no dataset there, or unreadable). Read
        again only when the file changed: the panel asks on every parameter change and keystroke."""
        import json

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
            entries = json.loads(path.read_text()).get("training")
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
    def finishFineTune(run: TrainRun) -> dict[str, Any]:
        """A finished fine-tune's result (``model_dir``, ``accepted``, ``reason``, ``rows``), or its error."""
        return outcome(run, "the fine-tune")

    # -- export for training -------------------------------------------------------------------------
    def _exportInputs(self, inputVolume, segmentationNode, draftMask=None):
        """(CT array, IJK-to-RAS, Liver label, draft or None) of what is exported."""
        self._check_inputs(inputVolume)
        if segmentationNode is None:
            raise LiverSegError("no segmentation selected")
        segment_id = mrml.find_liver_segment(segmentationNode)
        if segment_id is None:
            raise LiverSegError(f"{segmentationNode.GetName()}: has no segment named 'Liver'")
        label = mrml.segment_mask(segmentationNode, segment_id, inputVolume)
        array, matrix = mrml.volume_array_and_matrix(inputVolume)
        if draftMask is None:  # a draft of another shape (the volume was cropped or resampled) is ignored
            draftMask = masktext.decode_mask(segmentationNode.GetAttribute(mrml.DRAFT_ATTRIBUTE), array.shape)
        return array, matrix, label, draftMask

    def startExport(self, inputVolume, segmentationNode, datasetFolder: str | Path, annotator: str = "",
                    modelName: str | None = None, provenance: dict[str, Any] | None = None) -> SegmentRun:
        """``exportForTraining`` with its compression and hashing in the engine process (seconds for a large
        CT), so the main thread only writes raw files; poll the run, then ``finishExport(run)``."""
        import SimpleITK as sitk

        from LiverSegExtension.geometry import image_from_array

        array, matrix, label, draft = self._exportInputs(inputVolume, segmentationNode)
        workdir = Path(tempfile.mkdtemp(prefix="LiverSeg-export-"))
        try:
            files = {"image": workdir / "ct.nrrd", "label": workdir / "label.nrrd"}
            sitk.WriteImage(image_from_array(array, matrix), str(files["image"]), False)
            sitk.WriteImage(image_from_array(label.astype(np.uint8), matrix), str(files["label"]), False)
            if draft is not None:
                files["draft"] = workdir / "draft.nrrd"
                sitk.WriteImage(image_from_array(np.asarray(draft, np.uint8), matrix), str(files["draft"]), False)
            record = {"model": modelName or segmentationNode.GetAttribute("LiverSeg.Model") or None,
                      "annotator": annotator or None,
                      "one_click_fixes": json.loads(segmentationNode.GetAttribute(FIXES_ATTRIBUTE) or "[]") or None,
                      **(provenance or {})}
            engine = self.engine()
            request = protocol.export_request(next(self._ids), str(datasetFolder), {k: str(v) for k, v in files.items()},
                                              record)
            engine.send(request)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return SegmentRun(engine, request, workdir, inputVolume.GetScene(), inputVolume.GetID(), None,
                          inputVolume.GetName())

    @staticmethod
    def finishExport(run: SegmentRun) -> str:
        """The case name a finished export got, or its error."""
        try:
            return str(outcome(run, "the export")["case"])
        finally:
            run.cleanup()

    def exportForTraining(self, inputVolume, segmentationNode, datasetFolder: str | Path, annotator: str = "",
                          draftMask=None, modelName: str | None = None, provenance: dict[str, Any] | None = None) -> str:
        """Add the CT and its (corrected) Liver segment to an MSD dataset, in this process (scripts; the panel
        uses ``startExport``); returns the new case name. ``provenance``: more to record with it (a review's
        batch row)."""
        from LiverSegExtension.data.dataset import add_case_arrays

        array, matrix, label, draftMask = self._exportInputs(inputVolume, segmentationNode, draftMask)
        record = {
            "model": modelName or segmentationNode.GetAttribute("LiverSeg.Model") or None,
            "annotator": annotator or None,
            "one_click_fixes": json.loads(segmentationNode.GetAttribute(FIXES_ATTRIBUTE) or "[]") or None,
            **(provenance or {}),
        }
        return add_case_arrays(datasetFolder, array, label, matrix, provenance=record, draft=draftMask)
