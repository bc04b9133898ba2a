"""``LiverSegLogic``: the module's logic, usable without the GUI (scripts, batch runs, self-tests).

``process()`` runs synchronously; ``start()`` runs the engine on a worker thread and returns a Job,
and ``finish()`` writes the result on the main thread. The scene is only changed once a mask exists:
an error or a cancel leaves it as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # plain Python with only slicer-core (batch runs): the base adds nothing we use there
    ScriptedLoadableModuleLogic = object  # type: ignore[misc,assignment]

from LiverSegExtension.errors import CancelledError, LiverSegError
from LiverSegLib import mrml
from LiverSegLib.jobs import Job


@dataclass
class LiverSegRun:
    """What a finished run produced."""

    segmentation_node: Any
    segment_id: str
    liver_ml: float
    seconds: float
    model_name: str
    warnings: list[str] = field(default_factory=list)  # e.g. no liver found, or one on the patient's left


class LiverSegLogic(ScriptedLoadableModuleLogic):
    """Segment the liver of a scalar volume into a segmentation node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # type: ignore[arg-type]
        self._segmenters: dict[tuple[str, str], Any] = {}

    # -- parameters ------------------------------------------------------------------------------
    def getParameterNode(self):
        from LiverSeg import LiverSegParameterNode  # the wrapper class lives in the module file

        return LiverSegParameterNode(super().getParameterNode())

    # -- models and devices ------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list[Path]:
        from LiverSegExtension.model import list_models

        return list_models()

    @staticmethod
    def availableDevices() -> list[str]:
        from LiverSegExtension.devices import available_devices

        return available_devices()

    @staticmethod
    def modelCard(model_path: str | Path | None) -> dict[str, Any]:
        """The model's card for display; empty when there is no model or its card is unusable (the model
        selector must still open; running it then reports the engine's error)."""
        from LiverSegExtension.model import default_model_dir, read_card

        folder = Path(model_path) if model_path else default_model_dir()
        if folder is None:
            return {}
        try:
            return read_card(folder)
        except LiverSegError:
            return {}

    def segmenter(self, model_path: str | Path | None = None, device: str = "auto"):
        """A cached engine segmenter (loading a model takes a moment; reuse it across runs)."""
        from LiverSegExtension.inference import LiverSegmenter

        key = (str(model_path or ""), device)
        if key not in self._segmenters:
            self._segmenters[key] = LiverSegmenter(model_path or None, device=device)
        return self._segmenters[key]

    # -- running -------------------------------------------------------------------------------
    def _check_inputs(self, input_volume) -> None:
        if input_volume is None:
            raise LiverSegError("no input volume selected")
        if not input_volume.IsA("vtkMRMLScalarVolumeNode") or input_volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise LiverSegError(f"{input_volume.GetName()}: not a scalar CT volume")
        if input_volume.GetImageData() is None:
            raise LiverSegError(f"{input_volume.GetName()}: the volume holds no voxels")

    def start(self, input_volume, model_path: str | Path | None = None, device: str = "auto", cancel=None) -> Job:
        """Begin segmenting on a worker thread; poll the Job, then call ``finish``.

        ``cancel() -> bool`` (optional) is asked at every step, from the worker thread: it must not touch MRML.
        """
        self._check_inputs(input_volume)
        from LiverSegExtension.geometry import image_from_array

        segmenter = self.segmenter(model_path, device)
        # The ITK image is the worker's private copy of the voxels, made here on the main thread.
        image = image_from_array(*mrml.volume_array_and_matrix(input_volume))
        source = input_volume.GetName()

        def work(progress, cancel):
            try:
                return segmenter.segment_image(image, progress=progress, cancel=cancel, source=source)
            except MemoryError:
                raise LiverSegError(f"{source}: out of memory; close other data or use a smaller volume") from None
            except RuntimeError as exc:
                if "out of memory" in str(exc).lower():
                    raise LiverSegError(f"{source}: the device ran out of memory; try the CPU") from None
                raise

        job = Job(work, external_cancel=cancel)
        job.source = source  # type: ignore[attr-defined]
        job.model_name = segmenter.model.name  # type: ignore[attr-defined]
        return job.start()

    def finish(self, job: Job, input_volume, output_segmentation=None) -> LiverSegRun:
        """Write a finished job's mask into the scene (main thread), or raise its error unchanged."""
        job.wait()
        if job.error is not None:
            if isinstance(job.error, CancelledError):
                logging.info("LiverSeg: cancelled")
            elif isinstance(job.error, LiverSegError):
                logging.error("LiverSeg: %s", job.error)
            else:
                logging.error("LiverSeg failed:\n%s", job.details)
            raise job.error
        result = job.result
        scene = input_volume.GetScene()
        created = output_segmentation is None
        if created:
            output_segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{input_volume.GetName()} liver")
        try:
            segment_id = mrml.write_liver_segment(output_segmentation, input_volume, result.mask)
        except Exception:
            if created:
                scene.RemoveNode(output_segmentation)
            raise
        # Keep the model's draft and name with the node (saved with the scene, so a restart of Slicer
        # loses neither): the export measures how much the annotator changed.
        output_segmentation.SetAttribute("LiverSeg.Model", job.model_name)
        output_segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, mrml.encode_mask(result.mask))
        for warning in result.warnings:
            logging.warning("LiverSeg: %s", warning)
        return LiverSegRun(output_segmentation, segment_id, result.liver_ml, result.seconds, job.model_name,
                           list(result.warnings))

    def process(self, inputVolume, outputSegmentation=None, device: str = "auto", modelPath: str | None = None,
                progress=None, cancel=None) -> LiverSegRun:
        """Segment ``inputVolume`` into ``outputSegmentation`` (a new node when None), synchronously.

        ``progress(fraction, stage)`` is called on this thread; ``cancel() -> bool`` is asked at every step
        of the engine, from the worker thread.
        """
        job = self.start(inputVolume, modelPath, device, cancel=cancel)
        while not job.wait(0.1):
            if progress is not None:
                progress(job.fraction, job.stage)
        if progress is not None:
            progress(job.fraction, job.stage)
        return self.finish(job, inputVolume, outputSegmentation)

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
