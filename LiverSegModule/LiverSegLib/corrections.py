"""Where the model hesitates and the annotator's one-click fixes: the uncertain band kept with a segmentation node
(shown as the segment "Liver: uncertain", the views centred on its largest part) and Add here / Remove here on
the "Liver" segment, recorded on the node and undoable. Part of the module's logic (``LiverSegLogic``)."""

from __future__ import annotations

import json

import numpy as np

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegLib import mrml

FIXES_ATTRIBUTE = "LiverSeg.Fixes"  # the one-click fixes made on the node: JSON list, saved with the scene


class CorrectionsMixin:
    """Mixed into ``LiverSegLogic``; holds ``_undo`` (segmentation ID -> (mask, fixes) before each fix)."""

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
