"""Model folders: ``card.json``, ``model.safetensors`` for PyTorch and ``model.onnx`` for ONNX Runtime (both data:
neither can execute code on load).

A model has two stages sharing one card: ``coarse`` finds the liver in the whole scan at low resolution,
``fine`` segments a crop around it. The card holds everything needed to rebuild and trust the networks:
the architecture, and the sha256 of both files. Saving writes both, and checks that ONNX Runtime gives
PyTorch's logits on a test input before the card says the ONNX file belongs to it.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import CARD_FILE, ONNX_FILE, STAGES, WEIGHTS_FILE, ModelInfo, read_card, sha256_of
from LiverSegExtension.model.unet import UNet

#: Architecture and preprocessing of a new model; the card of a trained model records its own copy.
DEFAULT_CONFIG: dict[str, Any] = {
    "intensity_window": [-200.0, 300.0],
    "stages": {
        "coarse": {
            "spacing_mm": [6.0, 6.0, 6.0],
            "network": {"type": "monai.networks.nets.UNet", "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                        "num_res_units": 1},
            "patch_size": [64, 64, 64],
        },
        "fine": {
            "spacing_mm": [2.5, 2.5, 2.5],
            "network": {"type": "monai.networks.nets.UNet", "channels": [16, 32, 64, 128, 192],
                        "strides": [2, 2, 2, 2], "num_res_units": 1},
            "patch_size": [96, 96, 96],
            "margin_mm": 20.0,
        },
    },
}


def build_network(network: dict[str, Any]) -> torch.nn.Module:
    if network.get("type") != "monai.networks.nets.UNet":
        raise LiverSegError(f"unsupported network type in model card: {network.get('type')!r}")
    # MONAI's UNet, built without importing MONAI (see unet.py): the same modules, names and weights.
    return UNet(in_channels=1, out_channels=2, channels=network["channels"], strides=network["strides"],
                num_res_units=network.get("num_res_units", 1))


ONNX_OPSET = 17
#: ONNX Runtime's logits may differ from PyTorch's by float rounding only: this much, times the largest logit.
ONNX_TOLERANCE = 1e-3


def _downsampling(card: dict[str, Any], stage: str) -> int:
    """How many voxels of input make one at a stage network's deepest level."""
    return int(np.prod(card["stages"][stage]["network"]["strides"]))


