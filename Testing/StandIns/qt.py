"""Stand-in for the ``qt`` module of Slicer's PythonQt (test-only; the module never imports it).

Covers only what LiverSeg's panel and engine client call, with PythonQt's idioms: ``connect("signal(args)",
slot)`` (a slot may take fewer arguments than the signal sends), properties read and written as attributes,
``QUiLoader`` building the widgets a ``.ui`` file names (with its properties and ``<connections>``), and a
``QProcess`` that runs a real child process. There is no event loop: tests call the panel's timer slot, and
each timer tick collects what processes wrote, as a turn of Qt's event loop would.
"""

from __future__ import annotations

import inspect
import os
import select
import subprocess
import time
import traceback
import weakref
import xml.etree.ElementTree as ET
from typing import Any, Callable


def _signal_name(signature: str) -> str:
    return signature.split("(", 1)[0].strip()


class QByteArray:
    """PythonQt's QByteArray: ``data()`` gives the bytes."""

    def __init__(self, data: bytes = b"") -> None:
        self._data = bytes(data)

    def data(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)


class QObject:
    """QObject: objectName (``name`` in PythonQt), children, dynamic properties, signals by name."""

    def __init__(self, parent: QObject | None = None) -> None:
        self.name = ""
        self._children: list[QObject] = []
        self._properties: dict[str, Any] = {}
        self._slots: dict[str, list[Callable]] = {}
        if parent is not None:
            parent._children.append(self)

    def children(self) -> list[QObject]:
        return list(self._children)

    def property(self, name: str) -> Any:
        return self._properties.get(name)

    def setProperty(self, name: str, value: Any) -> None:
        self._properties[name] = value

    def connect(self, signal: str, slot: Callable) -> None:
        self._slots.setdefault(_signal_name(signal), []).append(slot)

    def disconnect(self, signal: str, slot: Callable) -> None:
        slots = self._slots.get(_signal_name(signal), [])
        if slot in slots:
            slots.remove(slot)

    def emit(self, signal: str, *args: Any) -> None:
        """Call the connected slots, as PythonQt's ``PythonQtSignalTarget::call`` (src/PythonQtSignalReceiver.cpp)
        does: a slot gets as many of the signal's arguments as it takes, and an exception that leaves a slot goes
        to ``PythonQt::handleError``, which prints its traceback and returns to the emitter: the other slots run,
        the signal's sender goes on, nothing reaches the code that emitted. The stand-in keeps what it printed
        for :func:`take_slot_errors` (the tests fail on any they did not expect)."""
        for slot in list(self._slots.get(signal, [])):
            try:
                params = inspect.signature(slot).parameters.values()
                if any(p.kind == p.VAR_POSITIONAL for p in params):
                    count = len(args)
                else:
                    count = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
            except (TypeError, ValueError):
                count = len(args)
            try:
                slot(*args[:count])
            except Exception as exc:  # noqa: BLE001 - PythonQt::handleError: PyErr_Print, then on
                traceback.print_exc()
                _slot_errors.append(exc)


#: exceptions that left a slot (PythonQt printed them); read and cleared by :func:`take_slot_errors`
_slot_errors: list[BaseException] = []


def take_slot_errors() -> list[BaseException]:
    """The exceptions slots let out since the last call (PythonQt printed each with its traceback)."""
    errors = list(_slot_errors)
    _slot_errors.clear()
    return errors


