"""``LiverSegLogic``: the module's logic, usable without the GUI (scripts, batch runs, self-tests).

``process()`` runs the engine synchronously in this process (scripts and the batch, where nothing
waits on an event loop). ``start()`` hands the CT to the engine process (see ``engine.py``) and returns a
:class:`SegmentRun` to poll; ``finish()`` writes its mask into the scene. The scene is only changed once
a mask exists: an error or a cancel leaves it as it was. Nothing here imports torch: the engine does,
in its own process (``start``) or once ``process`` is called.
"""

from __future__ import annotations

import itertools
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

from LiverSegExtension.errors import LiverSegError
from LiverSegLib import mrml
from LiverSegLib.engine import EngineProcess, SegmentRun, TrainRun


@dataclass
class LiverSegRun:
    """What a finished run produced."""

    segmentation_node: Any
    segment_id: str
    liver_ml: float
    seconds: float
    model_name: str
    warnings: list[str] = field(default_factory=list)  # e.g. no liver found, or a header that misstates the anatomy
    uncertainty: float = 0.0  # see LiverSegExtension.inference.uncertainty_of


class LiverSegLogic(ScriptedLoadableModuleLogic):
    """Segment the liver of a scalar volume into a segmentation node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # type: ignore[arg-type]
        self._segmenters: dict[tuple[str, str], Any] = {}
        self._engine: EngineProcess | None = None
        self._training: list[TrainRun] = []  # fine-tunes started here, each in its own engine process
        self._ids = itertools.count(1)

    # -- parameters ------------------------------------------------------------------------------
    def getParameterNode(self):
        from LiverSeg import LiverSegParameterNode  # the wrapper class lives in the module file

        return LiverSegParameterNode(super().getParameterNode())

    # -- models and devices ------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list[Path]:
        from LiverSegExtension.catalog import list_models

        return list_models()

    def engineDevices(self) -> list[str] | None:
        """Devices present, as the engine process found them (None until it has started: Slicer itself
        never imports torch)."""
        ready = self._engine.ready if self._engine is not None else None
        return list(ready["devices"]) if ready else None

    @staticmethod
    def modelCard(model_path: str | Path | None) -> dict[str, Any]:
        """The model's card for display; empty when there is no model or its card is unusable (the model
        selector must still open; running it then reports the engine's error)."""
        from LiverSegExtension.catalog import default_model_dir, read_card

        folder = Path(model_path) if model_path else default_model_dir()
        if folder is None:
            return {}
        try:
            return read_card(folder)
        except LiverSegError:
            return {}

    def segmenter(self, model_path: str | Path | None = None, device: str = "auto"):
        """A cached in-process segmenter (for ``process``; loading a model takes a moment)."""
        from LiverSegExtension.inference import LiverSegmenter

        key = (str(model_path or ""), device)
        if key not in self._segmenters:
            self._segmenters[key] = LiverSegmenter(model_path or None, device=device)
        return self._segmenters[key]

    # -- the engine process ----------------------------------------------------------------------
    def engine(self) -> EngineProcess:
        """The warm engine process, started (again) when it is not running."""
        if self._engine is None or not self._engine.running:
            self._engine = EngineProcess().start()
        return self._engine

    def shutdown(self) -> None:
        """End the engine processes (module cleanup, Slicer exit): a fine-tune still running is cancelled."""
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
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

    def start(self, input_volume, output_segmentation=None, model_path: str | Path | None = None,
              device: str = "auto") -> SegmentRun:
        """Hand the volume to the engine process and return the run to poll (``run.poll()``), then
        call ``finish(run)``. The nodes are fixed now: the result goes to these, whatever is selected later."""
        import SimpleITK as sitk

        from LiverSegExtension.geometry import image_from_array

        self._check_inputs(input_volume)
        workdir = Path(tempfile.mkdtemp(prefix="LiverSeg-"))  # private (0700), removed by finish or cancel
        try:
            ct_path = workdir / "ct.nrrd"
            # Uncompressed: written and read at disk speed; the engine reads exactly this grid.
            sitk.WriteImage(image_from_array(*mrml.volume_array_and_matrix(input_volume)), str(ct_path), False)
            engine = self.engine()
            request = {"cmd": "segment", "id": next(self._ids), "input": str(ct_path),
                       "output": str(workdir / "mask.nrrd"), "probability_output": str(workdir / "probability.nrrd"),
                       "model": str(model_path or ""), "device": device,
                       "source": input_volume.GetName()}
            engine.send(request)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return SegmentRun(engine, request, workdir, input_volume.GetScene(), input_volume.GetID(),
                          output_segmentation.GetID() if output_segmentation is not None else None,
                          input_volume.GetName())

    def finish(self, run: SegmentRun) -> LiverSegRun:
        """Write a finished run's mask into the scene (main thread), or raise its error."""
        import SimpleITK as sitk

        try:
            run.poll()
            if run.error is not None:
                if run.details:  # an unexpected error in the engine: keep its traceback in the log
                    logging.error("LiverSeg: %s\n%s", run.error, run.details)
                raise run.error
            if not run.done:
                raise LiverSegError(f"{run.source}: the run has not finished")
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
            probability_path = run.output_path.with_name("probability.nrrd")
            probability = sitk.GetArrayFromImage(sitk.ReadImage(str(probability_path))) if probability_path.exists() else None
            result = run.result
            done = self._write_result(volume, segmentation, mask, result["liver_ml"], result["seconds"],
                                      result["model_name"], list(result.get("warnings", [])), probability)
            done.uncertainty = float(result.get("uncertainty", 0.0))
            return done
        finally:
            run.cleanup()

    def _write_result(self, volume, segmentation, mask, liver_ml: float, seconds: float, model_name: str,
                      warnings: list[str], probability=None) -> LiverSegRun:
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
        segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, mrml.encode_mask(mask))
        if probability is not None and tuple(probability.shape) == tuple(expected):
            from LiverSegExtension.metrics import UNSURE

            band = (probability > UNSURE[0] * 255) & (probability < UNSURE[1] * 255)
            segmentation.SetAttribute(mrml.UNCERTAIN_ATTRIBUTE, mrml.encode_mask(band.astype(np.uint8)))
        if segmentation.GetSegmentation().GetSegmentIdBySegmentName(mrml.UNCERTAIN_SEGMENT):  # of an earlier run
            self.showUncertainRegions(segmentation, volume, True)
        for warning in warnings:
            logging.warning("LiverSeg: %s", warning)
        return LiverSegRun(segmentation, segment_id, liver_ml, seconds, model_name, warnings)

    def process(self, inputVolume, outputSegmentation=None, device: str = "auto", modelPath: str | None = None,
                progress=None, cancel=None) -> LiverSegRun:
        """Segment ``inputVolume`` into ``outputSegmentation`` (a new node when None), synchronously, in this
        process (it imports torch here).

        ``progress(fraction, stage)`` and ``cancel() -> bool`` are called at every step of the engine.
        """
        from LiverSegExtension.geometry import image_from_array

        self._check_inputs(inputVolume)
        segmenter = self.segmenter(modelPath, device)
        source = inputVolume.GetName()
        image = image_from_array(*mrml.volume_array_and_matrix(inputVolume))
        result = segmenter.segment_image(image, progress=progress, cancel=cancel, source=source, probabilities=True)
        run = self._write_result(inputVolume, outputSegmentation, result.mask, result.liver_ml, result.seconds,
                                 segmenter.model.name, list(result.warnings), result.probability)
        run.uncertainty = result.uncertainty
        return run

    # -- where the model hesitates ------------------------------------------------------------------
    @staticmethod
    def uncertainBand(segmentationNode, volumeNode):
        """The last run's uncertain band (``[k, j, i]`` bool on the volume's grid), or None."""
        shape = mrml.volume_array_and_matrix(volumeNode)[0].shape
        band = mrml.decode_mask(segmentationNode.GetAttribute(mrml.UNCERTAIN_ATTRIBUTE), shape)
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

    # -- fine-tuning ---------------------------------------------------------------------------------
    @staticmethod
    def datasetCaseCount(datasetFolder: str | Path | None) -> int | None:
        """How many training cases ``dataset.json`` lists (None: no dataset there, or unreadable)."""
        import json

        if not datasetFolder:
            return None
        try:
            entries = json.loads((Path(datasetFolder) / "dataset.json").read_text()).get("training")
        except (OSError, ValueError, AttributeError):
            return None
        return len(entries) if isinstance(entries, list) else None

    def startFineTune(self, datasetFolder: str | Path, modelPath: str | Path | None = None, device: str = "auto",
                      iterations: int | None = None, outputFolder: str | Path | None = None) -> TrainRun:
        """Fine-tune the model on the dataset's cases in an engine process of its own (the recipe and the
        regression guard of ``LiverSegExtension.finetune``); poll the run, then ``finishFineTune(run)``.
        The new model goes to a free ``<name>-v<version>`` folder of the user's models unless given."""
        from LiverSegExtension.catalog import default_model_dir, new_model_dir, read_card

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
        request = {"cmd": "train", "id": next(self._ids), "init": str(parent), "data": [str(datasetFolder)],
                   "output": str(output), "device": device, "iterations": iterations, "version": version}
        engine = EngineProcess().start()
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
        run.poll()
        if run.error is not None:
            if run.details:
                logging.error("LiverSeg: %s\n%s", run.error, run.details)
            raise run.error
        if not run.done:
            raise LiverSegError("the fine-tune has not finished")
        return run.result

    # -- export for training -------------------------------------------------------------------------
    def exportForTraining(self, inputVolume, segmentationNode, datasetFolder: str | Path, annotator: str = "",
                          draftMask=None, modelName: str | None = None) -> str:
        """Add the CT and its (corrected) Liver segment to an MSD dataset; returns the new case name."""
        from LiverSegExtension.dataset import add_case_arrays

        self._check_inputs(inputVolume)
        if segmentationNode is None:
            raise LiverSegError("no segmentation selected")
        segment_id = mrml.find_liver_segment(segmentationNode)
        if segment_id is None:
            raise LiverSegError(f"{segmentationNode.GetName()}: has no segment named 'Liver'")
        label = mrml.segment_mask(segmentationNode, segment_id, inputVolume)
        array, matrix = mrml.volume_array_and_matrix(inputVolume)
        if draftMask is None:  # a draft of another shape (the volume was cropped or resampled) is ignored
            draftMask = mrml.decode_mask(segmentationNode.GetAttribute(mrml.DRAFT_ATTRIBUTE), array.shape)
        provenance = {
            "model": modelName or segmentationNode.GetAttribute("LiverSeg.Model") or None,
            "annotator": annotator or None,
        }
        return add_case_arrays(datasetFolder, array, label, matrix, provenance=provenance, draft=draftMask)
