"""``ReviewLogic``: review a batch's results case after case in the scene (main thread; no Qt).

A case's files are checked to be its row's first (``worklist.case_files``: the batch's record beside the mask
names the CT), then loaded as the batch loads them (``caseload``), the model's mask kept as the draft (the export
measures how much the annotator changed) and the uncertain band made when the probability map is beside the
mask. The previous case's nodes leave the scene first: the node count stays the same over a whole cohort.
Decisions go to ``review.csv`` (``LiverSegExtension.review.state``), recorded only while this annotator holds
the case. An export goes through the module's own export, with the batch row in its provenance; a case whose
export runs in the background keeps its nodes (hidden) until the export is recorded, so that a failed export
opens the annotator's correction again, never the model's mask. Moving on (Next case, another case or folder)
is refused while the open case's Liver segment holds changes that only Export and next would keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import slicer

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference import masktext
from LiverSegExtension.io import LIVER_SEGMENT
from LiverSegExtension.review.state import ReviewState, default_annotator
from LiverSegExtension.review.worklist import ReviewCase, case_files, probability_beside, read_worklist
from LiverSegLib import mrml
from LiverSegLib.caseload import load_ct, on_volume_grid, read_mask, volumes_logic
from LiverSegLib.reviewexports import ReviewExports, _Export


class ReviewLogic(ReviewExports):
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
        self.again = False  # the open case was opened as a re-review: its decision replaces the earlier one
        self.modelMask = False  # the open case has a model's mask with liver in it (what Accept accepts)
        self._nodes: list[Any] = []  # the nodes the current case's loading added (display, storage... included)
        self._exports: list[_Export] = []  # exports not yet recorded
        self._parked: dict[tuple[str, str], tuple[list[Any], Any, Any]] = {}  # (folder, key) -> nodes kept
        self._failed: dict[tuple[str, str], str] = {}  # (folder, key) -> why its export failed
        self._said: list[str] = []  # what finished exports say, until pollExports hands it on
        self._volumes = None

    def _id(self, key: str, folder: Path | None = None) -> tuple[str, str]:
        return str(folder or self.folder), key

    # -- the worklist -----------------------------------------------------------------------------------
    def open(self, folder: str | Path, who: str = "") -> list[ReviewCase]:
        """Read a batch output folder's summary and review state; the cases, most in need of review first. The
        case open until now leaves the scene, still claimed (resumed when its folder is opened again)."""
        folder = Path(folder)
        cases = read_worklist(folder)  # raises before anything changes
        self._keepEdits("opening another folder would lose that")
        self.close()
        self.folder, self.cases, self.who = folder, cases, who.strip() or default_annotator()
        kwargs = {"claim_minutes": self.claim_minutes} if self.claim_minutes is not None else {}
        self.state = ReviewState(folder, **kwargs)
        return cases

    def _state(self) -> ReviewState:
        if self.state is None:
            raise LiverSegError("open a batch output folder first")
        return self.state

    def _case(self, key: str) -> ReviewCase:
        case = next((c for c in self.cases if c.key == key), None)
        if case is None:
            raise LiverSegError(f"{key}: not a case of {self.folder}")
        return case

    def _pending(self) -> set[str]:
        return {e.case.key for e in self._exports if e.folder == self.folder}

    def rows(self, onlyPending: bool = False) -> list[dict[str, Any]]:
        """The table: name, status, liver mL, uncertainty, warning and review state of each case, in order."""
        state, records = self._state(), self._state().records()
        pending = self._pending()
        rows = []
        for case in self.cases:
            record = records.get(case.key, {})
            decision = record.get("decision", "")
            if case.key in pending:
                text = "exporting"
            elif self._id(case.key) in self._failed:
                text = "export failed: open it to retry"
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
                         "uncertainty": case.uncertainty, "warning": case.warning or case.error, "review": text,
                         "decision": decision, "who": record.get("who", "")})
        return rows

    def progress(self) -> tuple[int, int]:
        """(cases reviewed, cases in the folder)."""
        records = self._state().records()
        return sum(1 for c in self.cases if records.get(c.key, {}).get("decision")), len(self.cases)

    # -- moving through it ------------------------------------------------------------------------------
    def next(self) -> ReviewCase | None:
        """Claim and load the case to review now: the one this annotator left open (after a restart, or one whose
        export failed), else the first free one; None when none is left (the scene is then cleared). A case open
        now goes back to the worklist undecided and another comes; refused when its Liver segment was changed."""
        left = self.current
        if left is None:
            return self._advance()
        self._keepEdits("Next case would lose that")
        key = self._claimNext(exclude={left.key})
        if key is None:
            raise LiverSegError(f"{left.name} is the only case left to review here: decide it")
        self._state().release(left.key, self.who)
        return self._load(self._case(key))

    def _claimNext(self, exclude: set[str] = frozenset()) -> str | None:
        keys = [c.key for c in self.cases if c.key not in self._pending() and c.key not in exclude]
        return self._state().claim_next(self.who, keys, {c.key: c.name for c in self.cases})

    def _advance(self) -> ReviewCase | None:
        """After a decision: the next case claimed and loaded, or None (the scene cleared of the last one)."""
        key = self._claimNext()
        if key is None:
            self.clear()
            return None
        return self._load(self._case(key))

    def openCase(self, key: str, again: bool = False) -> ReviewCase:
        """Claim and load one case (from the table); refused while another annotator holds it, and for a decided
        case unless ``again`` (a re-review: its decision then replaces the earlier one, which is kept)."""
        case, state, left = self._case(key), self._state(), self.current
        if left is not None and left.key == key and self.volume is not None and again == self.again:
            return left  # open already: nothing is read again, the annotator's changes stay
        if key in self._pending():
            raise LiverSegError(f"{case.name}: its export is under way; it opens again once the export is recorded")
        if left is not None and left.key != key:
            self._keepEdits("opening another case would lose that")
        state.claim(key, self.who, case.name, again=again)
        if left is not None and left.key != key:
            state.release(left.key, self.who)  # the case left undecided goes back to the worklist
        return self._load(case, again)

    def renew(self) -> list[str]:
        """Keep this annotator's cases claimed (the open one, and those whose export runs or failed); the names of
        those another annotator holds now (the claim ran out): their decisions would not be recorded."""
        held = [(e.state, e.case) for e in self._exports]
        if self.current is not None and self.state is not None:
            held.append((self.state, self.current))
        held += [(self.state, c) for c in self.cases if self._id(c.key) in self._failed and self.state is not None]
        return [case.name for state, case in held if not state.renew(case.key, self.who)]

    @property
    def holds(self) -> bool:
        """Whether this annotator holds cases to keep claimed: an open one, or one whose export runs or failed."""
        return self.current is not None or bool(self._exports) or bool(self._failed)

    def clear(self) -> None:
        """Remove the nodes loading the current case added, and only those (the annotator's own stay); the case
        stays claimed: coming back resumes it."""
        self._remove(self._nodes)
        self._nodes, self.current, self.volume, self.segmentation = [], None, None, None
        self.again, self.modelMask = False, False

    def _remove(self, nodes: list[Any]) -> None:
        for node in nodes:  # by the node itself: IDs may be given again after the scene was closed
            if node is not None and self.scene.IsNodePresent(node) and not node.GetSingletonTag():
                self.scene.RemoveNode(node)

    def close(self) -> None:
        self.clear()
        self.state, self.cases = None, []

    def leave(self) -> None:
        """Every node of the review leaves the scene (Slicer closes, the panel is rebuilt, the scene was closed);
        the open case stays claimed, so Next case resumes it. Wait for the exports first (``pollExports``)."""
        self.clear()
        for nodes, _, _ in self._parked.values():
            self._remove(nodes)
        self._parked.clear()

    def _load(self, case: ReviewCase, again: bool = False) -> ReviewCase:
        self.clear()
        if self._volumes is None:
            self._volumes = volumes_logic(self.scene)
        self.current, self.again = case, again  # a case that fails to load is still the open one (to skip)
        self._failed.pop(self._id(case.key), None)
        parked = self._parked.pop(self._id(case.key), None)
        if parked is not None and all(self.scene.IsNodePresent(n) for n in parked[1:]):  # the annotator's own work
            self._nodes, self.volume, self.segmentation = parked
            self.segmentation.SetDisplayVisibility(True)
            label, draft = self._labelAndDraft()
            self.modelMask = draft is not None and bool(draft.any())
            shape = self.volume.GetImageData().GetDimensions()[::-1]
            self._show(self.volume, next(m for m in (label, draft, np.zeros(shape, np.uint8)) if m is not None))
            return case
        self._remove(parked[0] if parked else [])
        before = mrml.node_ids(self.scene)
        try:
            volume, segmentation, mask = self._read(case)
        except Exception:  # nothing of a case that cannot be shown stays
            mrml.remove_nodes_added_since(self.scene, before)
            raise
        self._nodes = [self.scene.GetNodeByID(i) for i in mrml.node_ids(self.scene) - before]
        self.volume, self.segmentation, self.modelMask = volume, segmentation, bool(mask.any())
        segmentation.SetDisplayVisibility(True)
        self._show(volume, mask)
        return case

    def _read(self, case: ReviewCase) -> tuple[Any, Any, np.ndarray]:
        """(volume, segmentation, mask) of a case, its nodes added to the scene."""
        node_name = case.name.replace("/", "_")
        ct, mask_path = case_files(case, self.folder)  # this row's files, or a LiverSegError
        volume = load_ct(self._volumes, self.scene, ct, node_name, read_before=case.status in ("ok", "warning", "empty"))
        mask, algorithm = read_mask(mask_path, ct, volume, case.name)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{node_name} liver")
        # The Liver segment as every door writes it, without its 3D surface: that takes half a second on a large
        # CT, once per case, for a view the annotator opens on request (Show 3D).
        mrml.write_segment(segmentation, volume, mask, mrml.SEGMENT_NAME, LIVER_SEGMENT["color"],
                           LIVER_SEGMENT["terminology"])
        mrml.place_beside(segmentation, volume)
        segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, masktext.encode_mask(mask))
        model = case.row.get("model") or algorithm
        if model:
            segmentation.SetAttribute(mrml.MODEL_ATTRIBUTE, model)
        probability_path = probability_beside(mask_path)
        if probability_path is not None:
            from LiverSegExtension.inference.masktext import uncertain_band
            from LiverSegExtension.io import read_image

            probability = on_volume_grid(read_image(probability_path), volume, str(probability_path))
            segmentation.SetAttribute(mrml.UNCERTAIN_ATTRIBUTE, masktext.encode_mask(uncertain_band(probability)))
        return volume, segmentation, mask

    def _show(self, volume, mask: np.ndarray) -> None:
        """The CT in every slice view, centred on the liver (on the CT's centre when there is none)."""
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
        if not self._present():
            raise LiverSegError(f"{self.current.name}: its CT or segmentation is not in the scene (skip it, or open "
                                "it again)")
        return self.current, self.volume, self.segmentation

    def _present(self) -> bool:
        return all(node is not None and self.scene.IsNodePresent(node) for node in (self.volume, self.segmentation))

    def _labelAndDraft(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(the Liver segment now, the model's mask) on the open case's grid; None for what is not there."""
        segment_id = mrml.find_liver_segment(self.segmentation)
        label = mrml.segment_mask(self.segmentation, segment_id, self.volume) if segment_id else None
        shape = self.volume.GetImageData().GetDimensions()[::-1]
        return label, masktext.decode_mask(self.segmentation.GetAttribute(mrml.DRAFT_ATTRIBUTE), shape)

    def edited(self) -> bool:
        """Whether the open case's Liver segment differs from the model's mask (what moving on would lose)."""
        if self.current is None or not self._present():
            return False
        label, draft = self._labelAndDraft()
        return label is not None and draft is not None and not np.array_equal(label > 0, draft > 0)

    def _keepEdits(self, what: str) -> None:
        if self.edited():
            raise LiverSegError(f"{self.current.name}: its Liver segment was changed, and {what}: Export and next "
                                "keeps the correction, Skip records why it is not wanted")

    def accept(self) -> ReviewCase | None:
        """The model's mask is right as it is: recorded (Dice 1), then the next case. Refused for a case without
        a model's mask (the batch failed on it, or found no liver), and once the segment was changed."""
        from LiverSegExtension.data.metrics import dice, volume_ml

        case, volume, segmentation = self._open()
        if not self.modelMask:
            raise LiverSegError(f"{case.name}: no model's mask to accept (the batch failed on it or found no liver): "
                                "draw the liver and Export and next, or Skip it with a reason")
        label, draft = self._labelAndDraft()
        if label is None or draft is None or not np.array_equal(label > 0, draft > 0):
            score = dice(label, draft) if label is not None and draft is not None else 0.0
            raise LiverSegError(f"{case.name}: the Liver segment was changed (Dice {score:.3f} with the model's mask): "
                                "Export and next keeps the correction; Accept is for a mask left as the model made it")
        self._state().decide(case.key, self.who, "accepted", case.name, dice_changed=1.0, again=self.again,
                             liver_ml=volume_ml(label, volume.GetSpacing()),
                             model=segmentation.GetAttribute(mrml.MODEL_ATTRIBUTE) or "")
        return self._advance()

    def skip(self, reason: str) -> ReviewCase | None:
        """Not for the dataset (unreadable, wrong series, too hard): recorded with the reason, then the next case."""
        if self.current is None:
            raise LiverSegError("no case is open")
        self._state().decide(self.current.key, self.who, "skipped", self.current.name, reason=reason, again=self.again)
        return self._advance()