class QLayout(QObject):
    """A layout: the widgets added, as its items (``count``, ``itemAt``, ``removeItem``: what
    ``slicer.util.reloadScriptedModule`` calls); each also becomes a child of the layout's widget."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(None)
        self._owner = parent
        self._items: list[QObject] = []

    def addWidget(self, widget: QWidget, *args: Any) -> None:
        self._items.append(widget)
        if self._owner is not None and widget not in self._owner._children:
            self._owner._children.append(widget)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QObject | None:
        return self._items[index] if 0 <= index < len(self._items) else None

    def removeItem(self, item: QObject) -> None:
        if item in self._items:
            self._items.remove(item)


QVBoxLayout = QHBoxLayout = QFormLayout = QGridLayout = QLayout


class QWidget(QObject):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.isEntered = False  # qSlicerAbstractModuleWidget's property, on the panel's parent widget
        self._layout: QLayout | None = None

    def setLayout(self, layout: QLayout) -> None:
        layout._owner = self
        self._layout = layout

    def layout(self) -> QLayout | None:
        return self._layout

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def deleteLater(self) -> None:
        pass

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)


class QLabel(QWidget):
    """QLabel(parent) or QLabel(text, parent)."""

    def __init__(self, text: Any = None, parent: QObject | None = None) -> None:
        if not isinstance(text, str):
            text, parent = "", text
        super().__init__(parent)
        self.text = text
        self.wordWrap = False


class QDialog(QWidget):
    """QDialog without an event loop: ``exec_()`` returns at once, as if its auto-close timer had fired
    (``slicer.util.delayDisplay``), and records the text of its labels in ``QDialog.shown``."""

    shown: list[str] = []

    def exec_(self) -> int:
        QDialog.shown.append("\n".join(c.text for c in self._children if isinstance(c, QLabel)))
        return 0

    def close(self) -> bool:
        self.visible = False
        return True


class QAbstractButton(QWidget):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.text = ""
        self.checkable = False
        self.checked = False

    def click(self) -> None:
        """QAbstractButton.click(): emits clicked(bool) when enabled."""
        if self.enabled:
            self.emit("clicked", self.checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    """QCheckBox: checkable; a click flips ``checked`` and emits toggled(bool), then clicked(bool)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.checkable = True

    def click(self) -> None:
        if self.enabled:
            self.checked = not self.checked
            self.emit("toggled", self.checked)
            self.emit("clicked", self.checked)


class QProgressBar(QWidget):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.value = 0
        self.minimum, self.maximum = 0, 100


class QSpinBox(QWidget):
    """QSpinBox: ``value`` (clamped to ``minimum``..``maximum``, the .ui's properties), valueChanged(int)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.minimum, self.maximum = 0, 99
        self._value = 0

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        value = max(int(self.minimum), min(int(self.maximum), int(value)))
        if value != self._value:
            self._value = value
            self.emit("valueChanged(int)", value)


class QLineEdit(QWidget):
    """QLineEdit (qtbase ``src/widgets/widgets/qlineedit.cpp``, ``qwidgetlinecontrol.cpp``): setting ``text`` emits
    textChanged(QString); ``keyClicks`` types one character at a time, as QTest::keyClicks, each keystroke
    emitting textChanged; ``pressReturn`` emits returnPressed() then editingFinished(), and ``focusOut`` (the
    focus leaving the edit) editingFinished(). Setting the text never emits editingFinished."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._text = ""
        self.placeholderText = ""

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self.emit("textChanged", value)

    def setText(self, value: str) -> None:
        self.text = str(value)

    def keyClicks(self, text: str) -> None:
        for character in text:
            self.text = self._text + character

    def pressReturn(self) -> None:
        self.emit("returnPressed")
        self.emit("editingFinished")

    def focusOut(self) -> None:
        self.emit("editingFinished")


class QToolButton(QAbstractButton):
    pass


class QFileDialog:
    """QFileDialog's static dialogs, answered as a user would: each call takes the next of ``answers`` (a path,
    or "" for Cancel, as the real ones return); with none queued it is cancelled."""

    answers: list[str] = []

    @staticmethod
    def getExistingDirectory(parent: Any = None, caption: str = "", directory: str = "", options: Any = None) -> str:
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""

    @staticmethod
    def getOpenFileName(parent: Any = None, caption: str = "", directory: str = "", filter: str = "",
                        selectedFilter: Any = None, options: Any = None) -> str:
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""


class _StandardItem:
    """QStandardItem, as ``combo.model().item(i)`` returns it."""

    def __init__(self) -> None:
        self._enabled = True

    def setEnabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    def isEnabled(self) -> bool:
        return self._enabled


class _ItemModel:
    def __init__(self, combo: QComboBox) -> None:
        self._combo = combo

    def item(self, row: int) -> _StandardItem:
        return self._combo._items[row][2]


