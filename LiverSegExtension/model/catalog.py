"""Model folders and their cards, without torch: what a door lists and shows before the engine runs.

The Slicer panel imports only this (Slicer ships no torch until the user agrees to install it);
``LiverSegExtension.model.networks`` loads the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError

WEIGHTS_FILE = "model.safetensors"  # for PyTorch: GPUs, training
ONNX_FILE = "model.onnx"  # the same networks for ONNX Runtime: segmenting on the CPU without PyTorch
CARD_FILE = "card.json"
STAGES = ("coarse", "fine")
#: The fine-tuning recipe's budget (``finetune``), here so that doors can show it without loading the engine.
#: training from scratch (``liverseg train`` without ``--init``): fine-stage iterations (the coarse stage gets half),
#: validation interval and the decay of the weights' moving average; the CLI and TrainConfig read these
TRAIN_ITERATIONS = 2000
TRAIN_VAL_EVERY = 250
TRAIN_EMA = 0.998
FINE_TUNE_ITERATIONS = 200
FINE_TUNE_LR = 1e-4
FINE_TUNE_EMA = 0.99  # the moving average of the weights spans about the last 100 of the 200 iterations


def bundled_models_dir() -> Path:
    """Where the extension ships its models: ``Resources/Models`` beside the package (source tree or
    installed extension), or the copy installed with the wheel."""
    here = Path(__file__).resolve().parents[1]  # the engine package (this is its model/ folder)
    installed = Path(sys.prefix) / "share" / "liverseg" / "Models"  # pip install . puts it there
    for candidate in (here.parent / "Resources" / "Models", installed):
        if candidate.is_dir():
            return candidate
    return here.parent / "Resources" / "Models"


def user_models_dir() -> Path:
    """Where users keep their own (fine-tuned) models; ``LIVERSEG_MODELS_DIR`` overrides it."""
    env = os.environ.get("LIVERSEG_MODELS_DIR")
    return Path(env) if env else Path.home() / ".liverseg" / "models"


def list_models(include_rejected: bool = False) -> list[Path]:
    """Model folders found in the bundled and user folders, bundled first, newest version first.

    A fine-tuned model that its regression guard rejected is left out unless ``include_rejected``.
    """
    found: list[Path] = []
    for root in (bundled_models_dir(), user_models_dir()):
        if root.is_dir():
            dirs = [p for p in root.iterdir() if (p / CARD_FILE).is_file()]
            if not include_rejected:
                dirs = [p for p in dirs if not is_rejected(p)]
            found.extend(sorted(dirs, key=lambda p: p.name, reverse=True))
    return found


def is_rejected(folder: Path) -> bool:
    """Whether the model was rejected by its regression guard, or is a fine-tune whose comparison with its
    parent never finished (stopped or killed): neither is offered by default."""
    try:
        card = json.loads((folder / CARD_FILE).read_text())
        verdict = card.get("verdict")
    except (OSError, ValueError, AttributeError):
        return False  # an unreadable card is listed, and reported when it is chosen
    if verdict is None:
        return isinstance(card.get("parent"), dict)  # fine-tuned (the parent is recorded), not yet judged
    return not (isinstance(verdict, dict) and verdict.get("accepted") is True)


def next_version(version: str | None) -> str:
    """The parent's minor version + 1 (``1.0.0`` -> ``1.1.0``); ``1.0.0`` for a first model."""
    if not version:
        return "1.0.0"
    major, minor, *_ = (str(version).split(".") + ["0", "0"])[:3]
    try:
        return f"{int(major)}.{int(minor) + 1}.0"
    except ValueError:
        return "1.0.0"


def new_model_dir(parent_card: dict[str, Any], root: Path | None = None) -> tuple[Path, str]:
    """A free folder (and its version) in the user's models for a fine-tune of ``parent_card``."""
    root = root or user_models_dir()
    name, version = str(parent_card.get("name") or "liverseg"), next_version(parent_card.get("version"))
    if not safe_name(name):  # a card read without read_card's checks
        raise LiverSegError(f"model name {name[:40]!r} cannot name a folder (letters, digits, '.', '_', '+', '-')")
    while (root / f"{name}-v{version}").exists():
        version = next_version(version)
    return root / f"{name}-v{version}", version


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_networks(folder: Path) -> bool:
    """Whether a folder holds a card and networks that some runtime can run."""
    return (folder / CARD_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or (folder / ONNX_FILE).is_file())


