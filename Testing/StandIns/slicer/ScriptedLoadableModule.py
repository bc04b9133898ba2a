"""Stand-in for Slicer's ScriptedLoadableModule base classes (test-only)."""

from __future__ import annotations

import logging
import unittest
from types import SimpleNamespace

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent=None) -> None:
        self.parent = parent if parent is not None else SimpleNamespace()
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    """Like Slicer's: without a parent, the panel gets a qMRMLWidget with a vertical layout of its own."""

    def __init__(self, parent=None) -> None:
        import qt

        if parent is None:
            parent = qt.qMRMLWidget()
            parent.setLayout(qt.QVBoxLayout())
            parent.setMRMLScene(slicer.mrmlScene)
        self.parent = parent
        self.layout = self.parent.layout()
        self.moduleName = self.__class__.__name__[: -len("Widget")]

    def setup(self) -> None:  # the real one builds the reload/test panel
        pass


class ScriptedLoadableModuleLogic:
    """Like Slicer's: the parameter node is a singleton vtkMRMLScriptedModuleNode tagged with the module name."""

    def __init__(self, parent=None) -> None:
        name = self.__class__.__name__
        self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            return node
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)

    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        logging.info(message)
