"""The panel on a fake logic: what a click starts, what a run shows while it goes and when it ends, without an
engine process or a model (the panel takes its logic in its constructor, as Slicer's module manager builds it
with its own). The fake has exactly the logic calls the panel makes (``test_the_fake_has_exactly_the_logic_calls
_the_panel_makes`` keeps it so); any other attribute fails the test, even from inside a slot."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, close_panel

from LiverSegExtension.errors import LiverSegError

slicer = pytest.importorskip("slicer")

PANEL_SOURCES = ("widget.py", "installflow.py", "trainflow.py", "reviewpanel.py", "slots.py", "progress.py")
MODELS = (Path("/models/liver-v1.0.0"), Path("/models/liver-tuned-v1.1.0"))


class FakeRun:
    """A segmentation under way, as the panel polls it (``SegmentRun``'s ``poll``, ``fraction``, ``stage``,
    ``cancel``, ``details``, ``scene``, ``volume_id``); the test moves it on and ends it."""

    def __init__(self, volume) -> None:
        self.scene, self.volume_id = volume.GetScene(), volume.GetID()
        self.stage, self.fraction, self.details = "starting the engine", 0.0, ""
        self.result = None  # the SlicerResult that finish() hands back
        self.error: Exception | None = None  # or the error it raises
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def poll(self) -> bool:
        return self.done

    def cancel(self) -> None:
        self.cancelled = True


class FakeLogic:
    """What the panel calls on ``LiverSegLogic``, recorded in ``calls``; nothing starts a process."""

    SURFACE = frozenset({
        "getParameterNode", "availableModels", "modelCard", "engineDevices", "canUndoFix", "datasetCaseCount",
        "start", "finish", "shutdown", "showUncertainRegions", "jumpToUncertainRegion", "fixAt", "undoFix",
        "startExport", "finishExport", "startFineTune", "finishFineTune", "engineFactory"})

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.runs: list[FakeRun] = []
        self._node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "LiverSeg")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        pytest.fail(f"the panel used logic.{name}, which the fake logic does not have")  # a BaseException

    @staticmethod
    def engineFactory():
        pytest.fail("an engine process was started")

    def getParameterNode(self):
        from LiverSegLib.parameters import LiverSegParameterNode

        return LiverSegParameterNode(self._node)

    def availableModels(self) -> list[Path]:
        return list(MODELS)

    def modelCard(self, model_path) -> dict:
        name, _, version = Path(model_path or MODELS[0]).name.rpartition("-v")
        return {"name": name, "version": version}

    def engineDevices(self) -> list[str] | None:
        return None  # no engine has started

    def canUndoFix(self, segmentationNode) -> bool:
        return False

    def datasetCaseCount(self, datasetFolder) -> int | None:
        return None

    def start(self, inputVolume, outputSegmentation=None, device="auto", modelPath=None, source=None) -> FakeRun:
        self.calls.append(("start", (inputVolume.GetID(), outputSegmentation, device, modelPath)))
        self.runs.append(FakeRun(inputVolume))
        return self.runs[-1]

    def finish(self, run: FakeRun, surface: bool = True):
        self.calls.append(("finish", (run, surface)))
        if run.error is not None:
            raise run.error
        return run.result

    def shutdown(self) -> None:
        self.calls.append(("shutdown", ()))

    def showUncertainRegions(self, segmentationNode, volumeNode, show: bool = True) -> None:
        self.calls.append(("showUncertainRegions", (segmentationNode, volumeNode, show)))

    def jumpToUncertainRegion(self, segmentationNode, volumeNode):
        self.calls.append(("jumpToUncertainRegion", (segmentationNode, volumeNode)))

    def fixAt(self, segmentationNode, volumeNode, ras, kind: str) -> float:
        self.calls.append(("fixAt", (segmentationNode, volumeNode, tuple(ras), kind)))
        return 0.0

    def undoFix(self, segmentationNode, volumeNode) -> bool:
        self.calls.append(("undoFix", (segmentationNode, volumeNode)))
        return False

    def startExport(self, inputVolume, segmentationNode, datasetFolder, annotator="", modelName=None,
                    provenance=None) -> FakeRun:
        self.calls.append(("startExport", (inputVolume.GetID(), segmentationNode.GetID(), datasetFolder)))
        self.runs.append(FakeRun(inputVolume))
        return self.runs[-1]

    def finishExport(self, run: FakeRun) -> str:
        self.calls.append(("finishExport", (run,)))
        return run.result

    # The fine-tune runs in a process the tests here do not drive: a call is the test's error.

    def startFineTune(self, datasetFolder, device="auto", modelPath=None, iterations=None, outputFolder=None):
        pytest.fail("these tests do not fine-tune")

    def finishFineTune(self, run):
        pytest.fail("these tests do not fine-tune")


def open_fake_panel(logic: FakeLogic):
    """The panel as Slicer's module manager builds it (under its module panel: setup, then enter), on ``logic``."""
    from LiverSegLib import widget
    from slicer.ScriptedLoadableModule import ModulePanel

    class LiverSegWidget(widget.LiverSegWidget):  # the module's name, as the module manager registers it
        def __init__(self, parent=None) -> None:
            super().__init__(parent, logic=logic)

    module = ModulePanel(LiverSegWidget)
    panel = module.setup()
    module.enter()
    return module, panel


