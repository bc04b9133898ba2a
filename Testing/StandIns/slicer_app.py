"""Stand-in for ``slicer.app`` and ``slicer.mrmlScene`` (test-only).

Files load the way Slicer's own readers do: volumes through vtkSlicerVolumesLogic.AddArchetypeVolume
(what qSlicerVolumesReader calls), segmentations through vtkSlicerSegmentationsModuleLogic.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import slicer


class _IOManager:
    def __init__(self, app: _App) -> None:
        self.app = app

    def fileType(self, filename: str) -> str:
        return "SegmentationFile" if str(filename).endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, filetype, properties, loadedNodes=None, userMessages=None) -> bool:
        scene = slicer.mrmlScene
        filename = str(properties["fileName"])
        if filetype == "SegmentationFile":
            node = self.app.segmentationsLogic.LoadSegmentationFromFile(filename, False)
        else:
            stem = Path(filename).name.split(".")[0]
            name = properties.get("name") or scene.GenerateUniqueName(stem)
            node = self.app.volumesLogic.AddArchetypeVolume(filename, name, 1 if properties.get("labelmap") else 0)
        if node is None:
            return False
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True


class _App:
    applicationName = "3D Slicer"

    def __init__(self, testing: bool) -> None:
        self._testing = testing
        self.overrideCursors = 0  # qSlicerApplication's override-cursor stack (QApplication)
        self._io = _IOManager(self)
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()

    def testingEnabled(self) -> bool:
        return self._testing

    def coreIOManager(self) -> _IOManager:
        return self._io

    def processEvents(self) -> None:
        import qt

        qt.process_events()

    def connect(self, signal: str, slot) -> None:
        """QCoreApplication's signals (aboutToQuit()); fired by ``quit``."""
        self.__dict__.setdefault("slots", []).append((signal, slot))

    def topLevelWidgets(self) -> list:
        """QApplication's: none here (no main window; message displays then only log, as headless Slicer does)."""
        return []

    def disconnect(self, signal: str, slot) -> None:
        slots = self.__dict__.get("slots", [])
        if (signal, slot) in slots:
            slots.remove((signal, slot))

    def quit(self) -> None:
        for signal, slot in self.__dict__.pop("slots", []):
            if signal.startswith("aboutToQuit"):
                slot()

    def setOverrideCursor(self, cursor) -> None:
        self.overrideCursors += 1

    def restoreOverrideCursor(self) -> None:
        self.overrideCursors -= 1

    def bind(self, scene) -> None:
        self.volumesLogic.SetMRMLScene(scene)
        self.segmentationsLogic.SetMRMLScene(scene)  # registers the segmentation converter rules


def install(testing: bool = True):
    """A fresh scene as ``slicer.mrmlScene`` and an application object as ``slicer.app``."""
    scene = slicer.vtkMRMLScene()
    app = getattr(slicer, "app", None)
    if not isinstance(app, _App):
        app = _App(testing)
        slicer.app = app
    app.bind(scene)
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace()
    return scene
