"""Running the engine off the main thread so Slicer stays responsive.

The worker touches no MRML: it gets a private copy of the voxels and the IJK-to-RAS matrix, and the
main thread polls it (a QTimer in the widget; ``wait()`` in scripts and tests) and writes the result.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One background computation: progress, cancel flag, and either a result or an error."""

    target: Callable[..., Any]
    external_cancel: Callable[[], bool] | None = None  # also asked at every step, from the worker thread
    fraction: float = 0.0
    stage: str = "queued"
    result: Any = None
    error: BaseException | None = None
    details: str = ""
    _cancel: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Job:
        self._thread = threading.Thread(target=self._run, name="LiverSeg", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.target(progress=self._progress, cancel=self._should_stop)
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc
            self.details = traceback.format_exc()

    def _should_stop(self) -> bool:
        if self.external_cancel is not None and self.external_cancel():
            self._cancel.set()
        return self._cancel.is_set()

    def _progress(self, fraction: float, stage: str) -> None:
        self.fraction, self.stage = fraction, stage

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done
