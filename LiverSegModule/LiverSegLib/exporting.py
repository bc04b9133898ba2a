"""Export for training: the CT and its (corrected) Liver segment added to an MSD dataset with provenance (the model,
the annotator, the one-click fixes, how much the model's draft was changed). The panel's export hands the
compression and hashing to the engine process; scripts export in their own process. Part of the module's logic
(``LiverSegLogic``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from LiverSegExtension import protocol
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegLib import mrml
from LiverSegLib.corrections import FIXES_ATTRIBUTE
from LiverSegLib.engine import SegmentRun, outcome


class ExportMixin:
    """Mixed into ``LiverSegLogic``: uses its ``_check_inputs``, ``engine()`` and ``_ids``."""

    def _exportInputs(self, inputVolume, segmentationNode, draftMask=None):
        """(CT array, IJK-to-RAS, Liver label, draft or None) of what is exported."""
        self._check_inputs(inputVolume)
        if segmentationNode is None:
            raise LiverSegError("no segmentation selected")
        segment_id = mrml.find_liver_segment(segmentationNode)
        if segment_id is None:
            raise LiverSegError(f"{segmentationNode.GetName()}: has no segment named 'Liver'")
        label = mrml.segment_mask(segmentationNode, segment_id, inputVolume)
        if not label.any():  # said here, before anything is written or handed on (the dataset refuses it too)
            raise LiverSegError(f"{segmentationNode.GetName()}: the Liver segment is empty: nothing to export")
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
            record = export_provenance(segmentationNode, annotator, modelName, provenance)
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
            return protocol.exported_case(outcome(run, "the export"))
        finally:
            run.cleanup()

    def exportForTraining(self, inputVolume, segmentationNode, datasetFolder: str | Path, annotator: str = "",
                          draftMask=None, modelName: str | None = None, provenance: dict[str, Any] | None = None) -> str:
        """Add the CT and its (corrected) Liver segment to an MSD dataset, in this process (scripts; the panel
        uses ``startExport``); returns the new case name. ``provenance``: more to record with it (a review's
        batch row)."""
        from LiverSegExtension.data.dataset import add_case_arrays

        array, matrix, label, draftMask = self._exportInputs(inputVolume, segmentationNode, draftMask)
        record = export_provenance(segmentationNode, annotator, modelName, provenance)
        return add_case_arrays(datasetFolder, array, label, matrix, provenance=record, draft=draftMask)


def export_provenance(segmentationNode, annotator: str, modelName: str | None,  # noqa: ANN001 - an MRML node
                      provenance: dict[str, Any] | None) -> dict[str, Any]:
    """What an export records of its case, in both ways of exporting: the model that made the draft, the
    annotator, the one-click fixes applied, and what the caller adds (a review's batch row)."""
    return {"model": modelName or segmentationNode.GetAttribute(mrml.MODEL_ATTRIBUTE) or None,
            "annotator": annotator or None,
            "one_click_fixes": json.loads(segmentationNode.GetAttribute(FIXES_ATTRIBUTE) or "[]") or None,
            **(provenance or {})}
