"""Checkpoints: everything a resume needs in ``OUTPUT/checkpoint.pt`` (tensors and plain values only, loaded with
``weights_only=True``), the settings a resumed run must share with the one that wrote it, and whether a run is
finished under its budget."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import STAGES
from LiverSegExtension.training.config import TrainConfig, peak_lr

if TYPE_CHECKING:  # types only: the packed runner (scripts/device_train.py) checks settings without SimpleITK
    from LiverSegExtension.data.msd import LabelledCase
    from LiverSegExtension.model.networks import LiverModel

CHECKPOINT = "checkpoint.pt"


CHECKPOINT_KEYS = ("stage_index", "iteration", "best", "elapsed", *(f"net_{s}" for s in STAGES))


def run_settings(cfg: TrainConfig, train_cases: list[LabelledCase], val_cases: list[LabelledCase]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (the budget may change)."""
    return {
        "training cases": sorted(c.name for c in train_cases),
        "validation cases": sorted(c.name for c in val_cases),
        "oversample": {k: int(v) for k, v in sorted(cfg.oversample.items())},
        "stages": list(cfg.stages), "seed": int(cfg.seed), "ema": float(cfg.ema), "lr": peak_lr(cfg),
        "batch size": int(cfg.batch_size), "fine spacing mm": cfg.fine_spacing_mm,
    }


def check_resume(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint under other settings: the result would belong to neither run."""
    if saved is None:  # written before settings were recorded
        return
    if not isinstance(saved, dict):
        raise LiverSegError(f"{path}: not a LiverSeg training checkpoint (its settings are not a record)")
    differ = [_difference(key, saved.get(key), now[key]) for key in now if saved.get(key) != now[key]]
    if differ:
        raise LiverSegError(f"{path}: written by a run with other settings ({'; '.join(differ)}); "
                            "resume with the same ones, or train into a new --output")


def _difference(key: str, then: Any, now: Any) -> str:
    """One setting that differs, saying only what changed (for case lists: which cases came or went)."""
    if isinstance(then, list) and isinstance(now, list):
        added, gone = [c for c in now if c not in then], [c for c in then if c not in now]
        parts = ([f"{', '.join(added)} added"] if added else []) + ([f"{', '.join(gone)} gone"] if gone else [])
        return f"{key}: {'; '.join(parts) or 'order differs'}"
    return f"{key} {then} then, {now} now"


def finished_run(out: Path, cfg: TrainConfig) -> bool:
    """Whether ``out`` holds a run that completed under this budget (a rerun must not train again)."""
    path = out / CHECKPOINT
    if not path.is_file():
        return False
    return load_checkpoint(path).get("finished") == budget(cfg)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint of ours, loaded as data (``weights_only``: no code runs), or a one-line error."""
    def refuse(reason: str) -> LiverSegError:
        return LiverSegError(f"{path}: not a LiverSeg training checkpoint ({reason}); move it away or train into "
                             "a new --output")

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not one of ours, or cut short
        raise refuse(str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    if not isinstance(ckpt, dict):
        raise refuse(f"holds a {type(ckpt).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise refuse(f"no {', '.join(missing[:3])}")
    return ckpt


def budget(cfg: TrainConfig) -> dict[str, Any]:
    return {"iterations": int(cfg.iterations), "max_minutes": cfg.max_minutes}


def resume(ckpt_path: Path, model: LiverModel, settings: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """(where the run stands, the optimizer's state, the moving average's state): from the checkpoint, whose
    weights go into ``model``, when there is one written under the same settings; else the start."""
    state: dict[str, Any] = {"stage_index": 0, "iteration": 0, "best": -1.0, "elapsed": 0.0}
    if not ckpt_path.is_file():
        return state, None, None
    ckpt = load_checkpoint(ckpt_path)
    check_resume(ckpt_path, ckpt.get("settings"), settings)
    for s in STAGES:
        try:
            model.networks[s].load_state_dict(ckpt[f"net_{s}"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise LiverSegError(f"{ckpt_path}: its {s} weights do not fit this model ({str(exc)[:120]})") from None
    state = {k: ckpt[k] for k in state}
    print(f"resuming from {ckpt_path}: stage {STAGES[int(state['stage_index'])]}, "
          f"iteration {int(state['iteration'])}", flush=True)
    return state, ckpt.get("optim"), ckpt.get("ema")