@pytest.fixture()
def logic(scene) -> FakeLogic:
    return FakeLogic()


@pytest.fixture()
def dialogs(monkeypatch) -> list[tuple[str, dict]]:
    """The error dialogs the panel opens: (text, keyword arguments such as detailedText)."""
    shown: list[tuple[str, dict]] = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    return shown


def add_volume(name: str):
    return slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), name=name)


def starts(logic: FakeLogic) -> list[tuple]:
    return [args for call, args in logic.calls if call == "start"]


def start_a_run(logic: FakeLogic):
    """A CT in the scene, the panel open on it, Segment Liver clicked: (module, panel, volume, run)."""
    volume = add_volume("CT")
    module, panel = open_fake_panel(logic)
    panel.ui.applyButton.click()
    (run,) = logic.runs
    return module, panel, volume, run


def test_the_fake_has_exactly_the_logic_calls_the_panel_makes(logic):
    """The fake is the panel's whole use of the logic (its code and its flows), with the real logic's signatures."""
    from LiverSeg import LiverSegLogic

    folder = ROOT / "LiverSegModule" / "LiverSegLib"
    used = {name for source in PANEL_SOURCES
            for name in re.findall(r"\b(?:self|widget)\.logic\.(\w+)", (folder / source).read_text())}
    assert used == FakeLogic.SURFACE
    assert {n for n in vars(FakeLogic) if not n.startswith("_")} == FakeLogic.SURFACE | {"SURFACE"}
    real = LiverSegLogic()
    for name in FakeLogic.SURFACE - {"engineFactory"}:
        assert list(inspect.signature(getattr(logic, name)).parameters) == \
               list(inspect.signature(getattr(real, name)).parameters), name
    with pytest.raises(pytest.fail.Exception, match="logic.process, which the fake logic does not have"):
        getattr(logic, "process")  # noqa: B009 - the access itself is what fails


def test_segment_liver_is_enabled_only_with_an_input_volume(logic):
    module, panel = open_fake_panel(logic)
    try:
        assert panel.ui.modelComboBox.count == 2 and not panel.ui.applyButton.enabled  # models, but no CT
        volume = add_volume("CT")
        panel.ui.inputVolumeSelector.setCurrentNode(volume)
        assert panel._parameterNode.inputVolume.GetID() == volume.GetID()
        assert panel.ui.applyButton.enabled
        panel.ui.inputVolumeSelector.setCurrentNode(None)
        assert not panel.ui.applyButton.enabled
        panel.ui.applyButton.click()
        assert starts(logic) == []
    finally:
        close_panel(module)


def test_a_click_starts_the_run_on_the_chosen_volume_device_and_model(logic):
    """Another CT than the one the panel picked first, the CPU and the second model: the logic gets those."""
    add_volume("first")
    chosen = add_volume("chosen")
    module, panel = open_fake_panel(logic)
    try:
        assert panel._parameterNode.inputVolume.GetName() == "first"  # what the panel picked on opening
        panel.ui.inputVolumeSelector.setCurrentNode(chosen)
        panel.ui.deviceComboBox.setCurrentIndex(panel.ui.deviceComboBox.findData("cpu"))
        panel.ui.modelComboBox.setCurrentIndex(1)
        assert panel.ui.modelComboBox.currentText == "liver-tuned v1.1.0"
        panel.ui.applyButton.click()
        assert starts(logic) == [(chosen.GetID(), None, "cpu", str(MODELS[1]))]
        assert panel.ui.statusLabel.text == "Starting the engine..." and panel._timer.isActive()
    finally:
        close_panel(module)


