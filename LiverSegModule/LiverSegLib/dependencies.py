"""First use in Slicer: what the engine needs beyond Slicer's own packages, installed with the user's consent,
outside Slicer's process.

Segmenting on the CPU needs ONNX Runtime alone (a 28 MB download, 83 MB installed: see
benchmarks/install_size.py). PyTorch, with MONAI, safetensors and onnx, is needed only for a GPU device or
for fine-tuning. torch comes through light-the-torch, which picks the CUDA build that fits the driver (as the
PyTorch extension's ``installTorch`` does, fepegar/SlicerPyTorch), with two differences: Slicer's process never
imports torch, and light-the-torch is installed into a private folder with the older pip it requires
(light-the-torch 0.8.1 wants pip < 26.1; Slicer 5.10 ships pip 26.1), so Slicer's own pip is never replaced.

Nothing is imported to find out what is missing. Each command runs in a ``qt.QProcess`` (:class:`InstallRun`,
polled like the engine), so Slicer stays responsive through a multi-GB download, with pip's last line as
progress. Slicer's numpy, SimpleITK and pip, and an installed torch, are pinned by a constraints file written
just before each command, leaving out what that command installs. A cancel kills pip too: it runs behind
CTK's launcher (``installer.py``). In testing mode nothing is installed: a missing package is then an error
saying what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from LiverSegExtension.errors import CancelledError, LiverSegError
from LiverSegExtension.model.environment import GPU_DEVICES, TORCH_EXTRA, installed
from LiverSegLib.installer import PID_LINE

#: What segmenting on the CPU needs beyond Slicer's own packages (import name -> requirement).
SEGMENT_REQUIREMENTS = {"onnxruntime": "onnxruntime>=1.16"}
#: What GPUs and fine-tuning need besides torch.
TORCH_REQUIREMENTS = {r.split(">=")[0]: r for r in TORCH_EXTRA if not r.startswith("torch>=")}
TORCH_REQUIREMENT = next(r for r in TORCH_EXTRA if r.startswith("torch>="))  # the engine's torch extra
MINIMUM_TORCH = TORCH_REQUIREMENT.split(">=")[1]  # torch.inference_mode and safetensors' torch API
LIGHT_THE_TORCH = "light-the-torch>=0.5"
PROTECTED = ("numpy", "SimpleITK", "pip", "torch")  # kept at the version installed, unless being installed
INSTALLER = Path(__file__).resolve().with_name("installer.py")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_missing_or_old() -> bool:
    """True when torch is absent or older than the engine needs (read from its metadata, not imported)."""
    if not installed("torch"):
        return True
    try:
        return _version_tuple(version("torch")) < _version_tuple(MINIMUM_TORCH)
    except PackageNotFoundError:
        return True


def needs_torch(device: str | None = "auto", training: bool = False) -> bool:
    """Whether this use needs PyTorch: a GPU device, or fine-tuning."""
    return training or str(device or "auto").lower().startswith(GPU_DEVICES)


def missing_packages(device: str | None = "auto", training: bool = False) -> list[str]:
    """The requirements to install for segmenting on ``device`` (or for fine-tuning), torch first."""
    wanted = dict(SEGMENT_REQUIREMENTS)
    torch = needs_torch(device, training)
    if torch:
        wanted.update(TORCH_REQUIREMENTS)
    missing = [req for name, req in wanted.items() if not installed(name)]
    return ([TORCH_REQUIREMENT] if torch and torch_missing_or_old() else []) + missing


def requirement_name(requirement: str) -> str:
    """The distribution a requirement names, normalised: ``"SimpleITK>=2"`` -> ``"simpleitk"``."""
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def constraints_file(path: Path, installing: Iterable[str] = ()) -> str:
    """Pin the packages Slicer (or an earlier install) provides to the versions there, except those being
    installed now (pinning an old torch while asking for a newer one could never resolve)."""
    importlib.invalidate_caches()  # the metadata of what the previous command installed
    leave_out = {requirement_name(r) for r in installing}
    lines = []
    for dist in PROTECTED:
        if requirement_name(dist) in leave_out:
            continue
        try:
            lines.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@dataclass
class InstallStep:
    """One command: ``installer.py`` ``arguments``; ``installs`` is what it installs (left out of its
    constraints); unconstrained only for light-the-torch's private folder."""

    arguments: list[str]
    installs: list[str]
    constrained: bool = True


def install_steps(packages: list[str], private: Path) -> list[InstallStep]:
    """The commands that install ``packages``, one after another: torch first (light-the-torch from the
    ``private`` folder, with its own pip), then the rest with Slicer's pip. Argument lists, not strings: a
    Windows path such as ``C:\\Users\\John Smith\\...`` must reach pip whole."""
    steps: list[InstallStep] = []
    rest = [p for p in packages if p != TORCH_REQUIREMENT]
    if TORCH_REQUIREMENT in packages:
        steps.append(InstallStep(["pip", "install", "--target", str(private), LIGHT_THE_TORCH], [], constrained=False))
        steps.append(InstallStep(["--path", str(private), "light_the_torch", "install", TORCH_REQUIREMENT],
                                 [TORCH_REQUIREMENT]))
    if rest:
        steps.append(InstallStep(["pip", "install", *rest], rest))
    return steps


