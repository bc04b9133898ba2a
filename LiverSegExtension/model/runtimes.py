"""Where the networks run: ONNX Runtime on the CPU (no PyTorch needed), or PyTorch on CUDA, MPS or the CPU.

Segmenting needs only a forward pass, and ONNX Runtime gives it from a 28 MB wheel that imports in a
fraction of a second, where PyTorch weighs hundreds of MB to GB and takes 1-2 s to import. So ``auto`` runs
ONNX Runtime on the CPU unless a PyTorch that can reach a GPU is already installed. Nothing here imports
torch at module load; whether torch could reach a GPU is read from its build files first, so that a CPU
build of torch is never imported just to learn that it has no GPU.

A runtime turns a ``[1, 1, z, y, x]`` float32 array into ``[1, 2, z, y, x]`` logits (background, liver);
:func:`sliding_window` stitches windows for volumes larger than one window, as MONAI's inferer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import (
    CARD_FILE,
    ONNX_FILE,
    STAGES,
    WEIGHTS_FILE,
    ModelInfo,
    has_networks,
    read_card,
    sha256_of,
)
from LiverSegExtension.model.environment import (
    GPU_DEVICES,
    TORCH_HINT,
    available_devices,
    installed,
    torch_may_reach_gpu,
)

RUNTIMES = ("auto", "onnxruntime", "torch")

def choose(device: str | None, runtime: str | None = "auto", has_onnx: bool = True) -> tuple[str, str]:
    """``(runtime, device)`` for a requested device (``auto|cpu|cuda|cuda:N|mps``) and runtime, or a
    LiverSegError saying what is missing. GPUs need torch; the CPU prefers ONNX Runtime."""
    device = (device or "auto").strip().lower()
    runtime = (runtime or "auto").strip().lower()
    if runtime not in RUNTIMES:
        raise LiverSegError(f"unknown runtime '{runtime}': use auto, onnxruntime or torch")
    if device not in ("auto", "cpu", "mps", "cuda") and not device.startswith("cuda:"):
        raise LiverSegError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    gpu = device.startswith(GPU_DEVICES)
    if gpu and runtime == "onnxruntime":
        raise LiverSegError(f"device '{device}' runs through PyTorch; LiverSeg's ONNX Runtime path is for the CPU")
    if gpu or runtime == "torch":
        if not installed("torch"):
            raise LiverSegError(f"{'device ' + repr(device) if gpu else 'runtime torch'} needs PyTorch, which is "
                                f"not installed: {TORCH_HINT}")
        return "torch", device
    if device == "auto" and runtime == "auto" and torch_may_reach_gpu():
        first = available_devices()[0]
        if first != "cpu":
            return "torch", first
    ort = installed("onnxruntime") and has_onnx
    if runtime == "onnxruntime" or (runtime == "auto" and ort):
        if not installed("onnxruntime"):
            raise LiverSegError("runtime onnxruntime is not installed: pip install onnxruntime")
        if not has_onnx:
            raise LiverSegError(f"the model has no {ONNX_FILE} for ONNX Runtime (save it again with PyTorch installed)")
        return "onnxruntime", "cpu"
    if installed("torch"):
        return "torch", "cpu"
    if not has_onnx:
        raise LiverSegError(f"the model has no {ONNX_FILE} and PyTorch is not installed: {TORCH_HINT}")
    raise LiverSegError("no runtime to run the model: install onnxruntime (pip install onnxruntime) or PyTorch")


class OnnxRuntime:
    """A model folder's ``model.onnx`` in ONNX Runtime on the CPU. The file's sha256 is checked against the
    card before ONNX Runtime reads it; an ONNX file is data (a graph of standard operators), never code."""

    name = "onnxruntime"
    device = "cpu"

    def __init__(self, folder: str | Path, card: dict[str, Any] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        card = card if card is not None else read_card(folder)
        self.model = ModelInfo(card, folder)  # the card it runs by (a runtime's ``model``, as TorchRuntime's)
        path = folder / ONNX_FILE
        info = card.get("onnx") if isinstance(card.get("onnx"), dict) else {}
        if not path.is_file():
            raise LiverSegError(f"{folder}: the model has no {ONNX_FILE}")
        actual = sha256_of(path)
        if info.get("sha256") != actual:
            raise LiverSegError(f"{path}: checksum mismatch (card says {info.get('sha256')}, file is {actual}); the "
                                "ONNX file is corrupt or does not belong to this card")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its notes on inputs with defaults are not the user's business
        # Its threads wait without spinning between runs: spinning took the cores the resampling, the clean-up
        # and the writing need right after each network (0.15-0.2 s of a 0.8 s case on 2 cores), and changes
        # nothing in what the networks compute.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own error types
            if "bad_alloc" in str(exc) or "allocate" in str(exc).lower():
                raise LiverSegError(f"{path}: not enough memory to load the model") from None
            raise LiverSegError(f"{path}: unreadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        # inputs with a default are "overridable initializers" to ONNX Runtime
        names = {i.name for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers(),
                                  *self.session.get_outputs()]}
        missing = [n for s in STAGES for n in (f"{s}_image", f"{s}_logits") if n not in names]
        if missing:
            raise LiverSegError(f"{path}: not a LiverSeg ONNX model (no {', '.join(missing)})")
        self.version = ort.__version__

    def logits(self, stage: str, x: np.ndarray) -> np.ndarray:
        return self.session.run([f"{stage}_logits"], {f"{stage}_image": np.ascontiguousarray(x, np.float32)})[0]


class TorchRuntime:
    """A :class:`LiverSegExtension.model.networks.LiverModel`'s networks in PyTorch on a device."""

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch

        from LiverSegExtension.model.devices import resolve_device

        self.torch = torch
        self.model = model
        self._device = resolve_device(device)
        self.device = str(self._device)
        self.networks = {s: net.to(self._device).eval() for s, net in model.networks.items()}
        self.version = torch.__version__

    def logits(self, stage: str, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.networks[stage](torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self._device))
            return out.float().cpu().numpy()


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(roi, "gaussian")``: a separable Gaussian, 1 at the centre, clamped
    from below by its smallest value (at least 1e-3)."""
    weights = None
    for size in roi:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)[:size]
        g = np.exp(x**2 / np.float32(-2 * (size * sigma_scale) ** 2)).astype(np.float32)
        weights = g if weights is None else weights[..., None] * g
    assert weights is not None
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """MONAI's window positions on one axis (``dense_patch_slices``): every ``roi * (1 - overlap)`` voxels,
    the last moved back to end at the edge."""
    interval = roi if roi == size else max(1, int(roi * (1 - overlap)))
    count = next((d for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 0) + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def sliding_window(x: np.ndarray, roi: Sequence[int], predict: Callable[[np.ndarray], np.ndarray],
                   overlap: float = 0.25) -> np.ndarray:
    """MONAI's ``sliding_window_inference(x, roi, 1, predict, overlap, mode="gaussian")`` for a
    ``[1, 1, z, y, x]`` array: pad with zeros to at least one window (half before), run each window,
    blend with Gaussian weights, crop the padding off. Or one call when one window covers ``x``."""
    shape = x.shape[2:]
    pads = [((r - s) // 2, r - s - (r - s) // 2) if r > s else (0, 0) for r, s in zip(roi, shape)]
    padded = np.pad(x, [(0, 0), (0, 0), *pads]) if any(any(p) for p in pads) else x
    full = padded.shape[2:]
    if all(r == f for r, f in zip(roi, full)):  # one window: the weights cancel
        out = predict(padded)
    else:
        weights = gaussian_importance(roi)
        out, count = None, np.zeros(full, np.float32)
        for z in window_starts(full[0], roi[0], overlap):
            for y in window_starts(full[1], roi[1], overlap):
                for w in window_starts(full[2], roi[2], overlap):
                    box = (slice(z, z + roi[0]), slice(y, y + roi[1]), slice(w, w + roi[2]))
                    logits = predict(np.ascontiguousarray(padded[(..., *box)]))
                    if out is None:
                        out = np.zeros((1, logits.shape[1], *full), np.float32)
                    out[(..., *box)] += logits * weights
                    count[box] += weights
        assert out is not None
        out /= count
    return out[(..., *(slice(b, b + s) for (b, _), s in zip(pads, shape)))]


def load_runtime(model: Any, device: str | None = "auto", runtime: str | None = "auto") -> Any:
    """A runtime for ``model``: a model folder (ONNX Runtime or torch, as :func:`choose` picks) or a loaded
    :class:`~LiverSegExtension.model.networks.LiverModel` (torch, on ``device``)."""
    if not isinstance(model, (str, Path)):
        chosen, device = choose(str(device or "auto"), "torch")
        return TorchRuntime(model, device)
    folder = Path(model)
    if not folder.is_dir():
        raise LiverSegError(f"{folder}: model folder not found")
    if not has_networks(folder):
        raise LiverSegError(f"{folder}: not a model folder (needs {CARD_FILE} and {ONNX_FILE} or {WEIGHTS_FILE})")
    chosen, device = choose(device, runtime, has_onnx=(folder / ONNX_FILE).is_file())
    if chosen == "onnxruntime":
        return OnnxRuntime(folder)
    from LiverSegExtension.model.networks import LiverModel

    return TorchRuntime(LiverModel.load(folder), device)
