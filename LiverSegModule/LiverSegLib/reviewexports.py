"""Export and next, in the review: the open case's (corrected) Liver segment into the dataset through the
module's export, its provenance naming the batch row, then the next case. In the panel the export's compression
runs in the engine process while the next case loads; the exported case's nodes stay in the scene, hidden, until
the export is recorded, so that a failed one (a full disk, an unwritable folder) opens the annotator's
correction again to retry, and never the model's mask. An image and label the dataset holds already are
recorded as exported there. Part of ``ReviewLogic``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.review.state import ReviewState
from LiverSegExtension.review.worklist import ReviewCase
from LiverSegLib import mrml

#: the dataset's refusal of an image and label it holds already (``data.dataset.add_case_images``)
ALREADY = re.compile(r"already case (?P<name>[A-Za-z0-9_.-]+); nothing added")


@dataclass
class _Export:
    """An export under way in the engine process, and where its decision goes."""

    run: Any
    case: ReviewCase
    dataset: str
    state: ReviewState
    folder: Path
    again: bool


def already_in(exc: Exception) -> str | None:
    """The dataset case an export was refused for being already (the same image and label), else None."""
    match = ALREADY.search(str(exc))
    return match["name"] if match else None


class ReviewExports:
    """Mixed into ``ReviewLogic``: uses its ``exporter``, ``who``, ``folder``, ``again``, ``_open``, ``_state``,
    ``_advance``, ``_id``, ``_remove`` and ``_nodes``; holds ``_exports``, ``_parked``, ``_failed`` and ``_said``
    (made by ``ReviewLogic``)."""

    def exportAndNext(self, datasetFolder: str | Path, background: bool = True) -> ReviewCase | None:
        """The (corrected) Liver segment into the dataset through the module's export, its provenance naming the
        batch row; then the next case. In the background (the panel) the export's compression runs in the
        engine process while the next case loads, the case's nodes kept hidden until ``pollExports`` records
        it. An empty segment is refused before anything moves; an image and label the dataset holds already
        are recorded as exported there."""
        case, volume, segmentation = self._open()
        if not str(datasetFolder or "").strip():
            raise LiverSegError("choose the dataset folder (under Export for training) first")
        provenance = {"review": {"summary": str(self.folder / "summary.csv"), "row": case.row}}
        model = segmentation.GetAttribute(mrml.MODEL_ATTRIBUTE) or None
        state, dataset = self._state(), str(datasetFolder)
        if background:
            self._said = self.pollExports(wait=True)  # one at a time: runs on one engine must not read each other's
            run = self.exporter.startExport(volume, segmentation, datasetFolder, annotator=self.who, modelName=model,
                                            provenance=provenance)
            self._exports.append(_Export(run, case, dataset, state, self.folder, self.again))
            segmentation.SetDisplayVisibility(False)
            self._parked[self._id(case.key)] = (self._nodes, volume, segmentation)
            self._nodes = []  # kept until the export is recorded: clear() leaves them
        else:
            try:
                name = self.exporter.exportForTraining(volume, segmentation, datasetFolder, annotator=self.who,
                                                       modelName=model, provenance=provenance)
            except LiverSegError as exc:
                name = already_in(exc)
                if name is None:
                    raise
            self._recordExport(state, case, dataset, name, self.again)
        return self._advance()

    def _recordExport(self, state: ReviewState, case: ReviewCase, dataset: str, name: str, again: bool) -> None:
        record = json.loads((Path(dataset) / "provenance" / f"{name}.json").read_text())
        state.decide(case.key, self.who, "exported", case.name, dice_changed=record.get("draft_final_dice"),
                     again=again, liver_ml=record.get("liver_ml"), dataset=dataset, dataset_case=name,
                     model=record.get("model") or "")

    def pollExports(self, wait: bool = False) -> list[str]:
        """Record the exports that have finished (all of them, with ``wait``); what to tell the annotator of each."""
        messages, still, self._said = self._said, [], []
        for export in self._exports:
            if wait:
                export.run.wait(600)  # a generous bound: an export takes seconds
            if export.run.poll():
                messages.append(self._finishExport(export))
            else:
                still.append(export)
        self._exports = still
        return messages

    def _finishExport(self, export: _Export) -> str:
        """Record a finished export; a failed one keeps the case claimed and its nodes, to open again and retry."""
        case, ident = export.case, self._id(export.case.key, export.folder)
        try:
            name = self.exporter.finishExport(export.run)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the correction must not be lost
            name = already_in(exc)
            if name is None:
                if not isinstance(exc, LiverSegError):
                    logging.exception("LiverSeg: the export of %s failed", case.name)
                self._failed[ident] = str(exc)
                kept = ("your correction is kept: Next case (or a double click on it) opens it again to retry"
                        if ident in self._parked else "open it again to redo it")
                return f"{case.name}: export failed: {exc}; {kept}."
        nodes = self._parked.pop(ident, ([], None, None))[0]
        self._remove(nodes)
        try:
            self._recordExport(export.state, case, export.dataset, name, export.again)
        except Exception as exc:  # noqa: BLE001 - in the dataset, not in review.csv: said, not raised
            return f"{case.name} exported as {name}, but {exc}"
        return f"{case.name} exported as {name}."

    @property
    def exporting(self) -> bool:
        return bool(self._exports)