class QComboBox(QWidget):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._items: list[tuple[str, Any, _StandardItem]] = []
        self._current = -1

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    @property
    def currentText(self) -> str:
        return self._items[self._current][0] if self._current >= 0 else ""

    def setCurrentIndex(self, index: int) -> None:
        index = index if 0 <= index < len(self._items) else -1
        if index != self._current:
            self._current = index
            self.emit("currentIndexChanged", index)

    def addItem(self, text: str, data: Any = None) -> None:
        self._items.append((text, data, _StandardItem()))
        if self._current < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self._items = []
        self.setCurrentIndex(-1)

    def itemData(self, index: int) -> Any:
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def findData(self, data: Any) -> int:
        return next((i for i, item in enumerate(self._items) if item[1] == data), -1)

    def model(self) -> _ItemModel:
        return _ItemModel(self)

    def lineEdit(self) -> QLineEdit | None:
        """The line edit of an editable combo box (None for one that is not)."""
        return getattr(self, "_lineEdit", None)


class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.collapsed = False


class ctkPathLineEdit(QWidget):
    """ctkPathLineEdit (CTK ``Libs/Widgets/ctkPathLineEdit.cpp``): the path is the text of an editable combo box's
    line edit (``comboBox().lineEdit()``), and every change of that text, each keystroke included, emits
    currentPathChanged(QString) (the line edit's textChanged is connected to ``updateHasValidInput``, which emits
    it whenever the validator accepts the text; without name filters it accepts any). ``setCurrentPath`` sets
    the line edit's text; ``browse()`` (its "..." button) asks QFileDialog and sets the path it returns."""

    Dirs, Files, Drives = 0x001, 0x002, 0x004

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.filters = 0
        self.showBrowseButton = True
        self.showHistoryButton = True
        self._combo = QComboBox(self)
        self._combo.editable = True
        self._combo._lineEdit = QLineEdit(self._combo)
        self._combo._lineEdit.connect("textChanged(QString)", self._updateHasValidInput)

    def _updateHasValidInput(self, text: str) -> None:
        self.emit("currentPathChanged", text)

    @property
    def currentPath(self) -> str:
        return self._combo._lineEdit.text

    @currentPath.setter
    def currentPath(self, value: str) -> None:
        self.setCurrentPath(value)

    def setCurrentPath(self, path: str) -> None:
        self._combo._lineEdit.text = str(path or "")

    def comboBox(self) -> QComboBox:
        return self._combo

    def browse(self) -> None:
        if (self.filters or 0) & self.Files:
            path = QFileDialog.getOpenFileName(self, "Open a file", self.currentPath)
        else:
            path = QFileDialog.getExistingDirectory(self, "Select a directory...", self.currentPath)
        if path:
            self.setCurrentPath(path)


