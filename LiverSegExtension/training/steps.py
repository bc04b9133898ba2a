"""One stage's training steps, shared by ``liverseg train`` (``loop``) and the packed runner that trains on a
lent GPU (``scripts/device_train.py``), so that the two cannot drift: the samples drawn, the augmentation,
the loss, the optimiser, the learning-rate schedule, the moving average of the weights, the batch sizes,
each stage's share of a time budget, and the random streams seeded by where a run stands.

No SimpleITK here (nor in what this imports): the packed runner runs where it is not installed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from LiverSegExtension.training.augment import training_transforms
from LiverSegExtension.training.config import TrainConfig, peak_lr

SHARES = {"coarse": 0.25, "fine": 0.75}  # of a time budget, per stage
CHECKPOINT_EVERY = 50  # iterations between checkpoints; a stage's last iteration is saved too


def sample_stream(seed: int, stage_index: int, iteration: int) -> random.Random:
    """The samples' random stream, seeded by where the run stands: a resumed run draws on, not again."""
    return random.Random(seed + iteration + 1000 * stage_index)


def stage_budget(budget_s: float, stage: str) -> float:
    """Seconds of the run's clock by which ``stage`` stops: the coarse stage its share, the fine one the rest."""
    return budget_s * (SHARES[stage] if stage == "coarse" else 1.0)


def stage_iterations(cfg: TrainConfig, stage: str) -> int:
    """A stage's iterations: ``cfg.iterations`` for the fine stage, half as many for the coarse one."""
    return max(1, cfg.iterations // 2) if stage == "coarse" else cfg.iterations


def oversampled(items: list[dict[str, Any]], oversample: dict[str, int]) -> list[dict[str, Any]]:
    """Each item as many times as its case is to be drawn (``TrainConfig.oversample``), in order."""
    return [item for item in items for _ in range(max(1, oversample.get(item["name"], 1)))]


def draw_batch(items: list[dict[str, Any]], transform: Callable, batch_size: int, rng: random.Random,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(batch_size):
        out = transform(rng.choice(items))
        out = out[0] if isinstance(out, list) else out
        images.append(torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(out["label"]), dtype=torch.float32))
    return torch.stack(images).to(device), torch.stack(labels).to(device)


def new_ema(net: torch.nn.Module, decay: float) -> AveragedModel | None:
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay > 0 else None


def learning_rate(peak: float, it: int, n_it: int, warmup: float) -> float:
    """Cosine decay over the stage, after a linear rise over the ``warmup`` share of its iterations."""
    ramp = min(1.0, (it + 1) / (warmup * n_it)) if warmup > 0 else 1.0
    return peak * ramp * 0.5 * (1 + math.cos(math.pi * it / n_it))


class StageSteps:
    """One stage's network trained from iteration ``start``: its augmentation (seeded by where the run stands),
    optimiser and moving average (their saved states on a resume), and the step. ``items`` are the training
    cases on the stage's grid, ``{"image", "label": [1, z, y, x], "name"}``, in the order of the cases."""

    def __init__(self, cfg: TrainConfig, stage: str, stage_index: int, net: torch.nn.Module,
                 window: tuple[float, float], spec: dict[str, Any], items: list[dict[str, Any]], start: int,
                 device: torch.device, optim_state: dict[str, Any] | None = None,
                 ema_state: dict[str, Any] | None = None) -> None:
        self.stage, self.net, self.start, self.device = stage, net, start, device
        self.items = oversampled(items, cfg.oversample)
        self.transform = training_transforms(stage, window, spec["patch_size"], min(spec["spacing_mm"]))
        self.transform.set_random_state(seed=cfg.seed + stage_index + start)
        self.peak, self.warmup = peak_lr(cfg), cfg.warmup
        self.optim = torch.optim.AdamW(net.parameters(), lr=self.peak, weight_decay=1e-4)
        self.ema = new_ema(net, cfg.ema)
        if optim_state is not None and start > 0:
            self.optim.load_state_dict(optim_state)
            if self.ema is not None and ema_state is not None:
                self.ema.load_state_dict(ema_state)
        self.averaged = self.ema.module if self.ema is not None else net  # what is validated and saved
        self.n_it = stage_iterations(cfg, stage)
        self.batch = cfg.batch_size * (2 if stage == "coarse" else 1)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.running: float | None = None  # the loss, smoothed

    def step(self, it: int, rng: random.Random) -> float:
        """Iteration ``it`` (from 0): a batch drawn and augmented, one optimiser step, the average updated.
        Returns the smoothed loss."""
        for g in self.optim.param_groups:
            g["lr"] = learning_rate(self.peak, it, self.n_it, self.warmup)
        x, y = draw_batch(self.items, self.transform, self.batch, rng, self.device)
        self.optim.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net(x), y)
        loss.backward()
        self.optim.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        value = loss.item()
        self.running = value if self.running is None else 0.95 * self.running + 0.05 * value
        return self.running

    def run(self, rng: random.Random, elapsed: Callable[[], float], budget_s: float,
            log: Callable[[str], None]) -> Iterator[tuple[int, float]]:
        """Step from ``start`` to the stage's last iteration, or until ``elapsed()`` passes ``budget_s``;
        yields (iterations done, smoothed loss) after each step."""
        for it in range(self.start, self.n_it):
            if elapsed() > budget_s:
                log(f"[{self.stage}] time budget reached at iteration {it}")
                return
            yield it + 1, self.step(it, rng)

    def checkpoint_due(self, done: int) -> bool:
        return done % CHECKPOINT_EVERY == 0 or done == self.n_it

    def resume_state(self) -> dict[str, Any]:
        """What a resume needs besides the network: the optimiser's state and the moving average's."""
        return {"optim": self.optim.state_dict(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def end(self) -> None:
        """The stage ends with its averaged weights (the coarse net the fine stage uses)."""
        if self.ema is not None:
            self.net.load_state_dict(self.ema.module.state_dict())