def export_onnx(networks: dict[str, torch.nn.Module], card: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write both stages into one ONNX file: inputs ``coarse_image`` and ``fine_image`` (``[1, 1, z, y, x]``,
    any size the network takes), outputs ``coarse_logits`` and ``fine_logits``. Each input has a small default,
    so a caller feeds only the stage it runs. Checked against PyTorch on a test input per stage; returns what
    the card records (opset, the check's largest logit difference)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graphs, defaults, largest = [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="liverseg-onnx-") as tmp:
        for stage in STAGES:
            net = copy.deepcopy(networks[stage]).cpu().eval()
            side = 2 * _downsampling(card, stage)  # instance norm needs more than one voxel at the bottom
            part = Path(tmp) / f"{stage}.onnx"
            with warnings.catch_warnings():  # the exporter's notes on tracing and instance norm
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (torch.zeros(1, 1, side, side, side),), str(part), dynamo=False,
                                  opset_version=ONNX_OPSET, input_names=[f"{stage}_image"],
                                  output_names=[f"{stage}_logits"],
                                  dynamic_axes={f"{stage}_image": {2: "z", 3: "y", 4: "x"},
                                                f"{stage}_logits": {2: "z", 3: "y", 4: "x"}})
            graphs.append(onnx.compose.add_prefix(onnx.load(str(part)), prefix=f"{stage}/", rename_inputs=False,
                                                  rename_outputs=False))
            defaults.append(numpy_helper.from_array(np.zeros((1, 1, side, side, side), np.float32), f"{stage}_image"))
    first = graphs[0]
    graph = onnx.helper.make_graph(
        [n for g in graphs for n in g.graph.node], "liverseg", [i for g in graphs for i in g.graph.input],
        [o for g in graphs for o in g.graph.output], [t for g in graphs for t in g.graph.initializer] + defaults)
    merged = onnx.helper.make_model(graph, opset_imports=first.opset_import, producer_name="liverseg")
    merged.ir_version = first.ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for stage in STAGES:
        step = _downsampling(card, stage)
        x = rng.random((1, 1, 2 * step, 3 * step, 4 * step), dtype=np.float32)  # unequal sides: axes not swapped
        net = copy.deepcopy(networks[stage]).cpu().eval()
        with torch.inference_mode():
            expected = net(torch.from_numpy(x)).numpy()
        got = session.run([f"{stage}_logits"], {f"{stage}_image": x})[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise LiverSegError(f"{path}: ONNX Runtime's {stage} logits differ from PyTorch's by {diff:.2g}")
        largest = max(largest, diff)
    return {"file": ONNX_FILE, "opset": ONNX_OPSET, "exported_with": f"torch {torch.__version__}",
            "checked_with": f"onnxruntime {ort.__version__}", "max_abs_logit_diff": float(f"{largest:.3g}")}


@dataclass
class LiverModel(ModelInfo):
    """A loaded model: its card and one network per stage (in eval mode)."""

    networks: dict[str, torch.nn.Module] = field(default_factory=dict)

    @classmethod
    def new(cls, card: dict[str, Any] | None = None) -> LiverModel:
        """An untrained model from a card (the default architecture when none is given)."""
        card = copy.deepcopy(card) if card else {"name": "liverseg", "version": "0.0.0", **copy.deepcopy(DEFAULT_CONFIG)}
        nets = {s: build_network(card["stages"][s]["network"]) for s in STAGES}
        return cls(card=card, networks=nets)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> LiverModel:
        """Load a model folder, checking the card and the weights' sha256 before reading any tensor."""
        folder = Path(folder)
        card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
        if not folder.is_dir():
            raise LiverSegError(f"{folder}: model folder not found")
        if not card_path.is_file() or not weights_path.is_file():
            raise LiverSegError(f"{folder}: not a model folder (needs {CARD_FILE} and {WEIGHTS_FILE})")
        card = read_card(folder)
        expected = card.get("weights_sha256")
        actual = sha256_of(weights_path)
        if expected != actual:
            raise LiverSegError(
                f"{weights_path}: checksum mismatch (card says {expected}, file is {actual}); "
                "the weights are corrupt or do not belong to this card"
            )
        try:
            tensors = load_file(str(weights_path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise LiverSegError(f"{weights_path}: unreadable weights ({exc})") from None
        model = cls(card=card, path=folder, networks={s: build_network(card["stages"][s]["network"]) for s in STAGES})
        model.load_state(tensors, str(weights_path))
        for net in model.networks.values():
            net.to(device).eval()
        return model

    def load_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Weights in :meth:`state_dict`'s layout (``coarse.…``, ``fine.…``) into the networks; ``source`` names
        where they came from in the error when they do not fit."""
        for s, net in self.networks.items():
            try:
                net.load_state_dict({k[len(s) + 1:]: v for k, v in tensors.items() if k.startswith(f"{s}.")})
            except RuntimeError as exc:
                raise LiverSegError(f"{source}: weights do not fit the card's {s} network ({str(exc)[:200]})") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s}.{k}": v.detach().cpu().contiguous() for s, n in self.networks.items() for k, v in n.state_dict().items()}

    def save(self, folder: str | Path, extra_card: dict[str, Any] | None = None) -> Path:
        """Write weights, their ONNX twin and the card into ``folder`` (created); the card gets both files'
        sha256 and the ONNX check."""
        from LiverSegExtension.io import atomic_write  # here: loading and building need no SimpleITK (io needs it)

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        card = {**self.card, **(extra_card or {})}

        def write_weights(tmp: str) -> None:
            save_file(self.state_dict(), tmp)
            os.chmod(tmp, 0o644)  # safetensors creates 0600: a model in a shared folder must be readable
            card["weights_sha256"] = sha256_of(tmp)  # of the bytes that land, before they land

        atomic_write(folder / WEIGHTS_FILE, write_weights, overwrite=True)
        self._write_onnx(folder, card)
        return folder

    def add_onnx(self, folder: str | Path) -> Path:
        """Write the ONNX twin of a saved model's weights into its folder and record it in the card (the
        weights are not touched)."""
        return self._write_onnx(Path(folder), dict(self.card))

    def _write_onnx(self, folder: Path, card: dict[str, Any]) -> Path:
        from LiverSegExtension.io import atomic_write

        def write_onnx(tmp: str) -> None:
            card["onnx"] = export_onnx(self.networks, card, tmp)
            os.chmod(tmp, 0o644)
            card["onnx"]["sha256"] = sha256_of(tmp)

        atomic_write(folder / ONNX_FILE, write_onnx, overwrite=True)
        atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"), overwrite=True)
        self.card, self.path = card, folder
        return folder
