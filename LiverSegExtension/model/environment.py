"""What is installed here, found without importing it: packages, whether torch could reach a GPU, the devices
present. Runtimes, devices and the doors ask here; nothing here imports torch unless a GPU could be there."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

GPU_DEVICES = ("cuda", "mps")
#: the torch extra of pyproject.toml, spelt out: LiverSeg is installed from its folder, so "liverseg[torch]" is
#: not on any index (a test keeps the two lists equal)
TORCH_EXTRA = ("torch>=2.0", "monai>=1.3", "safetensors>=0.4", "onnx>=1.15")
TORCH_HINT = ("install PyTorch and what trains with it: pip install " + " ".join(f"'{r}'" for r in TORCH_EXTRA)
              + " (torch first, pinned, for the CPU or CUDA build you want; in Slicer, pick the device in the panel)")


def installed(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # 10 ms of start-up that segmenting never needs

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def torch_may_reach_gpu() -> bool:
    """Whether an installed torch could use a GPU here: a CUDA (or ROCm) build, or any build on Apple
    silicon (MPS). Read from torch's ``version.py``, not by importing it (1-2 s and 300 MB for nothing)."""
    spec = importlib.util.find_spec("torch") if installed("torch") else None
    if spec is None or not spec.submodule_search_locations:
        return False
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    text = ""
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        if path.is_file():
            text = path.read_text(errors="replace")
            break
    for line in text.splitlines():
        if line.startswith(("cuda", "hip")) and "=" in line:
            if line.split("=", 1)[1].strip() not in ("None", "'None'", ""):
                return True
    return False


def available_devices() -> list[str]:
    """Devices present, in the order ``auto`` prefers them; the CPU always last. GPUs are looked for only
    when torch could reach one (:func:`torch_may_reach_gpu`)."""
    found: list[str] = []
    if torch_may_reach_gpu():
        import torch

        if torch.cuda.is_available():
            found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append("mps")
    return [*found, "cpu"]


def runtimes_installed() -> dict[str, str | None]:
    """The installed version of each runtime (None: not installed), from package metadata."""
    return {"onnxruntime": package_version("onnxruntime") if installed("onnxruntime") else None,
            "torch": package_version("torch") if installed("torch") else None}
