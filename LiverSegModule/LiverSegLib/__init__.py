"""Helpers of the LiverSeg Slicer module. The engine (``LiverSegExtension``) is installed beside this
package in a built extension; from a source checkout it is found one folder up."""

from __future__ import annotations

import sys
from pathlib import Path

_MODULE_DIR = Path(__file__).resolve().parent.parent


def _make_engine_importable() -> None:
    """The engine of this checkout comes first (a ``pip install``-ed one of another version must not be
    mixed with this module); in a built extension it lies beside the module, on Slicer's path already."""
    checkout = _MODULE_DIR.parent
    if (checkout / "LiverSegExtension").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))


_make_engine_importable()


def resource_path(*parts: str) -> Path:
    """A file under Resources/: installed beside the module, or at the top of a source checkout."""
    for root in (_MODULE_DIR / "Resources", _MODULE_DIR.parent / "Resources"):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    return _MODULE_DIR.parent.joinpath("Resources", *parts)


def forget_modules() -> list[str]:
    """Drop LiverSeg's modules (this package and the engine's) from ``sys.modules``, so that the next import
    executes their files again. Slicer's Reload (``slicer.util.reloadScriptedModule``) re-executes LiverSeg.py
    alone, whose imports would otherwise return the modules loaded at startup (SlicerNNUnet's ``onReload``
    reloads its package's modules for the same reason). Returns the names dropped."""
    names = [name for name in sys.modules if name.split(".")[0] in ("LiverSegLib", "LiverSegExtension")]
    for name in names:
        del sys.modules[name]
    return names