def ask_to_install(packages: list[str]) -> bool:
    """One dialog for everything missing: True to install, False when the user says no. In testing mode
    nothing is installed: LiverSegError saying what is missing."""
    import slicer

    if slicer.app.testingEnabled():
        raise LiverSegError(f"LiverSeg needs these Python packages, which are not installed: {', '.join(packages)}")
    size = ("PyTorch is large (up to a few GB with CUDA): this can take many minutes. "
            if TORCH_REQUIREMENT in packages else "This takes a few seconds. ")
    return bool(slicer.util.confirmOkCancelDisplay(
        "LiverSeg needs these Python packages, which will be downloaded and installed now:\n\n"
        + "\n".join(packages) + f"\n\n{size}Slicer stays usable meanwhile; its own numpy, SimpleITK and pip are "
        "not changed.", "LiverSeg: install Python packages",
    ))


class InstallRun:
    """The install commands in a QProcess each, one after another (``installer.py`` behind ``PythonSlicer``),
    polled from the main thread. Constraints files and light-the-torch's folder live in a temporary folder,
    removed when the run ends, however it ends."""

    def __init__(self, packages: list[str], python: str | None = None) -> None:
        from LiverSegLib.engine import python_executable

        self.packages = list(packages)
        self.python = python or python_executable()
        self.folder = Path(tempfile.mkdtemp(prefix="LiverSeg-pip-"))
        self.steps = install_steps(self.packages, self.folder / "light-the-torch")
        self.started: list[list[str]] = []  # each command's arguments, as started
        self.stage = "installing " + ", ".join(self.packages)
        self.fraction = 0.0
        self.error: LiverSegError | None = None
        self.details = ""
        self.finished = False
        self.child: int | None = None  # the installer's own pid, behind the launcher
        self._lines: deque[str] = deque(maxlen=40)
        self._pending = {"out": b"", "err": b""}
        self._process = None
        self._index = -1
        self._next()

    @property
    def done(self) -> bool:
        return self.finished or self.error is not None

    def _next(self) -> None:
        import qt

        self._index += 1
        if self._index == len(self.steps):
            importlib.invalidate_caches()  # find_spec must see what pip just installed
            self.finished = True
            self._remove_folder()
            return
        step = self.steps[self._index]
        arguments = ["-u", str(INSTALLER), *step.arguments]
        if step.constrained:
            path = self.folder / f"constraints-{self._index + 1}.txt"
            arguments += ["--constraint", constraints_file(path, step.installs)]
        logging.info("LiverSeg: %s %s", self.python, " ".join(arguments))
        process = qt.QProcess()
        process.setProgram(self.python)
        process.setArguments(arguments)
        process.start()
        self.started.append(arguments)
        if not process.waitForStarted(15000):
            self.error = LiverSegError(f"could not start {self.python} to install {', '.join(self.packages)}")
            self._remove_folder()
            return
        self._process, self.child = process, None
        self.fraction = self._index / len(self.steps)

    def _take_output(self) -> None:
        """Read what the command wrote: its pid line, and pip's lines (the last one is the stage shown)."""
        from LiverSegLib.engine import _bytes

        process = self._process
        for key, data in (("out", process.readAllStandardOutput()), ("err", process.readAllStandardError())):
            *lines, self._pending[key] = (self._pending[key] + _bytes(data)).split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith(PID_LINE) and line[len(PID_LINE):].isdigit():
                    self.child = int(line[len(PID_LINE):])
                elif line:
                    self._lines.append(line)
                    self.stage = line[:120]

    def poll(self) -> bool:
        """Take in pip's output; start the next command when one ends. True once all ended (or one failed)."""
        import qt

        if self.done:
            return True
        process = self._process
        self._take_output()
        if process.state() != qt.QProcess.NotRunning:
            return False
        if process.exitCode() != 0:
            self.details = "\n".join(self._lines)
            self.error = LiverSegError(f"could not install {', '.join(self.packages)}: pip ended with exit code "
                                       f"{process.exitCode()} (see the details; are you online?)")
            self._remove_folder()
            return True
        self._next()
        return self.done

    def cancel(self) -> None:
        """Stop now (Cancel, Slicer quitting): the launcher and pip behind it. A command started a moment ago
        may not have said its pid yet: waited for, at most 3 s."""
        import qt

        from LiverSegLib.engine import kill_behind_launcher

        if self.done:
            return
        self.error = CancelledError()
        process = self._process
        if process is not None:
            end = time.monotonic() + 3
            while self.child is None and process.state() != qt.QProcess.NotRunning and time.monotonic() < end:
                process.waitForReadyRead(100)
                self._take_output()
            kill_behind_launcher(process, self.child)
        self._remove_folder()

    def _remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until done (scripts and tests)."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll():
            if end is not None and time.monotonic() > end:
                return False
            if self._process is not None:
                self._process.waitForReadyRead(100)
        return True

    def still_missing(self) -> list[str]:
        """What is still not importable after the install (an install that said it worked but did not)."""
        return [req for req in self.packages if not installed(requirement_name(req).replace("-", "_"))]
