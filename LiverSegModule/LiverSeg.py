"""LiverSeg: one-click liver segmentation of abdominal CT (the Slicer door onto LiverSegExtension)."""

from __future__ import annotations

import logging

import slicer
import vtk
from LiverSegLib import resource_path
from LiverSegLib.logic import LiverSegLogic, LiverSegRun  # noqa: F401 - the module's public logic
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_EXPORT_FOLDER = "LiverSeg/ExportFolder"


class LiverSeg(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LiverSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSeg developers"]
        self.parent.helpText = (
            "Segment the liver in an abdominal CT with one click, on CPU or GPU, fully offline. "
            "Correct the result in Segment Editor, then export it as training data to fine-tune the model."
        )
        self.parent.acknowledgementText = (
            "The bundled model was trained on 3D-IRCADb-01 (IRCAD) data; see its model card for sources and "
            "licences (non-commercial research use)."
        )
        # Slicer looks for Resources/Icons/LiverSeg.png beside this file; a source checkout keeps it at the top.
        icon = resource_path("Icons", "LiverSeg.png")
        if icon.is_file():
            import qt

            self.parent.icon = qt.QIcon(str(icon))


@parameterNodeWrapper
class LiverSegParameterNode:
    """Panel state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: str = "auto"
    modelPath: str = ""
    annotator: str = ""


class LiverSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: pick inputs, run the engine process with progress and Cancel, export corrections.

    Nothing here imports torch: the panel must open in a Slicer where it is not installed yet.
    """

    DEVICES = (("Auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps"))

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiObserver = None
        self._run = None
        self._trainRun = None
        self._timer = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource_path("UI", "LiverSeg.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
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
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.exportFolderPathLineEdit.connect("currentPathChanged(QString)", self.onExportFolderChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainCancelButton.connect("clicked(bool)", self.onTrainCancelButton)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPoll)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)  # the engine process ends with Slicer
        self.initializeParameterNode()
        self.onModelChanged(self.ui.modelComboBox.currentIndex)  # the card of the preselected model

    # -- parameter node --------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        self._cancelRun()
        if self._trainRun is not None:
            self._trainRun.cancel()
            self._trainRun = None
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

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
        if self.parent.isEntered:
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

    def _updateDevices(self) -> None:
        """GPUs are enabled once the engine process has found them (Slicer itself never imports torch)."""
        present = self.logic.engineDevices()
        for index, (_, value) in enumerate(self.DEVICES):
            known = value in ("auto", "cpu") or (present is not None and any(d.startswith(value) for d in present))
            self.ui.deviceComboBox.model().item(index).setEnabled(known)

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

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None
        ready = bool(p and p.inputVolume) and self.ui.modelComboBox.count > 0
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = "Segment the liver" if ready else "Select a CT volume (and install a model)"
        self.ui.cancelButton.enabled = running
        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelComboBox,
                         self.ui.deviceComboBox):
            selector.enabled = not running  # the run's nodes are fixed when it starts
        banded = bool(p and p.inputVolume and p.outputSegmentation
                      and p.outputSegmentation.GetAttribute("LiverSeg.Uncertain"))
        self.ui.showUncertainCheckBox.enabled = banded and not running
        self.ui.jumpUncertainButton.enabled = banded and not running
        folder = self.ui.exportFolderPathLineEdit.currentPath
        self.ui.exportButton.enabled = bool(p and p.inputVolume and p.outputSegmentation and folder) and not running
        count = self.logic.datasetCaseCount(folder)
        if not folder:
            self.ui.fineTuneDatasetInfoLabel.text = 'Choose the dataset folder under "Export for training".'
        else:
            self.ui.fineTuneDatasetInfoLabel.text = f"{count or 'no'} case(s) in {folder}"
        training = self._trainRun is not None
        self.ui.trainButton.enabled = bool(count) and self.ui.modelComboBox.count > 0 and not training
        self.ui.trainCancelButton.enabled = training
        self.ui.trainIterationsSpinBox.enabled = not training

    # -- running -------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        from LiverSegLib.dependencies import ensure_dependencies

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("LiverSeg could not start.", waitCursor=True):
            ensure_dependencies(ask=True)
            self._run = self.logic.start(p.inputVolume, p.outputSegmentation, p.modelPath or None, p.device)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = self._run.stage.capitalize() + "..."
            self._timer.start()
        self._updateButtons()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def _cancelRun(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.onPoll()

    def onPoll(self) -> None:
        """Timer tick (100 ms): take in the engines' progress (segmentation, fine-tune)."""
        if self._trainRun is not None:
            self._pollTraining()
        if self._run is not None:
            self._pollSegmentation()
        if self._run is None and self._trainRun is None:
            self._timer.stop()

    def _pollSegmentation(self) -> None:
        """Write the segmentation's result once it is there."""
        from LiverSegExtension.errors import CancelledError, LiverSegError

        run = self._run
        done = run.poll()
        self._updateDevices()
        self.ui.progressBar.value = int(run.fraction * 100)
        self.ui.statusLabel.text = run.stage.capitalize()
        if not done:
            return
        self._run = None
        p = self._parameterNode
        try:
            result = self.logic.finish(run)
            if p is not None:
                p.outputSegmentation = result.segmentation_node
            result.segmentation_node.SetDisplayVisibility(True)
            self.ui.statusLabel.text = (f"Liver: {result.liver_ml:.0f} mL, uncertainty {result.uncertainty:.2f} "
                                        f"({result.seconds:.1f} s, {result.model_name})")
            if self.ui.showUncertainCheckBox.checked:
                self.logic.showUncertainRegions(result.segmentation_node, run.scene.GetNodeByID(run.volume_id), True)
            if result.warnings:
                self.ui.statusLabel.text += " - check the warning"
                slicer.util.warningDisplay("\n".join(result.warnings), windowTitle="LiverSeg")
        except CancelledError:
            self.ui.statusLabel.text = "Cancelled; the scene was not changed."
        except LiverSegError as exc:
            self.ui.statusLabel.text = "Failed; the scene was not changed."
            slicer.util.errorDisplay(str(exc), detailedText=run.details or None)
        except Exception as exc:  # a bug: say so, with the traceback in the details, and keep Slicer running
            self.ui.statusLabel.text = "Failed."
            logging.exception("LiverSeg failed")
            slicer.util.errorDisplay(f"LiverSeg failed: {exc}", detailedText=run.details or None)
        self._updateButtons()

    def onShowUncertain(self, show: bool) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:
            self.logic.showUncertainRegions(p.outputSegmentation, p.inputVolume, bool(show))

    def onJumpUncertain(self) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:
            if self.logic.jumpToUncertainRegion(p.outputSegmentation, p.inputVolume) is None:
                self.ui.statusLabel.text = "No uncertain region in the last run."

    def onExportButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            name = self.logic.exportForTraining(p.inputVolume, p.outputSegmentation,
                                                self.ui.exportFolderPathLineEdit.currentPath, annotator=p.annotator)
            self.ui.statusLabel.text = f"Exported as {name}."
        self._updateButtons()

    # -- fine-tuning -------------------------------------------------------------------------------------
    def onTrainButton(self) -> None:
        from LiverSegLib.dependencies import ensure_dependencies

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("LiverSeg could not start fine-tuning.", waitCursor=True):
            ensure_dependencies(ask=True)
            self._trainRun = self.logic.startFineTune(self.ui.exportFolderPathLineEdit.currentPath,
                                                      p.modelPath or None, p.device,
                                                      iterations=int(self.ui.trainIterationsSpinBox.value))
            self.ui.trainProgressBar.value = 0
            self.ui.trainStatusLabel.text = "Starting..."
            self.ui.trainResultLabel.text = ""
            self._timer.start()
        self._updateButtons()

    def onTrainCancelButton(self) -> None:
        if self._trainRun is not None:
            self._trainRun.cancel()
            self._pollTraining()

    def _pollTraining(self) -> None:
        """Show the fine-tune's progress; at the end, the parent-versus-new table and the verdict."""
        from LiverSegExtension.errors import CancelledError, LiverSegError

        run = self._trainRun
        done = run.poll()
        self.ui.trainProgressBar.value = int(run.fraction * 100)
        self.ui.trainStatusLabel.text = run.stage[:1].upper() + run.stage[1:]
        if not done:
            return
        self._trainRun = None
        try:
            result = self.logic.finishFineTune(run)
            self.ui.trainResultLabel.text = comparison_html(result, run.notes)
            if result["accepted"]:
                self._fillModels(select=result["model_dir"])
                self.ui.trainStatusLabel.text = f"Accepted: {result['model_dir']} is now selected."
            else:
                self.ui.trainStatusLabel.text = (f"Rejected: the new model is kept in {result['model_dir']} for "
                                                 "inspection and not offered.")
        except CancelledError:
            self.ui.trainStatusLabel.text = "Cancelled; no model was added."
        except LiverSegError as exc:
            self.ui.trainStatusLabel.text = "Fine-tuning failed; no model was added."
            slicer.util.errorDisplay(str(exc), detailedText=run.details or None)
        except Exception as exc:  # a bug: say so and keep Slicer running
            self.ui.trainStatusLabel.text = "Fine-tuning failed."
            logging.exception("LiverSeg fine-tuning failed")
            slicer.util.errorDisplay(f"LiverSeg fine-tuning failed: {exc}", detailedText=run.details or None)
        self._updateButtons()


def card_summary(card: dict) -> str:
    """About a model for the panel: name, version, validation Dice; for a fine-tune, its parent, the cases
    it added and its Dice against the parent's on the same cases."""
    if not card:
        return "No trained model installed"
    validation = card.get("validation", {})
    dice = validation.get("mean", {}).get("dice")
    parent_dice = validation.get("parent_mean", {}).get("dice")
    parent = card.get("parent_model")
    added = card.get("added_cases") or []
    text = f"{card.get('name', '?')} v{card.get('version', '?')}"
    if isinstance(dice, float) and isinstance(parent_dice, float):
        text += f", validation Dice {dice:.3f} (parent {parent_dice:.3f}, same cases)"
    elif isinstance(dice, float):
        text += f", validation Dice {dice:.3f}"
    if parent:
        text += f", fine-tuned from {parent}" + (f" on {len(added)} added case(s)" if added else "")
    return text


def comparison_html(result: dict, notes: list[str]) -> str:
    """The fine-tune's parent-versus-new table and verdict, as rich text for a QLabel."""
    from html import escape

    cells = "".join(
        f"<tr><td>{escape(r['case'])}</td><td>{escape(r['group'])}</td><td>{r['dice_parent']:.3f}</td>"
        f"<td>{r['dice_new']:.3f}</td><td>{r['hd95_mm_parent']:.1f}</td><td>{r['hd95_mm_new']:.1f}</td></tr>"
        for r in result.get("rows", []))
    table = ("<table><tr><th>case</th><th>group</th><th>Dice parent</th><th>Dice new</th><th>HD95 parent</th>"
             f"<th>HD95 new</th></tr>{cells}</table>") if cells else ""
    verdict = f"<p><b>{escape(result['reason'])}</b></p>"
    return table + verdict + "".join(f"<p>{escape(n)}</p>" for n in notes)


class LiverSegTest(ScriptedLoadableModuleTest):
    """Self-test: segment a CT in this process and through the engine process; check segment, terminology,
    color, geometry, and that both give the same mask. Skipped, saying what to install, without torch."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        from LiverSegLib.dependencies import missing_packages, torch_needed

        missing = (["torch (the PyTorch extension)"] if torch_needed() else []) + missing_packages()
        if missing:
            message = ("LiverSeg self-test skipped: install " + ", ".join(missing)
                       + " (click 'Segment Liver' once and accept the installation)")
            self.delayDisplay(message)
            self.skipTest(message)
        self.setUp()
        self.test_LiverSeg_segments_a_ct()

    def _load_ct(self):
        """A real CT: the TotalSegmentator example when the shared data is there, else a synthetic one."""
        import os
        from pathlib import Path

        data = Path(os.environ.get("LIVERSEG_SHARED_DATA", resource_path().parent.parent / "shared" / "data"))
        path = data / "liver-train" / "imagesTr" / "ts_a.nii.gz"
        if path.is_file():
            return slicer.util.loadVolume(str(path))
        import numpy as np

        k, j, i = np.mgrid[0:60, 0:110, 0:120].astype(np.float32)
        ct = np.where(((i - 60) / 55) ** 2 + ((j - 55) / 45) ** 2 <= 1, 30, -1000).astype(np.int16)
        ct[(((i - 38) / 18) ** 2 + ((j - 50) / 15) ** 2 + ((k - 30) / 12) ** 2) <= 1] = 160
        node = slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-3.0, -3.0, 5.0, 1.0]), name="synthetic CT")
        return node

    def test_LiverSeg_segments_a_ct(self) -> None:
        import numpy as np
        from LiverSegLib.mrml import segment_mask, segment_terminology

        from LiverSegExtension.io import LIVER_SEGMENT
        from LiverSegExtension.metrics import dice

        self.delayDisplay("Loading a CT")
        volume = self._load_ct()
        logic = LiverSegLogic()
        stages = []
        run = logic.process(volume, None, device="cpu", progress=lambda f, s: stages.append(s))
        seg = run.segmentation_node
        segment = seg.GetSegmentation().GetSegment(run.segment_id)
        self.assertEqual(segment.GetName(), "Liver")
        term = segment_terminology(segment)
        self.assertIn("SCT^123037004^Anatomical Structure", term)
        self.assertIn("SCT^10200004^Liver", term)
        self.assertEqual([round(c * 255) for c in segment.GetColor()], list(LIVER_SEGMENT["color"]))
        self.assertEqual(seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID(), volume.GetID())
        mask = segment_mask(seg, run.segment_id, volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertAlmostEqual(run.liver_ml, float(mask.sum()) * np.prod(volume.GetSpacing()) / 1000, delta=1.0)
        self.delayDisplay(f"Liver: {run.liver_ml:.0f} mL")

        self.delayDisplay("The same CT through the engine process")
        try:
            background = logic.start(volume, None, None, "cpu")
            self.assertTrue(background.wait(300), "the engine process did not finish in 5 minutes")
            other = logic.finish(background)
        finally:
            logic.shutdown()
        self.assertGreaterEqual(dice(segment_mask(other.segmentation_node, other.segment_id, volume), mask), 0.999)
        self.assertEqual(other.warnings, run.warnings)