def test_a_finished_run_shows_its_result_and_enables_segment_liver_again(logic, dialogs, scene):
    from LiverSegLib.logic import SlicerResult

    module, panel, volume, run = start_a_run(logic)
    try:
        assert not panel.ui.applyButton.enabled and panel.ui.cancelButton.enabled
        run.fraction, run.stage = 0.6, "segmenting (fine stage)"
        panel._timer.timeout()
        assert (panel.ui.progressBar.value, panel.ui.statusLabel.text) == (60, "Segmenting (fine stage)")
        assert not panel.ui.applyButton.enabled
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT liver")
        run.fraction, run.stage = 1.0, "done"
        run.result = SlicerResult(node, "Liver", 1523.4, 8.25, "liver v1.0.0", uncertainty=0.042,
                                  runtime="onnxruntime 1.20.1 on cpu")
        panel._timer.timeout()
        assert ("finish", (run, False)) in logic.calls  # the segment first, its 3D surface on the next tick
        assert panel.ui.statusLabel.text == "Liver: 1523 mL, uncertainty 0.04 (8.2 s, liver v1.0.0, " \
                                            "onnxruntime 1.20.1 on cpu)"
        assert panel.ui.progressBar.value == 100
        assert panel._parameterNode.outputSegmentation.GetID() == node.GetID()
        assert panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled
        panel._timer.timeout()  # the 3D surface; then nothing is left to poll
        assert not panel._timer.isActive() and dialogs == []
    finally:
        close_panel(module)


def test_a_failed_run_shows_its_one_line_error_without_a_traceback_and_enables_segment_liver_again(
        logic, dialogs, scene, caplog):
    module, panel, volume, run = start_a_run(logic)
    try:
        said = "CT: not enough memory (needed about 1 GB); close other programs, or use a smaller CT"
        run.error = LiverSegError(said)  # a user's error: the engine sends it without details
        with caplog.at_level(logging.DEBUG):
            panel._timer.timeout()
        assert dialogs == [(said, {})]
        assert panel.ui.statusLabel.text == "Failed; the scene was not changed."
        assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
        assert panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled
        assert panel._parameterNode.outputSegmentation is None
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
        assert not panel._timer.isActive()
    finally:
        close_panel(module)


def test_a_second_click_during_a_run_starts_no_second_run(logic):
    module, panel, volume, run = start_a_run(logic)
    try:
        panel.ui.applyButton.click()
        panel.onApplyButton()  # a click queued before the button was disabled, or a script's
        assert len(starts(logic)) == 1 and panel._run is run and not run.cancelled
        assert not panel.ui.applyButton.enabled
        for selector in (panel.ui.inputVolumeSelector, panel.ui.modelComboBox, panel.ui.deviceComboBox):
            assert not selector.enabled  # the run's inputs are fixed while it goes
    finally:
        close_panel(module)


def test_segment_liver_waits_for_an_export_in_flight(logic, scene, tmp_path):
    """The engine process serves one request at a time: while the case is exported, Segment Liver is disabled and
    a click starts nothing; when the export ends it is enabled again."""
    from LiverSegLib.logic import SlicerResult

    module, panel, volume, run = start_a_run(logic)
    try:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT liver")
        run.result = SlicerResult(node, "Liver", 1500.0, 1.0, "liver v1.0.0")
        panel._timer.timeout()
        panel._timer.timeout()  # the 3D surface
        panel.ui.exportFolderPathLineEdit.currentPath = str(tmp_path)
        assert panel.ui.applyButton.enabled and panel.ui.exportButton.enabled
        panel.ui.exportButton.click()
        export = logic.runs[-1]
        assert [c for c, _ in logic.calls].count("startExport") == 1
        assert not panel.ui.applyButton.enabled and not panel.ui.exportButton.enabled
        panel.ui.applyButton.click()
        panel.onApplyButton()
        assert len(starts(logic)) == 1
        export.result = "case_0001"
        panel._timer.timeout()
        assert panel.ui.statusLabel.text == "Exported as case_0001."
        assert panel.ui.applyButton.enabled
    finally:
        close_panel(module)
