"""Stand-in for ``slicer.app`` and ``slicer.mrmlScene`` (test-only), and for the ``Slicer`` executable's way of
running Python (``python slicer_app.py [--no-main-window] [--testing] --python-script FILE [ARGS...]``).

Files load the way Slicer's own readers do: volumes through vtkSlicerVolumesLogic.AddArchetypeVolume
(what qSlicerVolumesReader calls), segmentations through vtkSlicerSegmentationsModuleLogic.

:func:`main` runs a script as qSlicerCoreApplication::handlePythonCommandLineArguments does (Slicer's
Base/QTCore/qSlicerCoreApplication.cxx, qSlicerCoreCommandOptions.cxx; CTK's ctkAbstractPythonManager.cpp):
slicerqt's root log handler first (Base/Python/slicerqt.py: level DEBUG, records to the application log,
which Slicer echoes on the terminal), ``sys.executable`` set to the PythonSlicer found on PATH (an empty
string when none), ``sys.argv`` the script and what follows it, the file executed with ``__name__`` ==
"__main__". SystemExit ends the application with its code (PythonQt's systemExitExceptionRaised ->
qSlicerCoreApplication::terminate); any other exception prints its traceback and the application goes on.
Slicer quits by itself after ``Slicer FILE.py``, ``-c`` and ``--testing`` (runPythonAndExit), never after
``--python-script``: it then waits in its event loop until something calls ``slicer.util.exit`` (or
sys.exit), for ever. Where the real one would wait for ever, the stand-in says so on stderr and ends with
:data:`STILL_RUNNING`, so that a test sees the hang at once instead of waiting on it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import slicer

STILL_RUNNING = 86  # the real Slicer would still be running: nothing told it to quit


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


class _CommandOptions:
    """qSlicerCoreCommandOptions: what ``slicer.util.exit`` sets."""

    def __init__(self, run_python_and_exit: bool = False) -> None:
        self.runPythonAndExit = run_python_and_exit


class _App:
    applicationName = "3D Slicer"

    def __init__(self, testing: bool) -> None:
        self._testing = testing
        self.overrideCursors = 0  # qSlicerApplication's override-cursor stack (QApplication)
        self._io = _IOManager(self)
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        self._options = _CommandOptions(testing)
        self.returnCode: int | None = None  # set by exit(): the event loop ends with it

    def testingEnabled(self) -> bool:
        return self._testing

    def commandOptions(self) -> _CommandOptions:
        return self._options

    def exit(self, status: int = 0) -> None:
        """QCoreApplication::exit: the running event loop ends with ``status``; the caller goes on meanwhile."""
        self.returnCode = int(status)

    def userSettings(self):
        """Slicer's settings; the developer panel's defaults registered (qSlicerSettingsDeveloperPanel.cxx)."""
        import qt

        settings = qt.QSettings()
        if settings.value("Developer/SelfTestDisplayMessageDelay") is None:
            settings.setValue("Developer/SelfTestDisplayMessageDelay", 750)
        return settings

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


class _ApplicationLogHandler(logging.Handler):
    """slicerqt's SlicerApplicationLogHandler: every record into the application log, which Slicer echoes on
    the terminal (here: stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def init_logging() -> None:
    """slicerqt.initLogging(logging.getLogger()): run before any script."""
    handler = _ApplicationLogHandler()
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def _execute(path: str) -> bool:
    """ctkAbstractPythonManager::executeFile; True when Python reported an error."""
    app = slicer.app
    folder = str(Path(path).resolve().parent)
    sys.path.insert(0, folder)
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(compile(Path(path).read_text(), path, "exec"), namespace)
    except SystemExit as exc:  # PythonQt -> systemExitExceptionRaised(code) -> qSlicerCoreApplication::terminate
        code = exc.code
        app.exit(code if isinstance(code, int) else (0 if code is None else 1))
    except Exception:
        traceback.print_exc()  # PythonQt prints it; the application goes on
        return True
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return False


def main(argv: list[str]) -> int:
    """``Slicer [--no-main-window] [--testing] [--python-script FILE | FILE.py | -c CODE] [ARGS...]``."""
    testing = "--testing" in argv
    argv = [a for a in argv if a not in ("--no-main-window", "--testing", "--disable-modules")]
    script, code, rest = None, None, []
    run_and_exit = testing
    if argv[:1] == ["--python-script"]:
        script, rest = argv[1], argv[2:]
    elif argv[:1] == ["-c"]:
        code, rest, run_and_exit = argv[1], argv[2:], True
    elif argv[:1] and argv[0].endswith(".py"):
        script, rest, run_and_exit = argv[0], argv[1:], True
    install(testing)
    app = slicer.app
    app.commandOptions().runPythonAndExit = run_and_exit
    init_logging()
    sys.executable = shutil.which("PythonSlicer") or ""
    sys.argv = [script or "", *rest]
    error = False
    if script is not None:
        error = _execute(script)
    if code is not None:
        try:
            exec(code, {"__name__": "__main__"})
        except SystemExit as exc:
            app.exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
        except Exception:
            traceback.print_exc()
            error = True
    if app.commandOptions().runPythonAndExit and app.returnCode is None:
        app.exit(1 if error else 0)
    if app.returnCode is None:  # the real one waits in its event loop here, for ever
        print("slicer_app: the script has ended and Slicer goes on running (nothing called slicer.util.exit)",
              file=sys.stderr, flush=True)
        return STILL_RUNNING
    app.quit()  # aboutToQuit
    return app.returnCode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
