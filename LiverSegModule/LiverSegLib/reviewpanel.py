"""The panel's Review section: a batch output folder's cases in a table (most in need of review first), one
click to a case, Accept / Export and next / Skip, progress always shown. The cases load and the decisions are
kept by :class:`LiverSegLib.review.ReviewLogic`; exports go to the dataset folder of "Export for training", so
the Fine-tune section picks up what the review filled.

The folder is opened once its path is finished (Return, or the focus leaving the box) or picked with the "..."
button, never while it is typed: CTK's path box says currentPathChanged on every keystroke. Errors of the
review (a folder, a case, a claim) are told in one line; nothing leaves a slot (see ``slots``).
"""

from __future__ import annotations

from pathlib import Path

import slicer

from LiverSegLib.progress import show_error
from LiverSegLib.review import ReviewLogic
from LiverSegLib.slots import reported

SETTINGS_REVIEW_FOLDER = "LiverSeg/ReviewFolder"
COLUMNS = ("Case", "Status", "Liver mL", "Uncertainty", "Warning", "Review")
RENEW_TICKS = 600  # the open case's claim is renewed every minute (600 ticks of 100 ms)


def _number(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


class ReviewPanel:
    """Built by the module's widget into its layout; ``widget`` gives the logic, the parameter node (annotator,
    the nodes the panel's tools work on) and the export folder."""

    def __init__(self, widget) -> None:
        import ctk
        import qt

        from LiverSegLib.logic import LiverSegLogic

        self.widget = widget
        self.review = ReviewLogic(widget.logic, exporter=LiverSegLogic(widget.logic.engineFactory))
        self._rows: list[dict] = []
        self._ticks = 0
        self.section = ctk.ctkCollapsibleButton()
        self.section.text = "Review"
        self.section.collapsed = True
        layout = qt.QVBoxLayout(self.section)
        self.folderEdit = ctk.ctkPathLineEdit()
        self.folderEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.folderEdit.showBrowseButton = False  # its own "..." below: a folder picked there opens at once
        self.folderEdit.toolTip = "A batch's output folder (the one holding summary.csv); Return opens it"
        self.browseButton = qt.QToolButton()
        self.browseButton.text, self.browseButton.toolTip = "...", "Choose a batch's output folder and open it"
        self._lost: set[str] = set()  # cases whose claim another annotator took (told once)
        self.pendingCheckBox = qt.QCheckBox()
        self.pendingCheckBox.text = "Only cases not yet reviewed"
        self.table = qt.QTableWidget()
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.table.toolTip = "Double-click a case to open it"
        self.progressLabel, self.caseLabel, self.statusLabel = qt.QLabel(), qt.QLabel(), qt.QLabel()
        for label in (self.caseLabel, self.statusLabel):
            label.wordWrap = True
        self.nextButton = self._button("Next case", "Open the case most in need of review that nobody holds")
        self.acceptButton = self._button("Accept", "The mask is right as the model made it: record it, open the next")
        self.exportButton = self._button("Export and next", "Add the corrected Liver segment to the dataset folder "
                                                            "(Export for training), open the next case")
        self.skipButton = self._button("Skip", "Not for the dataset: record why, open the next case")
        self.reasonEdit = qt.QLineEdit()
        self.reasonEdit.placeholderText = "Reason for skipping"
        layout.addWidget(self._row(qt, self.folderEdit, self.browseButton))
        layout.addWidget(self.pendingCheckBox)
        layout.addWidget(self.table)
        layout.addWidget(self.progressLabel)
        layout.addWidget(self.caseLabel)
        layout.addWidget(self._row(qt, self.nextButton, self.acceptButton, self.exportButton))
        layout.addWidget(self._row(qt, self.reasonEdit, self.skipButton))
        layout.addWidget(self.statusLabel)
        widget.layout.addWidget(self.section)

        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onPoll)
        self.folderEdit.currentPath = qt.QSettings().value(SETTINGS_REVIEW_FOLDER, "")
        self.openFolder(self.folderEdit.currentPath, quiet=True)  # the last folder, unless it is gone
        self.folderEdit.comboBox().lineEdit().connect("editingFinished()", self.onFolderEdited)
        self.browseButton.connect("clicked(bool)", self.onBrowse)
        # A closed scene takes the open case's nodes with it; removed with the widget's observers in cleanup().
        widget.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.pendingCheckBox.connect("toggled(bool)", lambda checked: self._guarded(self.fillTable))
        self.table.connect("cellDoubleClicked(int,int)", self.onCellDoubleClicked)
        self.nextButton.connect("clicked(bool)", lambda: self._decide(self.review.next))
        self.acceptButton.connect("clicked(bool)", lambda: self._decide(self.review.accept))
        self.exportButton.connect("clicked(bool)", lambda: self._decide(
            lambda: self.review.exportAndNext(self.widget.ui.exportFolderPathLineEdit.currentPath)))
        self.skipButton.connect("clicked(bool)", lambda: self._decide(lambda: self.review.skip(self.reasonEdit.text)))
        self.reasonEdit.connect("textChanged(QString)", lambda text: self._guarded(self.updateButtons))

    @staticmethod
    def _button(text: str, tip: str):
        import qt

        button = qt.QPushButton()
        button.text, button.toolTip = text, tip
        return button

    @staticmethod
    def _row(qt, *widgets):
        row = qt.QWidget()
        layout = qt.QHBoxLayout(row)
        for item in widgets:
            layout.addWidget(item)
        return row

    # -- the worklist ---------------------------------------------------------------------------------------
    def onFolderEdited(self) -> None:
        """Return in the folder box, or the focus leaving it: open the folder it names, if it is another one."""
        self._openChosen(self.folderEdit.currentPath)

    def onBrowse(self) -> None:
        """The "..." button: CTK's folder dialog (it sets the box's path), then that folder opens."""
        self.folderEdit.browse()
        self._openChosen(self.folderEdit.currentPath)

    def _openChosen(self, path: str) -> None:
        path = str(path or "").strip()
        folder = self.review.folder
        if not path or (folder is not None and Path(path).exists() and Path(path).resolve() == folder.resolve()):
            return  # the folder open now (the focus left the box unchanged): its case stays open
        if not Path(path).is_dir():
            self.statusLabel.text = f"{path}: no such folder"  # quiet: no dialog for a path being worked on
            return
        self.openFolder(path)

    def openFolder(self, path: str, quiet: bool = False) -> None:
        """Read a batch output folder's cases into the table; the folder open until now (and its case) stays
        open when this one cannot be read. What is wrong goes to the status line (and, unless ``quiet``, to a
        message)."""
        import qt

        if path:
            with reported("LiverSeg could not open the review folder.", self._say if quiet else self._tell):
                self.review.open(path, self._annotator())
                qt.QSettings().setValue(SETTINGS_REVIEW_FOLDER, path)
                self.statusLabel.text = "Next case opens the case most in need of review."
        self._refresh()

    def _annotator(self) -> str:
        p = self.widget._parameterNode
        return p.annotator if p is not None else ""

    def fillTable(self) -> None:
        import qt

        self._rows = self.review.rows(bool(self.pendingCheckBox.checked)) if self.review.state is not None else []
        self.table.setRowCount(len(self._rows))
        for r, row in enumerate(self._rows):
            cells = (row["name"], row["status"], _number(row["liver_ml"], 0), _number(row["uncertainty"], 3),
                     row["warning"], row["review"])
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(r, c, item)
        self.updateButtons()

    def onCellDoubleClicked(self, row: int, column: int = 0) -> None:
        """One click to a case; a decided one is opened for a re-review once the annotator says so."""
        if not 0 <= row < len(self._rows):
            return
        item = self._rows[row]
        again = bool(item["decision"])
        if again and not slicer.util.confirmYesNoDisplay(
                f"{item['name']}: {item['review']} by {item['who'] or 'someone'}. Review it again? Your decision will "
                "replace that one (which review.csv keeps).", windowTitle="LiverSeg review"):
            return
        self._decide(lambda: self.review.openCase(item["key"], again=again))

    # -- deciding ---------------------------------------------------------------------------------------------
    def _decide(self, step) -> None:
        """Run a step that ends with a case loaded (or none left); show where the review stands."""
        self.review.who = self._annotator().strip() or self.review.who
        with reported("LiverSeg could not go on with the review.", self._tell):
            case = step()
            self.reasonEdit.text = ""
            if case is None and self.review.state is not None:
                self.statusLabel.text = "No case left to review in this folder."
        self._refresh()  # a case that failed to load is still the open one: it can be skipped

    def _refresh(self) -> None:
        with reported("LiverSeg could not show the review.", self._tell):
            self._showCase()
            if self.review.holds:
                self.timer.start()  # exports are recorded, claims renewed, while there are any
            self.fillTable()

    def _guarded(self, step) -> None:
        with reported("LiverSeg could not show the review.", self._say):
            step()

    def _say(self, text: str) -> None:
        self.statusLabel.text = text

    def _tell(self, text: str) -> None:
        """A review error, in one line: on the status line and in a dialog without details."""
        self.statusLabel.text = text
        show_error(text)

    def _showCase(self) -> None:
        """Point the panel's tools (uncertain regions, fixes, export) at the open case."""
        case, p = self.review.current, self.widget._parameterNode
        if case is None:
            self.caseLabel.text = ""
            return
        self.caseLabel.text = (f"<b>{case.name}</b>: {case.status}"
                               + (f", {case.liver_ml:.0f} mL" if case.liver_ml is not None else "")
                               + (f", uncertainty {case.uncertainty:.3f}" if case.uncertainty is not None else "")
                               + (f"; {case.warning or case.error}" if case.warning or case.error else ""))
        if p is not None and self.review.volume is not None:
            p.inputVolume, p.outputSegmentation = self.review.volume, self.review.segmentation
            if self.widget.ui.showUncertainCheckBox.checked:
                self.widget.logic.showUncertainRegions(self.review.segmentation, self.review.volume, True)

    def onPoll(self) -> None:
        """Timer tick: record the exports that finished; renew this annotator's claims every minute."""
        with reported("LiverSeg could not keep the review up to date.", self._say):
            messages = self.review.pollExports()
            if messages:
                self.statusLabel.text = " ".join(messages)
                self.fillTable()
                self.widget._updateButtons()  # the Fine-tune section's case count
            self._ticks += 1
            if self._ticks >= RENEW_TICKS:
                self._ticks = 0
                self._renew()
        if not self.review.holds:
            self.timer.stop()

    def _renew(self) -> None:
        """Renew the claims; tell the annotator (once) of a case another annotator holds now."""
        lost = set(self.review.renew())
        if lost - self._lost:
            text = (f"{', '.join(sorted(lost - self._lost))}: another annotator holds it now (the claim ran out): "
                    "a decision on it will not be recorded.")
            self.statusLabel.text = text
            slicer.util.warningDisplay(text, windowTitle="LiverSeg review")
            self.fillTable()
        self._lost = lost

    def updateButtons(self) -> None:
        done, total = self.review.progress() if self.review.state is not None else (0, 0)
        self.progressLabel.text = f"{done} of {total} reviewed" if total else ""
        opened = self.review.state is not None
        has_case = self.review.current is not None
        self.nextButton.enabled = opened
        self.acceptButton.enabled = has_case and self.review.volume is not None and self.review.modelMask
        self.exportButton.enabled = has_case and self.review.volume is not None and bool(
            self.widget.ui.exportFolderPathLineEdit.currentPath)
        self.skipButton.enabled = has_case and bool(self.reasonEdit.text.strip())

    def onSceneEndClose(self, caller=None, event=None) -> None:
        """The scene was closed: the open case's nodes went with it (the case stays claimed: Next case resumes
        it)."""
        self.review.leave()
        self._refresh()

    def stop(self) -> None:
        """Slicer closes, or the module is cleaned up or reloaded: exports under way are waited for and recorded,
        and the review's nodes leave the scene (the open case stays claimed by this annotator, who resumes there
        next time, with one copy of it in the scene)."""
        self.timer.stop()
        self.review.pollExports(wait=True)
        self.review.leave()
        self.review.exporter.shutdown()
