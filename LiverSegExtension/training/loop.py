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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.utils import set_determinism

from LiverSegExtension.data.metrics import case_metrics
from LiverSegExtension.data.msd import LabelledCase, load_msd, to_grid
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference.segmenter import LiverSegmenter
from LiverSegExtension.io import atomic_write
from LiverSegExtension.model.catalog import STAGES
from LiverSegExtension.model.devices import resolve_device
from LiverSegExtension.model.networks import LiverModel
from LiverSegExtension.training.card import save_model, starting_architecture
from LiverSegExtension.training.checkpoint import CHECKPOINT, budget, finished_run, resume, run_settings
from LiverSegExtension.training.config import TrainConfig
from LiverSegExtension.training.steps import StageSteps, sample_stream, stage_budget

LOG = "training_log.csv"


def _log(msg: str) -> None:
    print(msg, flush=True)


def split_cases(cases: list[LabelledCase], val_names: list[str]) -> tuple[list[LabelledCase], list[LabelledCase]]:
    known = {c.name for c in cases}
    missing = [v for v in val_names if v not in known]
    if missing:
        raise LiverSegError(f"validation case(s) not in the dataset: {', '.join(missing)}")
    train = [c for c in cases if c.name not in val_names]
    val = [c for c in cases if c.name in val_names]
    if not train:
        raise LiverSegError("no training cases left after taking out the validation cases")
    return train, val


def prepare(cases: list[LabelledCase], spacing: list[float]) -> list[dict[str, np.ndarray]]:
    """Each case on the stage's grid, as ``[1, z, y, x]`` arrays ready for the transforms."""
    items = []
    for c in cases:
        image, label = c.read()
        hu, lab = to_grid(image, label, spacing)
        items.append({"image": hu[None], "label": lab[None], "name": c.name})
    return items


def load_validation(val: list[LabelledCase]) -> list[tuple[str, sitk.Image, np.ndarray]]:
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


def _tensorboard(out: Path):
    """A TensorBoard writer in OUTPUT/tensorboard when tensorboard is installed, else None (CSV only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


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


def _starting_model(cfg: TrainConfig, parent: LiverModel | None, device: torch.device | str) -> LiverModel:
    """A new model of the parent's architecture and weights (or a fresh default one), on ``device``, training."""
    model = LiverModel.new(starting_architecture(cfg, parent.card if parent else None))
    if parent:
        for s in STAGES:
            model.networks[s].load_state_dict(parent.networks[s].state_dict())
    for net in model.networks.values():
        net.to(device).train()
    return model


def check_config(cfg: TrainConfig, train_cases: list[LabelledCase]) -> None:
    """Refuse what a run could not do: stages left out with nothing to keep them from, oversampling a case that is
    not trained on."""
    if set(STAGES) - set(cfg.stages) and cfg.init is None:
        raise LiverSegError(f"training only the {', '.join(cfg.stages)} stage needs --init: the others are kept from it")
    unknown = sorted(set(cfg.oversample) - {c.name for c in train_cases})
    if unknown:
        raise LiverSegError(f"oversampled case(s) not among the training cases: {', '.join(unknown)}")


def train(cfg: TrainConfig, progress: Progress | None = None,
          split: tuple[list[LabelledCase], list[LabelledCase]] | None = None) -> Path:
    """Train (or fine-tune from ``cfg.init``) and return the output model folder.

    ``split`` gives the training and validation cases directly (the fine-tuning plan); otherwise they
    come from ``cfg.data`` and ``cfg.val_cases``. ``progress`` gets a dict per iteration: ``stage``,
    ``iteration``, ``total``, ``loss``, ``elapsed_s`` (and ``val_dice`` after a validation).
    """
    set_determinism(seed=cfg.seed)
    if split is None:
        cases: list[LabelledCase] = [c for d in cfg.data for c in load_msd(d)]
        train_cases, val_cases = split_cases(cases, cfg.val_cases)
    else:
        train_cases, val_cases = split
    check_config(cfg, train_cases)
    if finished_run(cfg.output, cfg):
        _log(f"{cfg.output}: this run is already finished ({cfg.iterations} iterations); "
             "give more --iterations to go on, or train into a new --output")
        return cfg.output
    run = _Run(cfg, train_cases, val_cases, progress)
    try:
        run.all_stages()
    finally:
        run.close()
    _log(f"best model written to {cfg.output}")
    if run.best_rows:
        _log("validation: " + ", ".join(f"{r['case']} Dice {r['dice']:.3f}" for r in run.best_rows))
    return cfg.output


