"""Stand-in for Slicer's ScriptedLoadableModule base classes (test-only), after Slicer's
Base/Python/slicer/ScriptedLoadableModule.py and, for the module panel, Base/QTGUI/
qSlicerScriptedLoadableModuleWidget.cxx."""

from __future__ import annotations

import importlib
import sys
import unittest
from types import SimpleNamespace

import slicer


class ScriptedLoadableModule:
    """Like Slicer's: the module registers its ``runTest`` in ``slicer.selfTests``, which the SelfTests module
    and "Reload and Test" call."""

    def __init__(self, parent=None) -> None:
        self.parent = parent if parent is not None else SimpleNamespace()
        self.moduleName = self.__class__.__name__
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec: int = 100, **kwargs) -> None:
        """Slicer's: the module's ``<Name>Test`` case, made with no unittest result and run through its own
        ``runTest``: whatever that raises reaches the caller (an error dialog, a failed self-test)."""
        module = importlib.import_module(self.__module__)
        className = self.moduleName + "Test"
        try:
            TestCaseClass = getattr(module, className)
        except AttributeError:
            raise AssertionError(f"Test case class not found: {self.__module__}.{className} ") from None
        testCase = TestCaseClass()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


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

    def setup(self) -> None:  # the real one builds the reload/test panel (developer mode)
        pass

    def onReload(self) -> None:
        """Slicer's: ``slicer.util.reloadScriptedModule`` (slicer-core's real one) re-executes the module file."""
        slicer.util.reloadScriptedModule(self.moduleName)

    def onReloadAndTest(self, **kwargs) -> None:
        """Slicer's "Reload and Test": reload, then the registered self-test; an exception is shown (outside
        testing mode) and raised."""
        with slicer.util.tryWithErrorDisplay("Reload and Test failed."):
            self.onReload()
            test = slicer.selfTests[self.moduleName]
            test(msec=int(slicer.app.userSettings().value("Developer/SelfTestDisplayMessageDelay")), **kwargs)


class _LoadedModule:
    """``slicer.modules.<name>``, a qSlicerScriptedLoadableModule: its file and its panel."""

    def __init__(self, path: str, panel: ModulePanel) -> None:
        self.path = path
        self._panel = panel

    def widgetRepresentation(self) -> ModulePanel:
        return self._panel


class ModulePanel:
    """The module manager's parent of a scripted module's widget: ``qSlicerScriptedLoadableModuleWidget``
    (Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx over qSlicerAbstractModuleWidget.cxx). ``setup``,
    ``enter`` and ``exit`` call the Python widget's; ``isEntered`` is read-only, set by enter and exit.

    As the module manager does, it makes the module object (its self-test registered) from the module file
    already imported under the module's name, and sets ``slicer.modules.<name>`` (``path``,
    ``widgetRepresentation()``) and ``slicer.modules.<Name>Widget``; ``reload()`` instantiates the widget class
    of the module file as it is now in ``sys.modules`` and sets it up (``setPythonSource``, then ``setup``)."""

    def __init__(self, widget_class) -> None:
        import qt

        self._entered = False
        self._frame = qt.qMRMLWidget()
        self._frame.setLayout(qt.QVBoxLayout())
        self._frame.setMRMLScene(slicer.mrmlScene)
        self.name = widget_class.__name__[: -len("Widget")]
        source = sys.modules.get(self.name)
        if source is not None and hasattr(source, self.name):
            setattr(slicer.modules, self.name.lower(), _LoadedModule(source.__file__, self))
            getattr(source, self.name)(SimpleNamespace(path=source.__file__))
        self.widget = widget_class(self)
        setattr(slicer.modules, self.name + "Widget", self.widget)

    def layout(self):
        return self._frame.layout()

    def children(self) -> list:
        return self._frame.children()

    def reload(self) -> None:
        self.widget = getattr(sys.modules[self.name], self.name + "Widget")(self)
        setattr(slicer.modules, self.name + "Widget", self.widget)
        self.widget.setup()

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

    def delayDisplay(self, message: str, requestedDelay=None, msec=None) -> None:
        """Slicer's: ``slicer.util.delayDisplay`` (slicer-core's real one: logged, and shown in a dialog from
        400 ms on) for ``messageDelay`` ms when the module's runTest set it, else 100 ms."""
        if hasattr(self, "messageDelay"):
            msec = self.messageDelay
        if msec is None:
            msec = requestedDelay
        if msec is None:
            msec = 100
        slicer.util.delayDisplay(message, msec)
