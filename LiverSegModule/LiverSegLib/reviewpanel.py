"""The panel's Review section: a batch output folder's cases in a table (most in need of review first), one
click to a case, Accept / Export and next / Skip, progress always shown. The cases load and the decisions are
kept by :class:`LiverSegLib.review.ReviewLogic`; exports go to the dataset folder of "Export for training", so
the Fine-tune section picks up what the review filled.
"""

from __future__ import annotations

import slicer

from LiverSegLib.review import ReviewLogic

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
        self.folderEdit.toolTip = "A batch's output folder (the one holding summary.csv)"
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
        layout.addWidget(self.folderEdit)
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
        self.folderEdit.connect("currentPathChanged(QString)", self.openFolder)
        self.pendingCheckBox.connect("toggled(bool)", lambda checked: self.fillTable())
        self.table.connect("cellDoubleClicked(int,int)", self.onCellDoubleClicked)
        self.nextButton.connect("clicked(bool)", lambda: self._decide(self.review.next))
        self.acceptButton.connect("clicked(bool)", lambda: self._decide(self.review.accept))
        self.exportButton.connect("clicked(bool)", lambda: self._decide(
            lambda: self.review.exportAndNext(self.widget.ui.exportFolderPathLineEdit.currentPath)))
        self.skipButton.connect("clicked(bool)", lambda: self._decide(lambda: self.review.skip(self.reasonEdit.text)))
        self.reasonEdit.connect("textChanged(QString)", lambda text: self.updateButtons())

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
    def openFolder(self, path: str, quiet: bool = False) -> None:
        """Read a batch output folder's cases into the table; what is wrong with it goes to the status line
        (and, unless ``quiet``, to a message)."""
        import qt

        from LiverSegExtension.errors import LiverSegError

        self.review.close()
        self.statusLabel.text = ""
        if path:
            qt.QSettings().setValue(SETTINGS_REVIEW_FOLDER, path)
            try:
                self.review.open(path, self._annotator())
                self.statusLabel.text = "Next case opens the case most in need of review."
            except LiverSegError as exc:
                self.statusLabel.text = str(exc)
                if not quiet:
                    slicer.util.errorDisplay(str(exc))
        self.fillTable()

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
        if 0 <= row < len(self._rows):
            key = self._rows[row]["key"]
            self._decide(lambda: self.review.openCase(key))

    # -- deciding ---------------------------------------------------------------------------------------------
    def _decide(self, step) -> None:
        """Run a step that ends with a case loaded (or none left); show where the review stands."""
        self.review.who = self._annotator().strip() or self.review.who
        try:
            with slicer.util.tryWithErrorDisplay("LiverSeg could not go on with the review.", waitCursor=True):
                case = step()
                self.reasonEdit.text = ""
                if case is None and self.review.state is not None:
                    self.statusLabel.text = "No case left to review in this folder."
        finally:  # a case that failed to load is still the open one: it can be skipped
            self._showCase()
            if self.review.exporting:
                self.timer.start()
            self.fillTable()

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
        self.timer.start()  # the claim on the open case is renewed while it is open

    def onPoll(self) -> None:
        """Timer tick: record the exports that finished; renew the open case's claim every minute."""
        messages = self.review.pollExports()
        if messages:
            self.statusLabel.text = " ".join(messages)
            self.fillTable()
            self.widget._updateButtons()  # the Fine-tune section's case count
        self._ticks += 1
        if self._ticks >= RENEW_TICKS and self.review.current is not None:
            self._ticks = 0
            self.review.renew()
        if not self.review.exporting and self.review.current is None:
            self.timer.stop()

    def updateButtons(self) -> None:
        done, total = self.review.progress() if self.review.state is not None else (0, 0)
        self.progressLabel.text = f"{done} of {total} reviewed" if total else ""
        opened = self.review.state is not None
        has_case = self.review.current is not None
        self.nextButton.enabled = opened
        self.acceptButton.enabled = has_case and self.review.volume is not None
        self.exportButton.enabled = has_case and self.review.volume is not None and bool(
            self.widget.ui.exportFolderPathLineEdit.currentPath)
        self.skipButton.enabled = has_case and bool(self.reasonEdit.text.strip())

    def stop(self) -> None:
        """Slicer closes or the module is cleaned up: exports under way are waited for and recorded (the open
        case stays claimed by this annotator, who resumes there next time)."""
        self.timer.stop()
        self.review.pollExports(wait=True)
        self.review.exporter.shutdown()
