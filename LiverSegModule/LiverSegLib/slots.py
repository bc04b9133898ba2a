"""What a panel's slot does with an error. Nothing may leave a slot: PythonQt prints the traceback of an exception
that does (``PythonQtSignalTarget::call`` -> ``PythonQt::handleError``) and the panel is left half-updated.
``slicer.util.tryWithErrorDisplay`` shows ``traceback.format_exc()`` as the dialog's details and raises again, so
it is kept for what is unexpected (a bug: its traceback helps). A ``LiverSegError`` is the user's to act on (a
folder, an input, a missing PythonSlicer): it is told in one line, without details.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import slicer

from LiverSegExtension.errors import LiverSegError
from LiverSegLib.progress import show_error


@contextlib.contextmanager
def reported(message: str, tell: Callable[[str], None] = show_error) -> Iterator[None]:
    """Run a slot's body: a LiverSegError goes to ``tell`` (after the wait cursor is gone); anything else is shown
    by ``tryWithErrorDisplay`` with ``message`` and its traceback, and logged; nothing is raised."""
    said = None
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            try:
                yield
            except LiverSegError as exc:
                said = str(exc)
    except Exception:  # noqa: BLE001 - shown (with its traceback) by tryWithErrorDisplay; a slot must not raise
        logging.exception("LiverSeg: %s", message)
    if said is not None:
        tell(said)
