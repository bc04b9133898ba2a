"""First use in Slicer: what the engine needs beyond Slicer's own packages, installed with the user's consent,
outside Slicer's process.

Segmenting on the CPU needs ONNX Runtime alone (a 28 MB download, 83 MB installed: see
benchmarks/install_size.py). PyTorch, with MONAI, safetensors and onnx, is needed only for a GPU device or
for fine-tuning; it comes as the PyTorch extension gets it (light-the-torch picks the CUDA build that fits
the driver; fepegar/SlicerPyTorch, ``installTorch``) but without that extension's closing ``import torch``:
Slicer's process never imports torch.

Nothing is imported to find out what is missing. pip runs in a ``qt.QProcess`` (:class:`InstallRun`, polled
like the engine), so Slicer stays responsive through a multi-GB download, with pip's last line as progress.
Slicer's own numpy and SimpleITK, and an installed torch, are pinned by a constraints file so that pip never
replaces them. In testing mode nothing is installed: a missing package is then an error saying what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import tempfile
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from LiverSegExtension.errors import CancelledError, LiverSegError
from LiverSegExtension.model.runtimes import installed

#: What segmenting on the CPU needs beyond Slicer's own packages (import name -> requirement).
SEGMENT_REQUIREMENTS = {"onnxruntime": "onnxruntime>=1.16"}
#: What GPUs and fine-tuning need besides torch.
TORCH_REQUIREMENTS = {"monai": "monai>=1.3", "safetensors": "safetensors>=0.4", "onnx": "onnx>=1.15"}
MINIMUM_TORCH = "2.0"  # the engine uses torch.inference_mode and safetensors' torch API
TORCH_REQUIREMENT = f"torch>={MINIMUM_TORCH}"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what the PyTorch extension installs torch with
PROTECTED = ("numpy", "SimpleITK", "torch")
GPU_DEVICES = ("cuda", "mps")


def importable(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it (the engine's own test)."""
    return installed(name)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_needed() -> bool:
    """True when torch is absent or older than the engine needs (read from its metadata, not imported)."""
    if not importable("torch"):
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
    missing = [req for name, req in wanted.items() if not importable(name)]
    return ([TORCH_REQUIREMENT] if torch and torch_needed() else []) + missing


def constraints_file() -> str:
    """A constraints file pinning the packages Slicer (or an earlier torch install) provides to the versions there."""
    lines = []
    for dist in PROTECTED:
        try:
            lines.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    path = Path(tempfile.mkdtemp(prefix="LiverSeg-pip-")) / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def install_commands(packages: list[str], constraints: str) -> list[list[str]]:
    """The ``python -m ...`` argument lists that install ``packages``, one command after another. Lists, not
    strings: a Windows path such as ``C:\\Users\\John Smith\\...`` must reach pip whole."""
    commands: list[list[str]] = []
    rest = [p for p in packages if p != TORCH_REQUIREMENT]
    if TORCH_REQUIREMENT in packages:  # as the PyTorch extension does: light-the-torch picks the CUDA build
        commands.append(["-m", "pip", "install", LIGHT_THE_TORCH, "--constraint", constraints])
        commands.append(["-m", "light_the_torch", "install", TORCH_REQUIREMENT, "--constraint", constraints])
    if rest:
        commands.append(["-m", "pip", "install", *rest, "--constraint", constraints])
    return commands


def ask_to_install(packages: list[str]) -> None:
    """One dialog for everything missing; LiverSegError when declined, or in testing mode (nothing is
    installed in a test)."""
    import slicer

    if slicer.app.testingEnabled():
        raise LiverSegError(f"LiverSeg needs these Python packages, which are not installed: {', '.join(packages)}")
    size = ("PyTorch is large (up to a few GB with CUDA): this can take many minutes. "
            if TORCH_REQUIREMENT in packages else "This takes a few seconds. ")
    if not slicer.util.confirmOkCancelDisplay(
        "LiverSeg needs these Python packages, which will be downloaded and installed now:\n\n"
        + "\n".join(packages) + f"\n\n{size}Slicer stays usable meanwhile; its own numpy and SimpleITK are not "
        "changed.", "LiverSeg: install Python packages",
    ):
        raise LiverSegError(f"LiverSeg cannot run without: {', '.join(packages)} (installation declined)")


class InstallRun:
    """pip (and light-the-torch) in a QProcess, one command after another; polled from the main thread."""

    def __init__(self, packages: list[str], python: str | None = None) -> None:
        from LiverSegLib.engine import python_executable

        self.packages = list(packages)
        self.python = python or python_executable()
        self.commands = install_commands(self.packages, constraints_file())
        self.stage = "installing " + ", ".join(self.packages)
        self.fraction = 0.0
        self.error: LiverSegError | None = None
        self.details = ""
        self.finished = False
        self._lines: deque[str] = deque(maxlen=40)
        self._process = None
        self._index = -1
        self._next()

    @property
    def done(self) -> bool:
        return self.finished or self.error is not None

    def _next(self) -> None:
        import qt

        self._index += 1
        if self._index == len(self.commands):
            importlib.invalidate_caches()  # find_spec must see what pip just installed
            self.finished = True
            return
        arguments = self.commands[self._index]
        logging.info("LiverSeg: %s %s", self.python, " ".join(arguments))
        process = qt.QProcess()
        process.setProgram(self.python)
        process.setArguments(arguments)
        process.start()
        if not process.waitForStarted(15000):
            self.error = LiverSegError(f"could not start {self.python} to install {', '.join(self.packages)}")
            return
        self._process = process
        self.fraction = self._index / len(self.commands)

    def poll(self) -> bool:
        """Take in pip's output; start the next command when one ends. True once all ended (or one failed)."""
        import qt

        from LiverSegLib.engine import _bytes

        if self.done:
            return True
        process = self._process
        text = (_bytes(process.readAllStandardOutput()) + _bytes(process.readAllStandardError())).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self._lines.append(line.strip())
                self.stage = line.strip()[:120]
        if process.state() != qt.QProcess.NotRunning:
            return False
        if process.exitCode() != 0:
            self.details = "\n".join(self._lines)
            self.error = LiverSegError(f"could not install {', '.join(self.packages)}: pip ended with exit code "
                                       f"{process.exitCode()} (see the details; are you online?)")
            return True
        self._next()
        return self.done

    def cancel(self) -> None:
        if not self.done:
            self.error = CancelledError()
            if self._process is not None:
                self._process.kill()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until done (scripts and tests)."""
        import time

        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll():
            if end is not None and time.monotonic() > end:
                return False
            if self._process is not None:
                self._process.waitForReadyRead(100)
        return True

    def still_missing(self) -> list[str]:
        """What is still not importable after the install (an install that said it worked but did not)."""
        names = {req: re.split(r"[<>=!~ \[]", req, maxsplit=1)[0] for req in self.packages}
        return [req for req, name in names.items() if not importable(name.replace("-", "_"))]