@dataclass
class ModelInfo:
    """A model folder's card, as the engine uses it to segment (no networks: a runtime holds those)."""

    card: dict[str, Any]
    path: Path | None = None

    @classmethod
    def read(cls, folder: str | Path) -> ModelInfo:
        return cls(read_card(folder), Path(folder))

    @property
    def name(self) -> str:
        return f"{self.card.get('name', 'unnamed')} v{self.card.get('version', '?')}"

    def stage(self, name: str) -> dict[str, Any]:
        return self.card["stages"][name]

    @property
    def window(self) -> tuple[float, float]:
        low, high = self.card["intensity_window"]
        return float(low), float(high)


def default_model_dir() -> Path | None:
    """The bundled model the engine uses when none is given, or None when no trained model is installed."""
    root = bundled_models_dir()
    if not root.is_dir():
        return None
    dirs = sorted((p for p in root.iterdir() if has_networks(p)), key=lambda p: p.name)
    return dirs[-1] if dirs else None


def read_card(folder: str | Path) -> dict[str, Any]:
    """A model folder's card, checked for what inference needs (without reading the weights)."""
    card_path = Path(folder) / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
    except OSError as exc:
        raise LiverSegError(f"{card_path}: cannot read the model card ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LiverSegError(f"{card_path}: invalid model card ({exc})") from None
    problem = card_problem(card)
    if problem:
        raise LiverSegError(f"{card_path}: invalid model card: {problem}")
    return card


def _numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


#: A name or version that may become part of a folder name: no separators, no "..", nothing hidden.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def safe_name(value: Any) -> bool:
    return isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None and ".." not in value


def card_problem(card: Any) -> str | None:
    """What makes a card unusable, naming the field, or None. A card is data from a file: a window that is
    a string, a spacing of 0 or a channel count of 65536 must not reach the networks or the resampler, and
    a name such as ``../../x`` must not lead a fine-tune's folder out of the models folder."""
    if not isinstance(card, dict):
        return "not a JSON object"
    for field in ("name", "version"):
        if field in card and not safe_name(card[field]):
            return (f"{field} must be letters, digits, '.', '_', '+' or '-' (it names folders), "
                    f"not {str(card[field])[:40]!r}")
    window = card.get("intensity_window")
    if not _numbers(window, 2) or not window[0] < window[1]:
        return "intensity_window must be two numbers, low < high (HU)"
    stages = card.get("stages")
    if not isinstance(stages, dict):
        return "stages must be an object with coarse and fine"
    for name in STAGES:
        stage = stages.get(name)
        if not isinstance(stage, dict):
            return f"stages.{name} is missing"
        spacing = stage.get("spacing_mm")
        if not _numbers(spacing, 3) or not all(0.3 <= v <= 20 for v in spacing):
            return f"stages.{name}.spacing_mm must be three spacings of 0.3 to 20 mm"
        margin = stage.get("margin_mm", 20.0)
        if not _numbers([margin], 1) or not 0 <= margin <= 200:
            return f"stages.{name}.margin_mm must be 0 to 200 mm"
        net = stage.get("network")
        if not isinstance(net, dict):
            return f"stages.{name}.network is missing"
        channels, strides = net.get("channels"), net.get("strides")
        if not (isinstance(channels, list) and 2 <= len(channels) <= 8
                and all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 1024 for c in channels)):
            return f"stages.{name}.network.channels must be 2 to 8 whole numbers of 1 to 1024"
        if not (isinstance(strides, list) and len(strides) == len(channels) - 1
                and all(isinstance(v, int) and v in (1, 2) for v in strides)):
            return f"stages.{name}.network.strides must be one fewer than channels, each 1 or 2"
        units = net.get("num_res_units", 1)
        if not isinstance(units, int) or not 1 <= units <= 4:
            return f"stages.{name}.network.num_res_units must be 1 to 4"
    return None


def bundled_model_name(folder: str | Path | None = None) -> str:
    """``liverseg v1.1.0``: the name and version of the model in ``folder`` (default: the one used when none is
    given), or why there is none."""
    folder = Path(folder) if folder else default_model_dir()
    if folder is None:
        return "none installed"
    try:
        card = read_card(folder)
    except LiverSegError:
        return f"{folder.name} (card unreadable)"
    return model_label(card)


def model_label(card: dict[str, Any]) -> str:
    """How a model is named in summaries, provenance and ``--version``: ``liverseg v1.1.0``."""
    return f"{card.get('name', 'liverseg')} v{card.get('version', '?')}"
