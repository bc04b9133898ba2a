"""Choosing where the networks run: CUDA or MPS when present, the CPU otherwise."""

from __future__ import annotations

import torch

from LiverSegExtension.errors import LiverSegError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices present on this machine, in order of preference for ``auto`` (CPU always last)."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a present torch device, or say clearly why not."""
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
