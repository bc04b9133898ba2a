"""``ReviewLogic``: review a batch's results case after case in the scene (main thread; no Qt).

A case is loaded as the batch loads it: the CT through Slicer's volume reader (a volume file, or a DICOM series
from its own files in slice order), its mask (``.nii.gz``, ``.nrrd``, ``.seg.nrrd`` through Slicer's
segmentation reader, or a DICOM SEG) as the "Liver" segment, checked to lie on the CT's grid, with the model's
mask kept as the draft (the export measures how much the annotator changed) and the uncertain band when the
probability map is beside the mask. The previous case's nodes leave the scene first: the node count stays the
same over a whole cohort. Decisions go to ``review.csv`` (``LiverSegExtension.review.state``); an export goes
through the module's own export, with the batch row in its provenance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegExtension.io import LIVER_SEGMENT, InputCase
from LiverSegExtension.review.state import ReviewState, default_annotator
from LiverSegExtension.review.worklist import ReviewCase, ct_input, read_worklist
from LiverSegLib import mrml

MODEL_ATTRIBUTE = "LiverSeg.Model"


def volumes_logic(scene):
    """Slicer's volumes logic (the one the batch reads with); a logic of its own on a scene outside Slicer."""
    modules = getattr(slicer, "modules", None)
    if scene is slicer.mrmlScene and hasattr(modules, "volumes"):
        return modules.volumes.logic()
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    return logic


def load_ct(volumes, scene, ct: InputCase, name: str, read_before: bool = False):
    """The CT as a scalar volume node, read as the batch reads it (a series from its files in slice order).
    ``read_before``: the batch read the whole file already (its row says so): a .nii.gz's header is checked
    against its length, and the stream (half a second for a 512x512x130 CT) is not decompressed once more."""
    import vtk

    from LiverSegExtension import io

    for path in ct.files or (ct.source,):
        io.check_name_encoding(path)  # ITK would abort the process
    if ct.files:
        io.check_series_layout(ct)
        files = io.series_files_in_order(ct)
        names = vtk.vtkStringArray()
        for file in files:
            names.InsertNextValue(file)
        node = volumes.AddArchetypeScalarVolume(files[0], name, 0, names)
    else:
        if ct.source.name.lower().endswith((".nii", ".nii.gz")):
            io.check_nifti_length(ct.source, check_stream=not read_before)
        io.check_data_files_beside(ct.source)
        node = volumes.AddArchetypeVolume(str(ct.source), name, 0)
    if node is None or node.GetImageData() is None:
        if node is not None:
            scene.RemoveNode(node)
        raise LiverSegError(f"{ct.label}: Slicer could not read this CT")
    if ct.files:
        array, matrix = mrml.volume_array_and_matrix(node)
        io.check_loaded_grid(ct, matrix, array.shape)
    return node


def on_volume_grid(image, volume, what: str) -> np.ndarray:
    """A SimpleITK mask (or probability map) on the volume's grid (``masks.on_grid``)."""
    from LiverSegExtension.review.masks import on_grid

    array, matrix = mrml.volume_array_and_matrix(volume)
    return on_grid(image, array.shape, matrix, what)


def seg_nrrd_mask(path: Path, volume) -> np.ndarray:
    """The "Liver" segment (or the only one) of a Slicer segmentation file, on the volume's grid; the file's
    nodes leave the scene again."""
    scene = volume.GetScene()
    before = mrml.node_ids(scene)
    try:
        node = slicer.util.loadSegmentation(str(path))
        if node is None:
            raise LiverSegError(f"{path}: Slicer could not read this segmentation")
        segmentation = node.GetSegmentation()
        segment_id = mrml.find_liver_segment(node) or (
            segmentation.GetNthSegmentID(0) if segmentation.GetNumberOfSegments() == 1 else None)
        if segment_id is None:
            raise LiverSegError(f"{path}: no segment named 'Liver' among its {segmentation.GetNumberOfSegments()}")
        label = segmentation.GetSegment(segment_id).GetLabelValue()
        own = int(np.count_nonzero(slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id) == label))
        mask = mrml.segment_mask(node, segment_id, volume)
        if int(mask.sum()) != own:
            raise LiverSegError(f"{path}: does not lie on this CT's grid ({int(mask.sum())} of {own} voxels land "
                                "on it): is it this patient's?")
        return mask
    finally:
        mrml.remove_nodes_added_since(scene, before)


