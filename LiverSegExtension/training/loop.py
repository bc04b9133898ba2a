"""Training and fine-tuning: coarse stage then fine stage, with validation, checkpoints and resume.

Everything needed to resume lives in ``OUTPUT/checkpoint.pt`` (tensors and plain values only, loaded
with ``weights_only=True``); the best model so far is always a complete model folder in ``OUTPUT``.

Validation and the saved model use an exponential moving average (EMA) of the weights: with a few
training cases, single checkpoints swing by tenths of Dice on an odd validation case from one
validation to the next; the average is steadier and no slower at inference.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from LiverSegExtension.data.metrics import case_metrics
from LiverSegExtension.data.msd import Case, load_msd, to_grid
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference.segmenter import LiverSegmenter
from LiverSegExtension.io import atomic_write
from LiverSegExtension.model.catalog import STAGES, TRAIN_EMA, TRAIN_ITERATIONS, TRAIN_VAL_EVERY, next_version
from LiverSegExtension.model.devices import resolve_device
from LiverSegExtension.model.networks import LiverModel
from LiverSegExtension.training.augment import training_transforms

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.csv"


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
    name: str | None = None  # default: the parent's name when fine-tuning, else "liverseg"
    version: str | None = None


def _run_settings(cfg: TrainConfig, train_cases: list[Case], val_cases: list[Case]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (the budget may change)."""
    return {
        "training cases": sorted(c.name for c in train_cases),
        "validation cases": sorted(c.name for c in val_cases),
        "oversample": {k: int(v) for k, v in sorted(cfg.oversample.items())},
        "stages": list(cfg.stages), "seed": int(cfg.seed), "ema": float(cfg.ema), "lr": _lr(cfg),
        "batch size": int(cfg.batch_size),
    }


