"""Model folders and their cards, without torch: what a door lists and shows before the engine runs.

The Slicer panel imports only this (Slicer ships no torch until the user agrees to install it);
``LiverSegExtension.model`` loads the weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
STAGES = ("coarse", "fine")
#: The fine-tuning recipe's budget (``finetune``), here so that doors can show it without loading the engine.
FINE_TUNE_ITERATIONS = 200
FINE_TUNE_LR = 1e-4
FINE_TUNE_EMA = 0.99  # the moving average of the weights spans about the last 100 of the 200 iterations


def bundled_models_dir() -> Path:
    """Where the extension ships its models: ``Resources/Models`` beside the package (source tree or
    installed extension), or the copy installed with the wheel."""
    here = Path(__file__).resolve().parent
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
    while (root / f"{name}-v{version}").exists():
        version = next_version(version)
    return root / f"{name}-v{version}", version


def default_model_dir() -> Path | None:
    """The bundled model the engine uses when none is given, or None when no trained model is installed."""
    root = bundled_models_dir()
    if not root.is_dir():
        return None
    dirs = sorted((p for p in root.iterdir() if (p / CARD_FILE).is_file() and (p / WEIGHTS_FILE).is_file()),
                  key=lambda p: p.name)
    return dirs[-1] if dirs else None


def read_card(folder: str | Path) -> dict[str, Any]:
    """A model folder's card, checked for what inference needs (without reading the weights)."""
    card_path = Path(folder) / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
        for s in STAGES:
            card["stages"][s]["spacing_mm"]  # noqa: B018 - presence check
            card["stages"][s]["network"]  # noqa: B018
        card["intensity_window"]  # noqa: B018
    except OSError as exc:
        raise LiverSegError(f"{card_path}: cannot read the model card ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LiverSegError(f"{card_path}: invalid model card ({exc})") from None
    return card
