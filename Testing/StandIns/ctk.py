"""Stand-in for Slicer's ``ctk`` module (CTK's widgets through PythonQt), test-only: the widgets a panel builds
in code, the same classes the ``qt`` stand-in's .ui loader makes. Enum values from CTK's ``ctkPathLineEdit.h``."""

from __future__ import annotations

import qt


class ctkCollapsibleButton(qt.ctkCollapsibleButton):
    pass


class ctkPathLineEdit(qt.ctkPathLineEdit):
    Dirs, Files, Drives = 0x001, 0x002, 0x004
