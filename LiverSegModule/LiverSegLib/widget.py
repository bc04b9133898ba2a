"""The LiverSeg panel: pick inputs, run the engine process with progress and Cancel, export corrections,
fine-tune. Every run is polled from one 100 ms timer on the main thread; nothing here imports torch, and
nothing heavy runs here (installs, segmentation, export and fine-tuning all run in other processes).
"""

from __future__ import annotations

import platform
import shutil

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from LiverSegLib import resource_path
from LiverSegLib.installflow import InstallFlow
from LiverSegLib.logic import LiverSegLogic
from LiverSegLib.progress import outcome_shown, show_error, show_progress
from LiverSegLib.slots import reported
from LiverSegLib.texts import card_summary
from LiverSegLib.trainflow import FineTuneFlow

SETTINGS_EXPORT_FOLDER = "LiverSeg/ExportFolder"
__all__ = ["LiverSegWidget"]


class LiverSegWidget(InstallFlow, FineTuneFlow, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel (Slicer builds it; ``LiverSeg.py`` names it)."""

    DEVICES = (("Auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps"))

    def __init__(self, parent=None, logic: LiverSegLogic | None = None) -> None:
        self.logic = logic  # before the base class: without a parent it calls setup() at once
        self._parameterNode = None
        self._guiObserver = None
        self._run = None
        self._trainRun = None
        self._exportRun = None
        self._installRun = None
        self._afterInstall = None
        self._hints = None  # _gpuHints
        self._timer = None
        self._surfacePending = None  # a segmentation whose 3D surface the next timer tick makes
        self.review = None  # the Review section (reviewpanel.ReviewPanel)
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource_path("UI", "LiverSeg.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = LiverSegLogic()

        self.ui.deviceComboBox.clear()
        for label, value in self.DEVICES:
            self.ui.deviceComboBox.addItem(label, value)
        self._updateDevices()
        self._fillModels()
        self.ui.exportFolderPathLineEdit.currentPath = qt.QSettings().value(SETTINGS_EXPORT_FOLDER, "")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.showUncertainCheckBox.connect("toggled(bool)", self.onShowUncertain)
        self.ui.jumpUncertainButton.connect("clicked(bool)", self.onJumpUncertain)
        self.ui.addHereButton.connect("clicked(bool)", lambda: self.onFix("add"))
        self.ui.removeHereButton.connect("clicked(bool)", lambda: self.onFix("remove"))
        self.ui.undoFixButton.connect("clicked(bool)", self.onUndoFix)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.exportFolderPathLineEdit.connect("currentPathChanged(QString)", self.onExportFolderChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainCancelButton.connect("clicked(bool)", self.onTrainCancelButton)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPoll)
        # The engine processes end with Slicer; connected once here, disconnected in cleanup().
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        self.initializeParameterNode()
        self.onModelChanged(self.ui.modelComboBox.currentIndex)  # the card of the preselected model
        from LiverSegLib.reviewpanel import ReviewPanel

        self.review = ReviewPanel(self)

    # -- lifecycle -----------------------------------------------------------------------------------
    def onAboutToQuit(self) -> None:
        self._stopAll()

    def _stopAll(self) -> None:
        self._cancelRun()
        for attribute in ("_trainRun", "_exportRun", "_installRun"):
            run = getattr(self, attribute)
            if run is not None:
                run.cancel()
                setattr(self, attribute, None)
        if self._timer is not None:
            self._timer.stop()
        if self.review is not None:
            self.review.stop()  # its exports run in the engine process: recorded before it ends
        if self.logic is not None:
            self.logic.shutdown()

    def cleanup(self) -> None:
        self.removeObservers()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        self._stopAll()

    def onReload(self) -> None:
        """Reload (and "Reload and Test"): this panel's runs end with the code that started them, then LiverSeg's
        modules are executed anew (see ``LiverSegLib.forget_modules``); Slicer cleans up once more, harmlessly."""
        from LiverSegLib import forget_modules

        self.cleanup()
        forget_modules()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self._guiObserver = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRun()  # its nodes are going: the result would have nowhere to go
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if getattr(self.parent, "isEntered", False):  # a panel made without the module manager has no such flag
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiObserver = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectCombo(self.ui.modelComboBox, self._parameterNode.modelPath)
            self._selectCombo(self.ui.deviceComboBox, self._parameterNode.device)
            self._updateButtons()

    # -- GUI state -----------------------------------------------------------------------------------
    def _fillModels(self, select: str | None = None) -> None:
        self.ui.modelComboBox.clear()
        for path in self.logic.availableModels():
            card = self.logic.modelCard(path)
            self.ui.modelComboBox.addItem(f"{card.get('name', path.name)} v{card.get('version', '?')}", str(path))
        if select is not None:
            self._selectCombo(self.ui.modelComboBox, select)

    def _gpuHints(self, refresh: bool = False) -> tuple[dict[str, bool], bool]:
        """(where a GPU may be: an NVIDIA driver, Apple silicon; whether PyTorch is missing), looked up once
        (the panel asks on every timer tick) and again after an install."""
        from LiverSegLib.dependencies import torch_missing_or_old

        if refresh or self._hints is None:
            self._hints = ({"cuda": shutil.which("nvidia-smi") is not None,
                            "mps": platform.system() == "Darwin" and platform.machine() == "arm64"}, torch_missing_or_old())
        return self._hints

    def _updateDevices(self) -> None:
        """A GPU can be picked once the engine has found it, or, before PyTorch is installed, where one may
        be (an NVIDIA driver; Apple silicon): picking it then installs PyTorch."""
        present = self.logic.engineDevices()
        maybe, no_torch = self._gpuHints()
        for index, (_, value) in enumerate(self.DEVICES):
            found = present is not None and any(d.startswith(value) for d in present)
            usable = value in ("auto", "cpu") or found or (no_torch and maybe.get(value, False))
            self.ui.deviceComboBox.model().item(index).setEnabled(usable)

    @staticmethod
    def _selectCombo(combo, value: str) -> None:
        index = combo.findData(value) if value else 0
        combo.setCurrentIndex(max(index, 0))

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(index) or ""
        self.ui.modelCardLabel.text = card_summary(self.logic.modelCard(self.ui.modelComboBox.itemData(index)))

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onExportFolderChanged(self, path: str) -> None:
        import qt

        qt.QSettings().setValue(SETTINGS_EXPORT_FOLDER, path)
        self._updateButtons()

    def _busy(self) -> bool:
        """A segmentation or install is under way (cancellable, and fixing the run's nodes)."""
        return self._run is not None or self._installRun is not None

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._busy()
        exporting = self._exportRun is not None  # the engine process serves one request at a time
        ready = bool(p and p.inputVolume) and self.ui.modelComboBox.count > 0
        self.ui.applyButton.enabled = ready and not (busy or exporting)
        self.ui.applyButton.toolTip = "Segment the liver" if ready else "Select a CT volume (and install a model)"
        self.ui.cancelButton.enabled = busy
        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelComboBox,
                         self.ui.deviceComboBox):
            selector.enabled = not busy  # the run's nodes are fixed when it starts
        banded = bool(p and p.inputVolume and p.outputSegmentation
                      and p.outputSegmentation.GetAttribute("LiverSeg.Uncertain"))
        self.ui.showUncertainCheckBox.enabled = banded and not busy
        self.ui.jumpUncertainButton.enabled = banded and not busy
        self.ui.addHereButton.enabled = banded and not busy
        self.ui.removeHereButton.enabled = bool(p and p.inputVolume and p.outputSegmentation) and not busy
        self.ui.undoFixButton.enabled = bool(p and p.outputSegmentation and self.logic.canUndoFix(p.outputSegmentation))
        folder = self.ui.exportFolderPathLineEdit.currentPath
        self.ui.exportButton.enabled = bool(p and p.inputVolume and p.outputSegmentation and folder) and not (
            busy or exporting)
        count = self.logic.datasetCaseCount(folder)
        if not folder:
            self.ui.fineTuneDatasetInfoLabel.text = 'Choose the dataset folder under "Export for training".'
        else:
            self.ui.fineTuneDatasetInfoLabel.text = f"{count or 'no'} case(s) in {folder}"
        training = self._trainRun is not None
        self.ui.trainButton.enabled = bool(count) and self.ui.modelComboBox.count > 0 and not (training or busy)
        self.ui.trainCancelButton.enabled = training
        self.ui.trainIterationsSpinBox.enabled = not training

    def _tell(self, text: str) -> None:
        """A user's error (a LiverSegError out of a click): on the status line and in a dialog, in one line."""
        self.ui.statusLabel.text = text
        show_error(text)

    # -- running -------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        p = self._parameterNode
        if self._busy() or self._exportRun is not None:  # disabled then; a scripted click must not replace a run
            return
        with reported("LiverSeg could not start.", self._tell):
            if not self._installFirst(p.device, False, self.onApplyButton):
                return
            self._run = self.logic.start(p.inputVolume, p.outputSegmentation, p.device, p.modelPath or None)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = self._run.stage.capitalize() + "..."
            self._timer.start()
        self._updateButtons()

    def onCancelButton(self) -> None:
        if self._installRun is not None:
            self._installRun.cancel()
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def _cancelRun(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.onPoll()

    def onPoll(self) -> None:
        """Timer tick (100 ms): take in the processes' progress (install, segmentation, export, fine-tune)."""
        if self._surfacePending is not None:  # the tick after a result was shown (and drawn): its 3D surface
            from LiverSegLib.mrml import make_surface

            node, self._surfacePending = self._surfacePending, None
            with reported("LiverSeg could not make the 3D surface.", self._tell):
                make_surface(node)
        if self._installRun is not None:
            self._pollInstall()
        if self._trainRun is not None:
            self._pollTraining()
        if self._run is not None:
            self._pollSegmentation()
        if self._exportRun is not None:
            self._pollExport()
        if all(r is None for r in (self._run, self._trainRun, self._exportRun, self._installRun)) \
                and self._surfacePending is None:
            self._timer.stop()

    def _pollSegmentation(self) -> None:
        """Write the segmentation's result once it is there."""

        run = self._run
        done = show_progress(run, self.ui.progressBar, self.ui.statusLabel)
        self._updateDevices()
        if not done:
            return
        self._run = None
        p = self._parameterNode
        with outcome_shown(run, self.ui.statusLabel, "", "Failed; the scene was not changed.",
                           cancelled="Cancelled; the scene was not changed.", crashed="Failed."):
            result = self.logic.finish(run, surface=False)  # the segment first; its 3D surface on the next tick
            self._surfacePending = result.segmentation_node
            if p is not None:
                p.outputSegmentation = result.segmentation_node
            result.segmentation_node.SetDisplayVisibility(True)
            self.ui.statusLabel.text = (f"Liver: {result.liver_ml:.0f} mL, uncertainty {result.uncertainty:.2f} "
                                        f"({result.seconds:.1f} s, {result.model_name}, {result.runtime})")
            if self.ui.showUncertainCheckBox.checked:
                self.logic.showUncertainRegions(result.segmentation_node, run.scene.GetNodeByID(run.volume_id), True)
            if result.warnings:
                self.ui.statusLabel.text += " - check the warning"
                slicer.util.warningDisplay("\n".join(result.warnings), windowTitle="LiverSeg")
        self._updateButtons()

    def onShowUncertain(self, show: bool) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:
            with reported("LiverSeg could not show the uncertain regions.", self._tell):
                self.logic.showUncertainRegions(p.outputSegmentation, p.inputVolume, bool(show))

    def onJumpUncertain(self) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:
            with reported("LiverSeg could not find the uncertain regions.", self._tell):
                if self.logic.jumpToUncertainRegion(p.outputSegmentation, p.inputVolume) is None:
                    self.ui.statusLabel.text = "No uncertain region in the last run."

    # -- one-click fixes -------------------------------------------------------------------------------
    def onFix(self, kind: str) -> None:
        """Add here / Remove here, at the crosshair (Shift + mouse move in a slice view puts it there)."""
        p = self._parameterNode
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        with reported("LiverSeg could not fix the segment here.", self._tell):
            if crosshair is None:
                from LiverSegExtension.errors import LiverSegError

                raise LiverSegError("no crosshair: place it with Shift + mouse move in a slice view")
            change = self.logic.fixAt(p.outputSegmentation, p.inputVolume, crosshair.GetCrosshairRAS(), kind)
            verb = "Added" if kind == "add" else "Removed"
            self.ui.statusLabel.text = f"{verb} {abs(change):.1f} mL at the crosshair (Undo fix restores it)."
        self._updateButtons()

    def onUndoFix(self) -> None:
        p = self._parameterNode
        with reported("LiverSeg could not undo the fix.", self._tell):
            if p and self.logic.undoFix(p.outputSegmentation, p.inputVolume):
                self.ui.statusLabel.text = "The last fix was undone."
        self._updateButtons()

    # -- export for training ---------------------------------------------------------------------------
    def onExportButton(self) -> None:
        p = self._parameterNode
        if self._busy() or self._exportRun is not None:  # disabled then, as Segment Liver is
            return
        with reported("Export failed.", self._tell):
            if not self._installFirst("cpu", False, self.onExportButton):
                return
            self._exportRun = self.logic.startExport(p.inputVolume, p.outputSegmentation,
                                                     self.ui.exportFolderPathLineEdit.currentPath, annotator=p.annotator)
            self.ui.statusLabel.text = "Exporting..."
            self._timer.start()
        self._updateButtons()

    def _pollExport(self) -> None:

        run = self._exportRun
        if not run.poll():
            return
        self._exportRun = None
        with outcome_shown(run, self.ui.statusLabel, "export ", "Export failed."):
            self.ui.statusLabel.text = f"Exported as {self.logic.finishExport(run)}."
        self._updateButtons()