class qMRMLWidget(QWidget):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.emit("mrmlSceneChanged", scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(qMRMLWidget):
    """qMRMLNodeComboBox: the nodes of ``nodeTypes`` in its scene; ``currentNodeChanged(vtkMRMLNode*)``."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = False
        self.removeEnabled = False
        self._node = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not None and self.nodeTypes and not any(node.IsA(t) for t in self.nodeTypes):
            node = None
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged", node)

    @property
    def currentNodeID(self) -> str:
        return self._node.GetID() if self._node is not None else ""


class QIcon:
    def __init__(self, path: str = "") -> None:
        self.path = str(path)


class QFile:
    ReadOnly = 1

    def __init__(self, path: str) -> None:
        self._path = str(path)

    def exists(self) -> bool:
        return os.path.isfile(self._path)

    def open(self, mode: int) -> bool:
        return self.exists()

    def fileName(self) -> str:
        return self._path


class QAbstractItemView:
    NoEditTriggers, SelectRows, SingleSelection = 0, 1, 1


class QTableWidgetItem:
    """QTableWidgetItem: a cell's text and tooltip."""

    def __init__(self, text: str = "") -> None:
        self._text, self._tip = str(text), ""

    def text(self) -> str:
        return self._text

    def setToolTip(self, text: str) -> None:
        self._tip = str(text)

    def toolTip(self) -> str:
        return self._tip


class QTableWidget(QWidget):
    """QTableWidget (qtbase ``src/widgets/itemviews/qtablewidget.cpp``): items by row and column, ``rowCount``
    read as PythonQt's property, ``currentRow()``; ``cellDoubleClicked(int,int)`` is emitted by tests."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.rowCount, self.columnCount = 0, 0
        self._items: dict[tuple[int, int], QTableWidgetItem] = {}
        self._headers: list[str] = []
        self._current = -1

    def setColumnCount(self, n: int) -> None:
        self.columnCount = int(n)

    def setRowCount(self, n: int) -> None:
        self.rowCount = int(n)
        self._items = {k: v for k, v in self._items.items() if k[0] < self.rowCount}
        if self._current >= self.rowCount:
            self._current = -1

    def setHorizontalHeaderLabels(self, labels: list[str]) -> None:
        self._headers = list(labels)

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        if 0 <= row < self.rowCount and 0 <= column < self.columnCount:
            self._items[(row, column)] = item

    def item(self, row: int, column: int) -> QTableWidgetItem | None:
        return self._items.get((row, column))

    def currentRow(self) -> int:
        return self._current

    def selectRow(self, row: int) -> None:
        self._current = row if 0 <= row < self.rowCount else -1
        self.emit("itemSelectionChanged")

    def setSelectionBehavior(self, behavior: int) -> None:
        pass

    def setSelectionMode(self, mode: int) -> None:
        pass

    def setEditTriggers(self, triggers: int) -> None:
        pass


_WIDGET_CLASSES = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QToolButton, QCheckBox, QProgressBar, QSpinBox, QLineEdit, QComboBox, ctkCollapsibleButton,
    ctkPathLineEdit, qMRMLWidget, qMRMLNodeComboBox)}


def _property_value(element: ET.Element) -> Any:
    for child in element:
        tag = child.tag
        if tag in ("string", "cstring"):
            return child.text or ""
        if tag == "bool":
            return child.text == "true"
        if tag == "number":
            return int(child.text)
        if tag == "double":
            return float(child.text)
        if tag == "stringlist":
            return [s.text or "" for s in child.findall("string")]
        if tag == "enum":
            return child.text
    return None


class QUiLoader:
    """QUiLoader.load: the widget tree of a .ui file, with its properties and signal-slot connections."""

    def load(self, qfile: QFile) -> QWidget:
        root = ET.parse(qfile.fileName()).getroot()
        named: dict[str, QObject] = {}

        def build(element: ET.Element, parent: QObject | None) -> QWidget:
            cls = element.get("class")
            if cls not in _WIDGET_CLASSES:
                raise RuntimeError(f"the Qt stand-in has no widget class {cls}")
            widget = _WIDGET_CLASSES[cls](parent)
            widget.name = element.get("name") or ""
            named[widget.name] = widget
            for prop in element.findall("property"):
                value = _property_value(prop)
                if prop.get("stdset") == "0":
                    widget.setProperty(prop.get("name"), value)
                elif prop.get("name") not in ("geometry", "sizePolicy"):
                    setattr(widget, prop.get("name"), value)
            for layout_or_widget in element:
                walk(layout_or_widget, widget)
            return widget

        def walk(element: ET.Element, parent: QObject) -> None:
            if element.tag == "widget":
                build(element, parent)
            elif element.tag in ("layout", "item"):
                for child in element:
                    walk(child, parent)

        top = build(root.find("widget"), None)
        for connection in root.iter("connection"):
            sender, receiver = named[connection.findtext("sender")], named[connection.findtext("receiver")]
            slot = getattr(receiver, _signal_name(connection.findtext("slot")))
            sender.connect(connection.findtext("signal"), slot)
        return top


class QSettings:
    """QSettings over one in-memory store shared by every instance (like one settings file)."""

    _store: dict[str, Any] = {}

    def value(self, key: str, default: Any = None) -> Any:
        return self._store.get(key, default)

    def setValue(self, key: str, value: Any) -> None:
        self._store[key] = value


class QTimer(QObject):
    """QTimer without an event loop: tests call the connected slot themselves while ``isActive()``."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval = 0
        self._active = False

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def start(self, msec: int | None = None) -> None:
        self._active = True

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    @staticmethod
    def singleShot(msec: int, slot: Callable) -> None:
        """A one-off timer: without an event loop it never fires (a dialog's exec_ returns at once instead)."""

    def timeout(self) -> None:
        """What the event loop does when the interval has passed (it has collected what processes wrote)."""
        process_events()
        if self._active:
            self.emit("timeout")


class QProcess(QObject):
    """QProcess over a real child process (subprocess.Popen): start, write to stdin, waitFor*, kill, state,
    exit code and status.

    As in Qt (qtbase ``src/corelib/io/qprocess.cpp``), what the child writes reaches ``readAllStandardOutput``
    and ``readAllStandardError`` only once the event loop (here: :func:`process_events`, which every QTimer
    tick and ``slicer.app.processEvents`` run) or a ``waitFor*`` call has collected it, and the state turns
    NotRunning only when the end has been collected the same way. ``waitForReadyRead`` and
    ``waitForFinished`` return False at once for a process that has finished.
    """

    NotRunning, Starting, Running = 0, 1, 2
    NormalExit, CrashExit = 0, 1
    _live: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._program, self._arguments, self._cwd = "", [], None
        self._popen: subprocess.Popen | None = None
        self._out, self._err = b"", b""
        self._state, self._code, self._status = self.NotRunning, 0, self.NormalExit

    def setProgram(self, program: str) -> None:
        self._program = program

    def setArguments(self, arguments: list[str]) -> None:
        self._arguments = list(arguments)

    def setWorkingDirectory(self, folder: str) -> None:
        self._cwd = folder

    def start(self) -> None:
        try:
            self._popen = subprocess.Popen([self._program, *self._arguments], cwd=self._cwd, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        except OSError:
            self._popen = None
            return
        for stream in (self._popen.stdout, self._popen.stderr):
            os.set_blocking(stream.fileno(), False)
        self._state = self.Running
        QProcess._live.add(self)

    def waitForStarted(self, msecs: int = 30000) -> bool:
        return self._popen is not None

    def state(self) -> int:
        return self._state

    def processId(self) -> int:
        return self._popen.pid if self._popen is not None and self._state != self.NotRunning else 0

    def write(self, data: bytes) -> int:
        if self._state != self.Running:
            return -1
        try:
            self._popen.stdin.write(bytes(data))
            self._popen.stdin.flush()
            return len(data)
        except (OSError, ValueError, AttributeError):
            return -1

    def _read_pipes(self) -> bool:
        """Move what the pipes hold into the buffers; True if stdout had something."""
        got = False
        for stream, name in ((self._popen.stdout, "_out"), (self._popen.stderr, "_err")):
            while True:
                try:
                    chunk = os.read(stream.fileno(), 1 << 16)
                except (BlockingIOError, OSError, ValueError):
                    break
                if not chunk:
                    break
                setattr(self, name, getattr(self, name) + chunk)
                got = got or name == "_out"
        return got

    def _collect(self) -> bool:
        """The event loop's work for this process: read the pipes, and notice its end (after the last
        output, as Qt reads everything before it emits finished)."""
        if self._popen is None or self._state == self.NotRunning:
            return False
        got = self._read_pipes()
        code = self._popen.poll()
        if code is not None:
            got = self._read_pipes() or got
            self._state = self.NotRunning
            self._code, self._status = (0, self.CrashExit) if code < 0 else (code, self.NormalExit)
            QProcess._live.discard(self)
            self.emit("finished", self._code, self._status)
        return got

    def readAllStandardOutput(self) -> QByteArray:
        data, self._out = self._out, b""
        return QByteArray(data)

    def readAllStandardError(self) -> QByteArray:
        data, self._err = self._err, b""
        return QByteArray(data)

    def waitForReadyRead(self, msecs: int = 30000) -> bool:
        if self._state != self.Running:
            return False
        end = time.monotonic() + max(0, msecs) / 1000
        while True:
            if self._collect():
                return True
            if self._state != self.Running:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return False
            select.select([self._popen.stdout, self._popen.stderr], [], [], min(left, 0.05))

    def waitForFinished(self, msecs: int = 30000) -> bool:
        if self._state != self.Running:
            return False
        try:
            self._popen.wait(None if msecs < 0 else msecs / 1000)
        except subprocess.TimeoutExpired:
            self._collect()
            return False
        self._collect()
        return True

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def exitCode(self) -> int:
        return self._code

    def exitStatus(self) -> int:
        return self._status


def process_events() -> None:
    """One turn of the event loop for every running QProcess."""
    for process in list(QProcess._live):
        process._collect()


class QMessageBox:
    Ok, Cancel, Yes, No, Retry, Close = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4


class Qt:
    WaitCursor = 3
