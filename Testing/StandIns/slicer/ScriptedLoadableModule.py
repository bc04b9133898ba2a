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
    """Like Slicer's (Base/Python/slicer/ScriptedLoadableModule.py): without a parent, the panel gets a
    qMRMLWidget with a vertical layout of its own and ``setup()`` is called here, at once; with a parent
    (the module manager's :class:`ModulePanel`), the parent calls it."""

    def __init__(self, parent=None) -> None:
        import qt

        self.moduleName = self.__class__.__name__[: -len("Widget")]
        if not parent:
            self.parent = qt.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def setup(self) -> None:  # the real one builds the reload/test panel
        pass


class ModulePanel:
    """The module manager's parent of a scripted module's widget: ``qSlicerScriptedLoadableModuleWidget``
    (Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx over qSlicerAbstractModuleWidget.cxx). ``setup``,
    ``enter`` and ``exit`` call the Python widget's; ``isEntered`` is read-only, set by enter and exit."""

    def __init__(self, widget_class) -> None:
        import qt

        self._entered = False
        self._frame = qt.qMRMLWidget()
        self._frame.setLayout(qt.QVBoxLayout())
        self._frame.setMRMLScene(slicer.mrmlScene)
        self.widget = widget_class(self)

    def layout(self):
        return self._frame.layout()

    def __bool__(self) -> bool:
        return True

    @property
    def isEntered(self) -> bool:
        return self._entered

    def setup(self):
        self.widget.setup()
        return self.widget

    def enter(self) -> None:
        assert not self._entered
        self._entered = True
        self.widget.enter()

    def exit(self) -> None:
        assert self._entered
        self._entered = False
        self.widget.exit()


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
    """Like Slicer's; as there, ``runTest`` is what "Reload and Test" calls, while ``slicer.testing.runUnitTest``
    (Base/Python/slicer/testing.py) loads the class's ``test_*`` methods with unittest."""

    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)

    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        logging.info(message)
