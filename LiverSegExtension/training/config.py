"""What a training run is asked to do (:class:`TrainConfig`), and the learning rate it implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from LiverSegExtension.model.catalog import STAGES, TRAIN_EMA, TRAIN_ITERATIONS, TRAIN_VAL_EVERY


@dataclass
class TrainConfig:
    data: list[Path]
    output: Path
    init: Path | None = None
    val_cases: list[str] = field(default_factory=list)
    iterations: int = TRAIN_ITERATIONS  # fine-stage iterations; the coarse stage gets half as many
    max_minutes: float | None = None
    device: str = "auto"
    seed: int = 0
    val_every: int = TRAIN_VAL_EVERY
    batch_size: int = 2
    lr: float | None = None  # peak learning rate; default 2e-3, or a quarter of that when starting from ``init``
    warmup: float = 0.0  # share of each stage's iterations over which the learning rate rises linearly from 0
    ema: float = TRAIN_EMA  # decay of the weights' moving average (0: validate and save the raw weights)
    oversample: dict[str, int] = field(default_factory=dict)  # case name -> times it is drawn as often
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # the others are kept from ``init``
    fine_spacing_mm: float | None = None  # the fine stage's grid; default: the parent's (2.5 mm from scratch)
    name: str | None = None  # default: the parent's name when fine-tuning, else "liverseg"
    version: str | None = None


def peak_lr(cfg: TrainConfig) -> float:
    return float(cfg.lr) if cfg.lr is not None else (5e-4 if cfg.init else 2e-3)
