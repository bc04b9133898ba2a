"""Model folders: ``card.json`` plus ``model.safetensors`` (weights that cannot execute code on load).

A model has two stages sharing one card: ``coarse`` finds the liver in the whole scan at low resolution,
``fine`` segments a crop around it. The card holds everything needed to rebuild and trust the networks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from LiverSegExtension.catalog import CARD_FILE, STAGES, WEIGHTS_FILE, read_card
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import atomic_write
from LiverSegExtension.unet import UNet

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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LiverModel:
    """A loaded model: its card and one network per stage (in eval mode)."""

    card: dict[str, Any]
    networks: dict[str, torch.nn.Module] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.card.get('name', 'unnamed')} v{self.card.get('version', '?')}"

    def stage(self, name: str) -> dict[str, Any]:
        return self.card["stages"][name]

    @property
    def window(self) -> tuple[float, float]:
        low, high = self.card["intensity_window"]
        return float(low), float(high)

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
        model = cls(card=card, path=folder)
        for s in STAGES:
            net = build_network(card["stages"][s]["network"])
            prefix = f"{s}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise LiverSegError(f"{weights_path}: weights do not fit the card's {s} network ({exc})") from None
            model.networks[s] = net.to(device).eval()
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s}.{k}": v.detach().cpu().contiguous() for s, n in self.networks.items() for k, v in n.state_dict().items()}

    def save(self, folder: str | Path, extra_card: dict[str, Any] | None = None) -> Path:
        """Write weights and card into ``folder`` (created); the card gets the weights' sha256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        card = {**self.card, **(extra_card or {})}

        def write_weights(tmp: str) -> None:
            save_file(self.state_dict(), tmp)
            os.chmod(tmp, 0o644)  # safetensors creates 0600: a model in a shared folder must be readable
            card["weights_sha256"] = sha256_of(tmp)  # of the bytes that land, before they land

        atomic_write(folder / WEIGHTS_FILE, write_weights, overwrite=True)
        atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"), overwrite=True)
        self.card, self.path = card, folder
        return folder
