"""The card of a trained model: what it takes from its parent, what it was trained on (so that a fine-tune of
it can find and replay that data), and how it validated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from LiverSegExtension.data.msd import LabelledCase
from LiverSegExtension.model.catalog import next_version
from LiverSegExtension.model.networks import LiverModel
from LiverSegExtension.training.config import TrainConfig, peak_lr

#: What a fine-tuned model takes from its parent's card as its own: architecture, preprocessing, terms of use.
ARCHITECTURE_KEYS = ("name", "version", "intensity_window", "stages", "licence", "intended_use")

#: What was measured on the parent, not on the new model: kept under ``inherited_from_parent``, marked so.
INHERITED_KEYS = ("cpu_time", "known_issues")


def architecture(card: dict[str, Any]) -> dict[str, Any]:
    return {k: card[k] for k in ARCHITECTURE_KEYS if k in card}


def starting_architecture(cfg: TrainConfig, parent_card: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture a run trains: the parent's (or the default), with the fine stage's grid moved to
    ``cfg.fine_spacing_mm`` when asked (the networks are convolutional: the same weights run on any grid, and
    training on the new one teaches them its scale)."""
    card = copy.deepcopy(architecture(parent_card) if parent_card else LiverModel.new().card)
    if cfg.fine_spacing_mm is not None:
        card["stages"]["fine"]["spacing_mm"] = [float(cfg.fine_spacing_mm)] * 3
    return card


def training_data_entries(cases: list[LabelledCase]) -> list[dict[str, Any]]:
    """The card's ``training_data``: each dataset by name and absolute path with its cases and header fixes
    (what a fine-tune of this model looks for to replay its training data)."""
    by_folder: dict[str, dict[str, Any]] = {}
    for c in cases:
        folder = c.dataset or c.image.resolve().parent.parent
        entry = by_folder.setdefault(str(folder), {"name": folder.name, "path": str(folder), "cases": []})
        entry["cases"].append(c.name)
        if c.direction_fix is not None:
            entry.setdefault("header_fixes", {})[c.name] = {"from": list(c.direction_fix[0]),
                                                             "to": list(c.direction_fix[1])}
    return list(by_folder.values())


def save_model(model: LiverModel, cfg: TrainConfig, parent: LiverModel | None, train_cases: list[LabelledCase],
                rows: list[dict[str, Any]], out: Path, iteration: int) -> None:
    version = cfg.version or next_version(parent.card.get("version") if parent else None)
    parent_cases = set(parent.card.get("training", {}).get("cases", [])) if parent else set()
    added = [c for c in train_cases if c.name not in parent_cases] if parent else []
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "hd95_mm", "msd_mm")} if rows else {}
    extra: dict[str, Any] = {
        "name": cfg.name or (parent.card.get("name") if parent else None) or "liverseg",
        "version": version,
        "parent_model": parent.name if parent else None,
        "parent": ({"name": parent.card.get("name"), "version": parent.card.get("version"),
                    "weights_sha256": parent.card.get("weights_sha256"), "path": str(Path(cfg.init).resolve())}
                   if parent else None),
        "added_cases": [c.name for c in added],
        "added_case_sources": {c.name: {"dataset": str(c.dataset or c.image.parent.parent), **(c.provenance or {})}
                               for c in added},
        "training": {
            "datasets": sorted({str(c.dataset or c.image.resolve().parent.parent) for c in train_cases}),
            "cases": [c.name for c in train_cases],
            "iterations_fine": iteration if "fine" in cfg.stages else 0,  # ``iteration``: the last stage trained's
            **({"iterations_coarse": iteration} if list(cfg.stages) == ["coarse"] else {}),
            "seed": cfg.seed,
            "device": cfg.device,
            "oversample": dict(cfg.oversample),
            "stages": list(cfg.stages),
            "recipe": {"iterations": cfg.iterations, "max_minutes": cfg.max_minutes, "lr": peak_lr(cfg), "warmup": cfg.warmup,
                       "batch_size": cfg.batch_size, "ema": cfg.ema, "val_every": cfg.val_every},
        },
        "training_data": training_data_entries(train_cases),
        "validation": {"cases": rows, "mean": mean},
    }
    if parent:
        inherited = {k: parent.card[k] for k in INHERITED_KEYS if k in parent.card}
        if inherited:
            extra["inherited_from_parent"] = {"note": f"measured on {parent.name}, not on this model", **inherited}
    model.save(out, extra)