def _check_resume(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint under other settings: the result would belong to neither run."""
    if saved is None:  # written before settings were recorded
        return
    if not isinstance(saved, dict):
        raise LiverSegError(f"{path}: not a LiverSeg training checkpoint (its settings are not a record)")
    differ = [_difference(key, saved.get(key), now[key]) for key in now if saved.get(key) != now[key]]
    if differ:
        raise LiverSegError(f"{path}: written by a run with other settings ({'; '.join(differ)}); "
                            "resume with the same ones, or train into a new --output")


def _lr(cfg: TrainConfig) -> float:
    return float(cfg.lr) if cfg.lr is not None else (5e-4 if cfg.init else 2e-3)


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
    return load_checkpoint(path).get("finished") == _budget(cfg)


CHECKPOINT_KEYS = ("stage_index", "iteration", "best", "elapsed", *(f"net_{s}" for s in STAGES))


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


def _budget(cfg: TrainConfig) -> dict[str, Any]:
    return {"iterations": int(cfg.iterations), "max_minutes": cfg.max_minutes}


def _log(msg: str) -> None:
    print(msg, flush=True)


def split_cases(cases: list[Case], val_names: list[str]) -> tuple[list[Case], list[Case]]:
    known = {c.name for c in cases}
    missing = [v for v in val_names if v not in known]
    if missing:
        raise LiverSegError(f"validation case(s) not in the dataset: {', '.join(missing)}")
    train = [c for c in cases if c.name not in val_names]
    val = [c for c in cases if c.name in val_names]
    if not train:
        raise LiverSegError("no training cases left after taking out the validation cases")
    return train, val


def prepare(cases: list[Case], spacing: list[float]) -> list[dict[str, np.ndarray]]:
    """Each case on the stage's grid, as ``[1, z, y, x]`` arrays ready for the transforms."""
    items = []
    for c in cases:
        image, label = c.read()
        hu, lab = to_grid(image, label, spacing)
        items.append({"image": hu[None], "label": lab[None], "name": c.name})
    return items


def load_validation(val: list[Case]) -> list[tuple[str, sitk.Image, np.ndarray]]:
    """Validation cases read once: (name, CT, reference mask)."""
    loaded = []
    for c in val:
        image, label = c.read()
        loaded.append((c.name, image, sitk.GetArrayFromImage(label) > 0))
    return loaded


def validate(model: LiverModel, val: list[tuple[str, sitk.Image, np.ndarray]], device: torch.device | str,
             progress: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the full coarse-to-fine pipeline on each validation case at its own resolution;
    ``progress(i, row)`` after each case."""
    segmenter = LiverSegmenter(model, device=device)
    rows = []
    for i, (name, image, ref) in enumerate(val):
        result = segmenter.segment_image(image, source=name)
        m = case_metrics(result.mask, ref, image.GetSpacing()[::-1])
        rows.append({"case": name, **m, "seconds": result.seconds})
        if progress:
            progress(i, rows[-1])
    for net in model.networks.values():
        net.train()
    return rows


def _batch(
    items: list[dict], transform: Callable, batch_size: int, rng: random.Random, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(batch_size):
        out = transform(rng.choice(items))
        out = out[0] if isinstance(out, list) else out
        images.append(torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(out["label"]), dtype=torch.float32))
    return torch.stack(images).to(device), torch.stack(labels).to(device)


def _tensorboard(out: Path):
    """A TensorBoard writer in OUTPUT/tensorboard when tensorboard is installed, else None (CSV only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _new_ema(net: torch.nn.Module, decay: float) -> AveragedModel | None:
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay > 0 else None


@contextmanager
def _stage_net(model: LiverModel, stage: str, net: torch.nn.Module) -> Iterator[None]:
    """Let ``model`` use ``net`` for ``stage`` for a while (the EMA network, to validate or save it)."""
    kept = model.networks[stage]
    model.networks[stage] = net
    try:
        yield
    finally:
        model.networks[stage] = kept


Progress = Callable[[dict[str, Any]], None]


def _starting_model(parent: LiverModel | None, device: torch.device | str) -> LiverModel:
    """A new model of the parent's architecture and weights (or a fresh default one), on ``device``, training."""
    model = LiverModel.new(architecture(parent.card) if parent else None)
    if parent:
        for s in STAGES:
            model.networks[s].load_state_dict(parent.networks[s].state_dict())
    for net in model.networks.values():
        net.to(device).train()
    return model


def _resume(ckpt_path: Path, model: LiverModel, settings: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """(where the run stands, the optimizer's state, the moving average's state): from the checkpoint, whose
    weights go into ``model``, when there is one written under the same settings; else the start."""
    state: dict[str, Any] = {"stage_index": 0, "iteration": 0, "best": -1.0, "elapsed": 0.0}
    if not ckpt_path.is_file():
        return state, None, None
    ckpt = load_checkpoint(ckpt_path)
    _check_resume(ckpt_path, ckpt.get("settings"), settings)
    for s in STAGES:
        try:
            model.networks[s].load_state_dict(ckpt[f"net_{s}"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise LiverSegError(f"{ckpt_path}: its {s} weights do not fit this model ({str(exc)[:120]})") from None
    state = {k: ckpt[k] for k in state}
    _log(f"resuming from {ckpt_path}: stage {STAGES[int(state['stage_index'])]}, iteration {int(state['iteration'])}")
    return state, ckpt.get("optim"), ckpt.get("ema")


def train(cfg: TrainConfig, progress: Progress | None = None,
          split: tuple[list[Case], list[Case]] | None = None) -> Path:
    """Train (or fine-tune from ``cfg.init``) and return the output model folder.

    ``split`` gives the training and validation cases directly (the fine-tuning plan); otherwise they
    come from ``cfg.data`` and ``cfg.val_cases``. ``progress`` gets a dict per iteration: ``stage``,
    ``iteration``, ``total``, ``loss``, ``elapsed_s`` (and ``val_dice`` after a validation).
    """
    device = resolve_device(cfg.device)
    set_determinism(seed=cfg.seed)
    if split is None:
        cases: list[Case] = [c for d in cfg.data for c in load_msd(d)]
        train_cases, val_cases = split_cases(cases, cfg.val_cases)
    else:
        train_cases, val_cases = split
    if set(STAGES) - set(cfg.stages) and cfg.init is None:
        raise LiverSegError(f"training only the {', '.join(cfg.stages)} stage needs --init: the others are kept from it")
    unknown = sorted(set(cfg.oversample) - {c.name for c in train_cases})
    if unknown:
        raise LiverSegError(f"oversampled case(s) not among the training cases: {', '.join(unknown)}")
    settings = _run_settings(cfg, train_cases, val_cases)
    out = cfg.output
    if finished_run(out, cfg):
        _log(f"{out}: this run is already finished ({cfg.iterations} iterations); "
             "give more --iterations to go on, or train into a new --output")
        return out
    val_cases = load_validation(val_cases)
    out.mkdir(parents=True, exist_ok=True)

    parent = LiverModel.load(cfg.init) if cfg.init else None
    model = _starting_model(parent, device)
    ckpt_path = out / CHECKPOINT
    state, optim_state, ema_state = _resume(ckpt_path, model, settings)
    # The samples' random stream, seeded by where the run stands: a resumed run draws on, not again.
    rng = random.Random(cfg.seed + int(state["iteration"]) + 1000 * int(state["stage_index"]))

    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    shares = {"coarse": 0.25, "fine": 0.75}
    iterations = {"coarse": max(1, cfg.iterations // 2), "fine": cfg.iterations}
    log_path = out / LOG
    new_log = not log_path.is_file()
    log_file = open(log_path, "a", newline="")
    writer = csv.writer(log_file)
    if new_log:
        writer.writerow(["stage", "iteration", "loss", "val_dice", "elapsed_s"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    board = _tensorboard(out)
    window = model.window
    best_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter() - float(state["elapsed"])

    def save_checkpoint(stage_index: int, iteration: int, **extra: Any) -> None:
        """All a resume needs: every net, where the run stands, its best so far, and its settings."""
        ckpt = {**{f"net_{s}": model.networks[s].state_dict() for s in STAGES}, "stage_index": stage_index,
                "iteration": iteration, "best": float(state["best"]), "elapsed": time.perf_counter() - t_start,
                "settings": settings, **extra}
        atomic_write(ckpt_path, lambda tmp: torch.save(ckpt, tmp), overwrite=True)

    reached = int(state["iteration"])  # the last iteration done, for a model saved after a stop
    try:
        for si in range(int(state["stage_index"]), len(STAGES)):
            stage = STAGES[si]
            if stage not in cfg.stages:
                _log(f"[{stage}] kept from {cfg.init}")
                continue
            spec = model.stage(stage)
            net = model.networks[stage]
            _log(f"[{stage}] preparing {len(train_cases)} training cases at {spec['spacing_mm']} mm")
            items = prepare(train_cases, spec["spacing_mm"])
            items = [item for item in items for _ in range(max(1, cfg.oversample.get(item["name"], 1)))]
            transform = training_transforms(stage, window, spec["patch_size"], min(spec["spacing_mm"]))
            transform.set_random_state(seed=cfg.seed + si + int(state["iteration"]))
            lr = _lr(cfg)
            optim = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
            start_it = int(state["iteration"]) if si == int(state["stage_index"]) else 0
            ema = _new_ema(net, cfg.ema)
            if optim_state is not None and start_it > 0:
                optim.load_state_dict(optim_state)
                if ema is not None and ema_state is not None:
                    ema.load_state_dict(ema_state)
            optim_state = ema_state = None
            averaged = ema.module if ema is not None else net
            n_it = iterations[stage]
            stage_budget = budget_s * (shares[stage] if stage == "coarse" else 1.0)
            batch = cfg.batch_size * (2 if stage == "coarse" else 1)
            running = None
            it = start_it
            reached = start_it
            for it in range(start_it, n_it):
                elapsed = time.perf_counter() - t_start
                if elapsed > stage_budget:
                    _log(f"[{stage}] time budget reached at iteration {it}")
                    break
                for g in optim.param_groups:  # cosine decay over the stage
                    ramp = min(1.0, (it + 1) / (cfg.warmup * n_it)) if cfg.warmup > 0 else 1.0
                    g["lr"] = lr * ramp * 0.5 * (1 + math.cos(math.pi * it / n_it))
                x, y = _batch(items, transform, batch, rng, device)
                optim.zero_grad(set_to_none=True)
                loss = loss_fn(net(x), y)
                loss.backward()
                optim.step()
                if ema is not None:
                    ema.update_parameters(net)
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                if progress:
                    progress({"stage": stage, "iteration": it + 1, "total": n_it, "loss": running,
                              "elapsed_s": time.perf_counter() - t_start})
                done = it + 1
                reached = done
                val_dice = ""
                is_last = done == n_it
                if stage == "fine" and (done % cfg.val_every == 0 or is_last):
                    if val_cases:
                        with _stage_net(model, stage, averaged):
                            rows = validate(model, val_cases, device)
                        mean = float(np.mean([r["dice"] for r in rows]))
                        val_dice = f"{mean:.4f}"
                        _log(f"[{stage}] it {done}: loss {running:.4f}, val Dice {mean:.4f} "
                             + " ".join(f"{r['case']}={r['dice']:.3f}" for r in rows))
                        if progress:
                            progress({"stage": stage, "iteration": done, "total": n_it, "loss": running,
                                      "elapsed_s": time.perf_counter() - t_start, "val_dice": mean})
                    else:  # nothing to validate on: the latest weights are the model
                        rows, mean = [], 0.0
                    if not val_cases or mean > float(state["best"]):
                        state["best"] = mean
                        best_rows = rows
                        with _stage_net(model, stage, averaged):
                            _save_model(model, cfg, parent, train_cases, rows, out, done)
                if done % 25 == 0 or val_dice or is_last:
                    writer.writerow([stage, done, f"{running:.5f}", val_dice, f"{time.perf_counter() - t_start:.1f}"])
                    log_file.flush()
                    if board is not None:
                        board.add_scalar(f"{stage}/loss", running, done)
                        if val_dice:
                            board.add_scalar(f"{stage}/val_dice", float(val_dice), done)
                if done % 50 == 0 or is_last:
                    save_checkpoint(si, done, optim=optim.state_dict(),
                                    **({"ema": ema.state_dict()} if ema is not None else {}))
            state["iteration"] = 0
            if ema is not None:  # the stage ends with its averaged weights (the coarse net the fine stage uses)
                net.load_state_dict(ema.module.state_dict())
            if stage == "coarse":
                save_checkpoint(si + 1, 0)
        if float(state["best"]) < -0.5:  # stopped before any validation: keep what we have
            rows = validate(model, val_cases, device) if val_cases else []
            _save_model(model, cfg, parent, train_cases, rows, out, reached)
            best_rows = rows
        if ckpt_path.is_file():  # the last checkpoint, marked as a finished run of this budget
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            ckpt["finished"] = _budget(cfg)
            atomic_write(ckpt_path, lambda tmp: torch.save(ckpt, tmp), overwrite=True)
    finally:
        log_file.close()
        if board is not None:
            board.close()
    _log(f"best model written to {out}")
    if best_rows:
        _log("validation: " + ", ".join(f"{r['case']} Dice {r['dice']:.3f}" for r in best_rows))
    return out


#: What a fine-tuned model takes from its parent's card as its own: architecture, preprocessing, terms of use.
ARCHITECTURE_KEYS = ("name", "version", "intensity_window", "stages", "licence", "intended_use")
#: What was measured on the parent, not on the new model: kept under ``inherited_from_parent``, marked so.
INHERITED_KEYS = ("cpu_time", "known_issues")


def architecture(card: dict[str, Any]) -> dict[str, Any]:
    return {k: card[k] for k in ARCHITECTURE_KEYS if k in card}


def training_data_entries(cases: list[Case]) -> list[dict[str, Any]]:
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


def _save_model(model: LiverModel, cfg: TrainConfig, parent: LiverModel | None, train_cases: list[Case],
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
            "iterations_fine": iteration,
            "seed": cfg.seed,
            "device": cfg.device,
            "oversample": dict(cfg.oversample),
            "stages": list(cfg.stages),
            "recipe": {"iterations": cfg.iterations, "max_minutes": cfg.max_minutes, "lr": _lr(cfg), "warmup": cfg.warmup,
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