class _Run:
    """One training run: its model, where it stands (resumed from the checkpoint when there is one), its log,
    and the best model so far, always a whole model folder in the output."""

    def __init__(self, cfg: TrainConfig, train_cases: list[LabelledCase], val_cases: list[LabelledCase],
                 progress: Progress | None) -> None:
        self.cfg, self.train_cases, self.progress = cfg, train_cases, progress
        self.device = resolve_device(cfg.device)
        self.settings = run_settings(cfg, train_cases, val_cases)
        self.val_cases = load_validation(val_cases)
        self.out = cfg.output
        self.out.mkdir(parents=True, exist_ok=True)
        self.parent = LiverModel.load(cfg.init) if cfg.init else None
        self.model = _starting_model(cfg, self.parent, self.device)
        self.ckpt_path = self.out / CHECKPOINT
        self.state, self.optim_state, self.ema_state = resume(self.ckpt_path, self.model, self.settings)
        self.rng = sample_stream(cfg.seed, int(self.state["stage_index"]), int(self.state["iteration"]))
        self.budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        new_log = not (self.out / LOG).is_file()
        self.log_file = open(self.out / LOG, "a", newline="")
        self.writer = csv.writer(self.log_file)
        if new_log:
            self.writer.writerow(["stage", "iteration", "loss", "val_dice", "elapsed_s"])
        self.board = _tensorboard(self.out)
        self.best_rows: list[dict[str, Any]] = []
        self.t_start = time.perf_counter() - float(self.state["elapsed"])
        self.reached = int(self.state["iteration"])  # the last iteration done, for a model saved after a stop

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def save_checkpoint(self, stage_index: int, iteration: int, **extra: Any) -> None:
        """All a resume needs: every net, where the run stands, its best so far, and its settings."""
        ckpt = {**{f"net_{s}": self.model.networks[s].state_dict() for s in STAGES}, "stage_index": stage_index,
                "iteration": iteration, "best": float(self.state["best"]), "elapsed": self.elapsed(),
                "settings": self.settings, **extra}
        atomic_write(self.ckpt_path, lambda tmp: torch.save(ckpt, tmp), overwrite=True)

    def all_stages(self) -> None:
        for si in range(int(self.state["stage_index"]), len(STAGES)):
            stage = STAGES[si]
            if stage not in self.cfg.stages:
                _log(f"[{stage}] kept from {self.cfg.init}")
                continue
            self.stage(si, stage)
        if float(self.state["best"]) < -0.5:  # stopped before any validation: keep what we have
            rows = validate(self.model, self.val_cases, self.device) if self.val_cases else []
            save_model(self.model, self.cfg, self.parent, self.train_cases, rows, self.out, self.reached)
            self.best_rows = rows
        if self.ckpt_path.is_file():  # the last checkpoint, marked as a finished run of this budget
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            ckpt["finished"] = budget(self.cfg)
            atomic_write(self.ckpt_path, lambda tmp: torch.save(ckpt, tmp), overwrite=True)

    def stage(self, si: int, stage: str) -> None:
        """Train one stage's network from where the run stands, validating and saving the best on the way."""
        spec = self.model.stage(stage)
        _log(f"[{stage}] preparing {len(self.train_cases)} training cases at {spec['spacing_mm']} mm")
        items = prepare(self.train_cases, spec["spacing_mm"])
        start = int(self.state["iteration"]) if si == int(self.state["stage_index"]) else 0
        steps = StageSteps(self.cfg, stage, si, self.model.networks[stage], self.model.window, spec, items, start,
                           self.device, self.optim_state, self.ema_state)
        self.optim_state = self.ema_state = None
        self.reached = start
        for done, running in steps.run(self.rng, self.elapsed, stage_budget(self.budget_s, stage), _log):
            self.reached = done
            self.tell(stage, done, steps.n_it, running)
            val_dice = self.validate_and_keep(stage, done, steps.n_it, running, steps.averaged)
            self.write_log(stage, done, steps.n_it, running, val_dice)
            if steps.checkpoint_due(done):
                self.save_checkpoint(si, done, **steps.resume_state())
        self.state["iteration"] = 0
        steps.end()
        if stage == "coarse":
            self.save_checkpoint(si + 1, 0)

    def tell(self, stage: str, done: int, total: int, loss: float, **extra: Any) -> None:
        if self.progress:
            self.progress({"stage": stage, "iteration": done, "total": total, "loss": loss,
                           "elapsed_s": self.elapsed(), **extra})

    def validate_and_keep(self, stage: str, done: int, n_it: int, running: float, averaged: torch.nn.Module) -> str:
        """At the fine stage's validation points: score the averaged weights and save them when they are the
        best so far (with nothing to validate on, the latest weights are the model). Returns the mean Dice as
        logged ("" when not validated)."""
        if stage != "fine" or not (done % self.cfg.val_every == 0 or done == n_it):
            return ""
        rows, mean, val_dice = [], 0.0, ""
        if self.val_cases:
            with _stage_net(self.model, stage, averaged):
                rows = validate(self.model, self.val_cases, self.device)
            mean = float(np.mean([r["dice"] for r in rows]))
            val_dice = f"{mean:.4f}"
            _log(f"[{stage}] it {done}: loss {running:.4f}, val Dice {mean:.4f} "
                 + " ".join(f"{r['case']}={r['dice']:.3f}" for r in rows))
            self.tell(stage, done, n_it, running, val_dice=mean)
        if not self.val_cases or mean > float(self.state["best"]):
            self.state["best"] = mean
            self.best_rows = rows
            with _stage_net(self.model, stage, averaged):
                save_model(self.model, self.cfg, self.parent, self.train_cases, rows, self.out, done)
        return val_dice

    def write_log(self, stage: str, done: int, n_it: int, running: float, val_dice: str) -> None:
        if done % 25 == 0 or val_dice or done == n_it:
            self.writer.writerow([stage, done, f"{running:.5f}", val_dice, f"{self.elapsed():.1f}"])
            self.log_file.flush()
            if self.board is not None:
                self.board.add_scalar(f"{stage}/loss", running, done)
                if val_dice:
                    self.board.add_scalar(f"{stage}/val_dice", float(val_dice), done)

    def close(self) -> None:
        self.log_file.close()
        if self.board is not None:
            self.board.close()
