"""The engine in a process of its own, so that Slicer never freezes and never imports torch.

Slicer's main thread holds the GIL while it sits in the Qt event loop, so a Python worker thread would
only advance while the main thread runs Python. Instead Slicer's own Python (``PythonSlicer``) runs
``python -m LiverSegExtension.worker`` through ``qt.QProcess``; requests go to its stdin and JSON lines
come back on its stdout (see that module for the protocol). The process stays up between runs, so only
the first run pays for loading the model; a cancel kills it at once, and the next run starts a new one.

``PythonSlicer`` is CTK's application launcher: it runs the real Python as its child, forwards its
channels, does not end the child when it is killed itself, and reports a crashed child as exit code 1
(commontk/AppLauncher, ``ctkAppLauncher.cpp``). So killing the QProcess is not enough: the engine's own
pid (from its ``ready`` message) is killed too, while the launcher still runs (after that the pid may name
another process), and a crash is told by the protocol (no answer before the process ended), not by Qt's exit
status. The worker also ends itself when its launcher goes.

Everything here is polled from the main thread (a QTimer in the panel, :meth:`SegmentRun.wait` in
scripts): no callback ever runs on another thread, and MRML is touched only by the caller.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import LiverSegExtension
from LiverSegExtension import protocol
from LiverSegExtension.errors import CancelledError, LiverSegError

ENGINE_ROOT = Path(LiverSegExtension.__file__).resolve().parent.parent  # the folder holding the engine package
WORKER_ARGUMENTS = ["-u", "-m", "LiverSegExtension.worker"]
STDERR_LINES = 40  # what is kept of the engine's stderr, for the details of an error
CRASHED = "the LiverSeg engine crashed or was killed (out of memory?)"


def python_executable() -> str:
    """Slicer's Python launcher, ``PythonSlicer`` (on Slicer's PATH; it sets up Slicer's library paths); outside
    Slicer (plain Python with slicer-core) this Python. Inside Slicer ``sys.executable`` is no Python to start:
    Slicer sets it to what it finds of PythonSlicer (nothing: an empty string), and where Python is embedded
    it names the application, which would start a second Slicer."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if not hasattr(sys.modules.get("slicer"), "app"):
        return sys.executable
    raise LiverSegError("PythonSlicer, Slicer's Python launcher, was not found on PATH: LiverSeg needs it to run its "
                        "engine and to install packages (start Slicer with its own launcher, the Slicer executable)")


