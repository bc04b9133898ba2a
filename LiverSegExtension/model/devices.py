"""PyTorch devices for training and the torch runtime: CUDA or MPS when present, the CPU otherwise.

torch is imported only when a function here is called: segmenting on the CPU needs no torch at all
(see :mod:`LiverSegExtension.model.runtimes`).
"""

from __future__ import annotations

from typing import Any

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.environment import TORCH_HINT, available_devices, installed

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: Any = "auto") -> Any:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a present ``torch.device``, or say clearly why not."""
    if not installed("torch"):
        raise LiverSegError(f"PyTorch is needed here and is not installed: {TORCH_HINT}")
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if "mps" not in available_devices():
            raise LiverSegError("device 'mps' was requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LiverSegError(f"device '{name}' was requested but no CUDA GPU is available on this machine")
        index = 0 if name == "cuda" else name.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise LiverSegError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device(f"cuda:{int(index)}")
    raise LiverSegError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