def read_mask(case: ReviewCase, ct: InputCase, volume) -> tuple[np.ndarray, str]:
    """(the case's mask on the volume's grid, the model that made it where the file says); an empty mask for a
    case without one (failed, or no liver found)."""
    from LiverSegExtension.io import read_image

    if case.mask is None:
        return np.zeros(mrml.volume_array_and_matrix(volume)[0].shape, np.uint8), ""
    if not case.mask.exists():
        raise LiverSegError(f"{case.mask}: the mask summary.csv records for {case.name} is not there")
    name = case.mask.name.lower()
    if name.endswith(".seg.nrrd"):
        return seg_nrrd_mask(case.mask, volume), ""
    algorithm = ""
    if name.endswith(".dcm"):
        from LiverSegExtension.review.masks import dicom_seg_mask

        image, algorithm = dicom_seg_mask(case.mask, ct)
    else:
        image = read_image(case.mask)
    mask = on_volume_grid(image, volume, str(case.mask))
    return np.minimum(mask, 1, out=mask), algorithm  # any label value is liver (a mask of 0 and 255, say)


class ReviewLogic:
    """One annotator's review of one batch output folder in a scene. ``logic`` is the module's logic; exports
    go through ``exporter`` (a logic of its own in the panel: its engine process then serves the review alone,
    and a segmentation in the panel never reads an export's answer)."""

    def __init__(self, logic, scene=None, claim_minutes: float | None = None, exporter=None) -> None:
        self.logic = logic
        self.exporter = exporter if exporter is not None else logic
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.claim_minutes = claim_minutes
        self.folder: Path | None = None
        self.state: ReviewState | None = None
        self.cases: list[ReviewCase] = []
        self.who = ""
        self.current: ReviewCase | None = None
        self.volume = None
        self.segmentation = None
        self._nodes: list[Any] = []  # the nodes the current case's loading added (display, storage... included)
        self._exports: list[tuple[Any, ReviewCase, str, ReviewState]] = []  # exports not yet recorded, and where
        self._said: list[str] = []  # what finished exports say, until pollExports hands it on
        self._volumes = None

    # -- the worklist -----------------------------------------------------------------------------------
    def open(self, folder: str | Path, who: str = "") -> list[ReviewCase]:
        """Read a batch output folder's summary and review state; the cases, most in need of review first."""
        folder = Path(folder)
        cases = read_worklist(folder)  # raises before anything changes
        self.close()
        self.folder, self.cases, self.who = folder, cases, who.strip() or default_annotator()
        kwargs = {"claim_minutes": self.claim_minutes} if self.claim_minutes is not None else {}
        self.state = ReviewState(folder, **kwargs)
        return cases

    def _state(self) -> ReviewState:
        if self.state is None:
            raise LiverSegError("open a batch output folder first")
        return self.state

    def rows(self, onlyPending: bool = False) -> list[dict[str, Any]]:
        """The table: name, status, liver mL, uncertainty, warning and review state of each case, in order."""
        state, records = self._state(), self._state().records()
        pending = {e[1].key for e in self._exports}
        rows = []
        for case in self.cases:
            record = records.get(case.key, {})
            decision = record.get("decision", "")
            if case.key in pending:
                text = "exporting"
            elif state.claimed_by_other(record, self.who):
                text = f"in review by {record['claimed_by']}"
            elif decision == "exported":
                text = f"exported (Dice {float(record.get('dice_changed') or 'nan'):.3f})"
            elif decision:
                text = decision + (f": {record['reason']}" if record.get("reason") else "")
            else:
                text = "open" if case is self.current else "not reviewed"
            if onlyPending and (decision or case.key in pending):
                continue
            rows.append({"key": case.key, "name": case.name, "status": case.status, "liver_ml": case.liver_ml,
                         "uncertainty": case.uncertainty, "warning": case.warning or case.error, "review": text})
        return rows

    def progress(self) -> tuple[int, int]:
        """(cases reviewed, cases in the folder)."""
        records = self._state().records()
        return sum(1 for c in self.cases if records.get(c.key, {}).get("decision")), len(self.cases)

    # -- moving through it ------------------------------------------------------------------------------
    def next(self) -> ReviewCase | None:
        """Claim and load the case to review now (the one this annotator left open, else the first free one);
        None when none is left (the scene is then cleared of the last case)."""
        pending = {e[1].key for e in self._exports}
        keys = [c.key for c in self.cases if c.key not in pending]
        key = self._state().claim_next(self.who, keys, {c.key: c.name for c in self.cases})
        if key is None:
            self.clear()
            return None
        return self._load(next(c for c in self.cases if c.key == key))

    def openCase(self, key: str) -> ReviewCase:
        """Claim and load one case (from the table); refused while another annotator holds it."""
        case = next((c for c in self.cases if c.key == key), None)
        if case is None:
            raise LiverSegError(f"{key}: not a case of {self.folder}")
        state = self._state()
        state.claim(key, self.who, case.name)
        left = self.current
        if left is not None and left.key != key and all(left.key != e[1].key for e in self._exports):
            state.release(left.key, self.who)  # the case left undecided goes back to the worklist
        return self._load(case)

    def renew(self) -> bool:
        """Keep the open case claimed (the panel calls this while the case is open)."""
        return self.current is not None and self._state().renew(self.current.key, self.who)

    def clear(self) -> None:
        """Remove the nodes loading the current case added, and only those (the annotator's own stay); the case
        stays claimed: coming back resumes it."""
        for node in self._nodes:  # by the node itself: IDs may be given again after the scene was closed
            if self.scene.IsNodePresent(node) and not node.GetSingletonTag():
                self.scene.RemoveNode(node)
        self._nodes, self.current, self.volume, self.segmentation = [], None, None, None

    def close(self) -> None:
        self.clear()
        self.state, self.cases = None, []

    def _load(self, case: ReviewCase) -> ReviewCase:
        self.clear()
        if self._volumes is None:
            self._volumes = volumes_logic(self.scene)
        before = mrml.node_ids(self.scene)
        self.current = case  # a case that fails to load is still the open one (to skip)
        try:
            volume, segmentation, mask = self._read(case)
        except Exception:  # nothing of a case that cannot be shown stays
            mrml.remove_nodes_added_since(self.scene, before)
            raise
        self._nodes = [self.scene.GetNodeByID(i) for i in mrml.node_ids(self.scene) - before]
        self.volume, self.segmentation = volume, segmentation
        self._show(volume, segmentation, mask)
        return case

    def _read(self, case: ReviewCase) -> tuple[Any, Any, np.ndarray]:
        """(volume, segmentation, mask) of a case, its nodes added to the scene."""
        node_name = case.name.replace("/", "_")
        ct = ct_input(case, self.folder)
        volume = load_ct(self._volumes, self.scene, ct, node_name, read_before=case.status in ("ok", "warning", "empty"))
        mask, algorithm = read_mask(case, ct, volume)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{node_name} liver")
        # The Liver segment as every door writes it, without its 3D surface: that takes half a second on a large
        # CT, once per case, for a view the annotator opens on request (Show 3D).
        mrml.write_segment(segmentation, volume, mask, mrml.SEGMENT_NAME, LIVER_SEGMENT["color"],
                           LIVER_SEGMENT["terminology"])
        mrml.place_beside(segmentation, volume)
        segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, masktext.encode_mask(mask))
        model = case.row.get("model") or algorithm
        if model:
            segmentation.SetAttribute(MODEL_ATTRIBUTE, model)
        if case.probability is not None:
            from LiverSegExtension.inference.masktext import uncertain_band
            from LiverSegExtension.io import read_image

            probability = on_volume_grid(read_image(case.probability), volume, str(case.probability))
            segmentation.SetAttribute(mrml.UNCERTAIN_ATTRIBUTE, masktext.encode_mask(uncertain_band(probability)))
        return volume, segmentation, mask

    def _show(self, volume, segmentation, mask: np.ndarray) -> None:
        """The CT in every slice view, centred on the liver (on the CT's centre when there is none)."""
        segmentation.SetDisplayVisibility(True)
        slicer.util.setSliceViewerLayers(background=volume, fit=hasattr(slicer.app, "layoutManager"))
        shape = np.array(mask.shape)
        found = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        k, j, i = ((f[0] + f[-1]) / 2 if len(f) else (n - 1) / 2 for f, n in zip(found, shape))
        ras = (mrml.volume_array_and_matrix(volume)[1] @ np.array([i, j, k, 1.0]))[:3]
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            self.scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByCentering(*ras)

    # -- deciding -----------------------------------------------------------------------------------------
    def _open(self) -> tuple[ReviewCase, Any, Any]:
        if self.current is None:
            raise LiverSegError("no case is open")
        if not all(node is not None and self.scene.IsNodePresent(node) for node in (self.volume, self.segmentation)):
            raise LiverSegError(f"{self.current.name}: its CT or segmentation is not in the scene (skip it, or open "
                                "it again)")
        return self.current, self.volume, self.segmentation

    def accept(self) -> ReviewCase | None:
        """The model's mask is right as it is: recorded (Dice 1), then the next case."""
        from LiverSegExtension.data.metrics import dice, volume_ml

        case, volume, segmentation = self._open()
        segment_id = mrml.find_liver_segment(segmentation)
        label = mrml.segment_mask(segmentation, segment_id, volume) if segment_id else None
        draft = masktext.decode_mask(segmentation.GetAttribute(mrml.DRAFT_ATTRIBUTE), volume.GetImageData().GetDimensions()[::-1])
        if label is None or draft is None or not np.array_equal(label > 0, draft > 0):
            score = dice(label, draft) if label is not None and draft is not None else 0.0
            raise LiverSegError(f"{case.name}: the Liver segment was changed (Dice {score:.3f} with the model's mask): "
                                "Export and next keeps the correction; Accept is for a mask left as the model made it")
        self._state().decide(case.key, self.who, "accepted", case.name, dice_changed=1.0,
                             liver_ml=volume_ml(label, volume.GetSpacing()),
                             model=segmentation.GetAttribute(MODEL_ATTRIBUTE) or "")
        return self.next()

    def skip(self, reason: str) -> ReviewCase | None:
        """Not for the dataset (unreadable, wrong series, too hard): recorded with the reason, then the next case."""
        if self.current is None:
            raise LiverSegError("no case is open")
        self._state().decide(self.current.key, self.who, "skipped", self.current.name, reason=reason)
        return self.next()

    def exportAndNext(self, datasetFolder: str | Path, background: bool = True) -> ReviewCase | None:
        """The (corrected) Liver segment into the dataset through the module's export, its provenance naming the
        batch row; then the next case. In the background (the panel) the export's compression runs in the
        engine process while the next case loads; ``pollExports`` records it when it is done."""
        case, volume, segmentation = self._open()
        if not str(datasetFolder or "").strip():
            raise LiverSegError("choose the dataset folder (under Export for training) first")
        provenance = {"review": {"summary": str(self.folder / "summary.csv"), "row": case.row}}
        model = segmentation.GetAttribute(MODEL_ATTRIBUTE) or None
        if background:
            self._said = self.pollExports(wait=True)  # one at a time: runs on one engine must not read each other's
            run = self.exporter.startExport(volume, segmentation, datasetFolder, annotator=self.who, modelName=model,
                                            provenance=provenance)
            self._exports.append((run, case, str(datasetFolder), self._state()))
        else:
            name = self.exporter.exportForTraining(volume, segmentation, datasetFolder, annotator=self.who,
                                                   modelName=model, provenance=provenance)
            self._recordExport(self._state(), case, str(datasetFolder), name)
        return self.next()

    def _recordExport(self, state: ReviewState, case: ReviewCase, dataset: str, name: str) -> None:
        record = json.loads((Path(dataset) / "provenance" / f"{name}.json").read_text())
        state.decide(case.key, self.who, "exported", case.name, dice_changed=record.get("draft_final_dice"),
                             liver_ml=record.get("liver_ml"), dataset=dataset, dataset_case=name,
                             model=record.get("model") or "")

    def pollExports(self, wait: bool = False) -> list[str]:
        """Record the exports that have finished (all of them, with ``wait``); what to tell the annotator of each."""
        messages, still, self._said = self._said, [], []
        for run, case, dataset, state in self._exports:  # the state of the folder the case is from
            if wait:
                run.wait(120)
            if not run.poll():
                still.append((run, case, dataset, state))
                continue
            try:
                name = self.exporter.finishExport(run)
                self._recordExport(state, case, dataset, name)
                messages.append(f"{case.name} exported as {name}.")
            except Exception as exc:  # the case stays claimed by this annotator: open it again to retry
                if not isinstance(exc, LiverSegError):
                    logging.exception("LiverSeg: the export of %s failed", case.name)
                messages.append(f"{case.name}: export failed: {exc}")
        self._exports = still
        return messages

    @property
    def exporting(self) -> bool:
        return bool(self._exports)