def _bytes(data: Any) -> bytes:
    """The bytes of what QProcess returns (a QByteArray in PythonQt)."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return bytes(data.data()) if hasattr(data, "data") else bytes(data)


class EngineProcess:
    """One engine process: start it, send it requests, read what it says; kill or stop it."""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or python_executable()
        self.ready: dict | None = None  # the engine's "ready" message: its pid, runtimes and devices
        self._process = None
        self._buffer = b""
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)

    def start(self, arguments: list[str] | None = None) -> EngineProcess:
        import qt

        process = qt.QProcess()
        process.setProgram(self.python)
        process.setArguments(list(arguments or WORKER_ARGUMENTS))
        process.setWorkingDirectory(str(ENGINE_ROOT))  # ``-m`` imports the engine from there
        process.start()
        if not process.waitForStarted(15000):
            raise LiverSegError(f"the LiverSeg engine could not be started with {self.python}")
        self._process = process
        logging.info("LiverSeg: engine process %s started", self.pid)
        return self

    @property
    def running(self) -> bool:
        import qt

        return self._process is not None and self._process.state() != qt.QProcess.NotRunning

    @property
    def pid(self) -> int | None:
        """The launcher's pid (the QProcess's); the engine's own is ``engine_pid``."""
        return int(self._process.processId()) if self._process is not None else None

    @property
    def engine_pid(self) -> int | None:
        """The engine's own pid, as its ``ready`` message gave it (behind a launcher, not the QProcess's)."""
        return protocol.Ready.read(self.ready).pid if self.ready else None

    def send(self, request: dict) -> None:
        self._process.write((json.dumps(request) + "\n").encode("utf-8"))  # built by protocol.*_request

    def read(self) -> list[dict]:
        """The messages that arrived since the last call (never blocks)."""
        if self._process is None:
            return []
        for line in _bytes(self._process.readAllStandardError()).decode("utf-8", "replace").splitlines():
            self._stderr.append(line)
            logging.debug("LiverSeg engine: %s", line)
        self._buffer += _bytes(self._process.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for line in lines:
            message = protocol.parse_message(line)
            if message is None:
                logging.debug("LiverSeg engine (not a message): %r", line[:200])
                continue
            if protocol.event_of(message) == protocol.READY:
                spoken = protocol.Ready.read(message).protocol
                if spoken != protocol.VERSION:  # an engine of another LiverSeg version: refuse it
                    messages.append(protocol.error(None, f"the LiverSeg engine speaks protocol {spoken}, this panel "
                                                         f"{protocol.VERSION}: the engine package and the module are of "
                                                         "different versions (reinstall the extension and restart Slicer)",
                                                   user=True))
                    self.kill()
                    continue
                self.ready = message
            messages.append(message)
        return messages

    def wait_for_output(self, msecs: int) -> None:
        """Block until the engine writes something or ``msecs`` pass (scripts; the panel polls instead)."""
        if self.running:
            self._process.waitForReadyRead(msecs)

    def description(self) -> str:
        """How the process ended (its exit code; behind the launcher a crash is exit code 1), with the last
        lines it wrote to stderr."""
        if self._process is None:
            return "never started"
        if self.running:
            return "still running"
        tail = [line for line in self._stderr if line.strip()][-3:]
        return f"exit code {self._process.exitCode()}" + (": " + " | ".join(tail) if tail else "")

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def kill(self) -> None:
        """End the engine now (cancel, scene close): its own process and the launcher's."""
        kill_behind_launcher(self._process, self.engine_pid)

    def stop(self) -> None:
        """Ask the process to quit, kill it if it does not within a few seconds."""
        if self.running:
            self.send(protocol.quit_request())
            if not self._process.waitForFinished(3000):
                self.kill()


def kill_behind_launcher(process, child: int | None) -> None:
    """Kill a QProcess and, where it is CTK's launcher, the program it runs as its child (``child``: that
    program's own pid, as it said it): a killed launcher leaves its child running. The child is killed only
    while the launcher still runs: a launcher that has ended has reaped its child, whose pid may by now name
    another process (pids are reused fast on Windows). Waits at most a second for the launcher to go."""
    import qt

    if process is None or process.state() == qt.QProcess.NotRunning:
        return
    if child is not None and child != int(process.processId()) and not process.waitForFinished(0):
        kill_pid(child)
    if process.state() != qt.QProcess.NotRunning:
        process.kill()
        process.waitForFinished(1000)


def kill_pid(pid: int) -> None:
    """Kill a process by pid, if it still runs (the engine behind the launcher)."""
    try:
        os.kill(pid, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
    except (OSError, ValueError):
        pass  # gone already


class _EngineRun:
    """What a request to an engine process shares: its output, reading the engine's messages, whether it is
    done, waiting for it."""

    ready_stage = "engine ready"  # what the panel shows once the engine has started

    def __init__(self, engine: EngineProcess, request: dict, stage: str) -> None:
        self.engine, self.request, self.stage = engine, request, stage
        self.fraction = 0.0
        self.info: dict = {}  # the last progress message
        self.notes: list[str] = []
        self.result: dict | None = None
        self.error: LiverSegError | None = None
        self.details = ""  # a traceback from the engine, for an unexpected error

    @property
    def output_path(self) -> Path:
        return Path(self.request["output"])

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def wait(self, timeout_s: float | None = None, progress=None) -> bool:
        """Block until done (scripts and tests), calling ``progress(fraction, stage)`` on each change."""
        return wait_for(self, timeout_s, progress)

    def poll(self) -> bool:
        """Take in what the engine said; True once the run has a result or an error."""
        if self.done:
            return True
        alive = self.engine.running  # before reading: whatever it wrote before it ended is read below
        for message in self.engine.read():
            if self.done or not self._mine(message):
                continue
            event = protocol.event_of(message)
            if event == protocol.READY:
                self.stage = self.ready_stage
            elif event == protocol.NOTE:
                self.notes.append(protocol.note_text(message))
            else:
                self._take(message)
        self._ended(alive)
        return self.done

    def _mine(self, message: dict) -> bool:
        """Whether a message answers this run (an engine may serve several, one after another)."""
        return True

    def _ended(self, alive: bool) -> None:
        """After reading: what this run does when it is done, or when the engine ended without answering."""
        raise NotImplementedError

    def _take(self, message: dict) -> bool:
        """Take in a progress, result or error message (False for any other)."""
        event = protocol.event_of(message)
        if event == protocol.PROGRESS:
            (self.fraction, self.stage), self.info = protocol.read_progress(message), message
        elif event == protocol.RESULT:
            self.result, self.fraction, self.stage = message, 1.0, "done"
        elif event == protocol.ERROR:
            text, self.details = protocol.read_error(message)
            self.error = LiverSegError(text)
        else:
            return False
        return True


class SegmentRun(_EngineRun):
    """One segmentation request to the engine process: its progress and, when done, its outcome.

    The input and output node IDs are fixed here, when the run starts: what the panel selects later does
    not change where the result goes.
    """

    def __init__(self, engine: EngineProcess, request: dict, workdir: Path, scene, volume_id: str,
                 segmentation_id: str | None, source: str) -> None:
        super().__init__(engine, request, "starting the engine" if engine.ready is None else "queued")
        self.workdir, self.scene = workdir, scene
        self.volume_id, self.segmentation_id, self.source = volume_id, segmentation_id, source

    @property
    def id(self) -> int:
        return int(self.request["id"])

    def _mine(self, message: dict) -> bool:
        return protocol.id_of(message) in (self.id, None)

    def _ended(self, alive: bool) -> None:
        if not self.done and not alive:  # it ended without answering: whatever its exit code says, it crashed
            self.error = LiverSegError(f"{self.source}: {CRASHED} before it finished ({self.engine.description()}); "
                                       "the scene was not changed")
            self.details = self.engine.stderr_tail

    def cancel(self) -> None:
        """Stop now: the engine process is killed (the next run starts a new one)."""
        if not self.done:
            self.error = CancelledError()
            self.engine.kill()

    def cleanup(self) -> None:
        """Remove the private folder that held the CT and the mask."""
        shutil.rmtree(self.workdir, ignore_errors=True)


class TrainRun(_EngineRun):
    """One fine-tune in an engine process of its own (segmentation keeps its own engine meanwhile).

    ``progress`` messages carry the training iteration, loss and, while the new model is compared with its
    parent, the Dice of each case; ``notes`` say what the plan found (replayed data, held-back cases). A
    cancel kills the process and removes the new model's folder if this run created it.
    """

    ready_stage = "preparing the training cases"

    def __init__(self, engine: EngineProcess, request: dict) -> None:
        super().__init__(engine, request, "starting the engine")
        self.created = not Path(request["output"]).exists()

    def _ended(self, alive: bool) -> None:
        if self.done or not alive:
            self.engine.stop()  # this process served one fine-tune
            if not self.done:
                self.error = LiverSegError(f"fine-tuning stopped: {CRASHED} ({self.engine.description()})")
                self.details = self.engine.stderr_tail

    def cancel(self) -> None:
        if not self.done:
            self.error = CancelledError()
            self.engine.kill()
            if self.created:
                shutil.rmtree(self.output_path, ignore_errors=True)


def wait_for(run: _EngineRun, timeout_s: float | None = None, progress=None) -> bool:
    """Poll ``run`` until it is done or ``timeout_s`` pass (False then), reporting each change of progress."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while not run.poll():
        if progress is not None and (run.fraction, run.stage) != last:
            last = (run.fraction, run.stage)
            progress(*last)
        if end is not None and time.monotonic() > end:
            return False
        run.engine.wait_for_output(100)
    if progress is not None:
        progress(run.fraction, run.stage)
    return True


def outcome(run, what: str) -> dict[str, Any]:
    """A finished engine run's result message, or its error raised (an unexpected one's traceback logged)."""
    run.poll()
    if run.error is not None:
        if run.details:
            logging.error("LiverSeg: %s\n%s", run.error, run.details)
        raise run.error
    if not run.done:
        raise LiverSegError(f"{what} has not finished")
    return run.result
