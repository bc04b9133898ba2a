"""``run`` (on the lent machine: torch, numpy and MONAI, no SimpleITK): the networks from the manifest, each trained
stage stepped by ``training.steps`` (the steps ``liverseg train`` takes) within this call's minutes; the moving
average of the weights (``weights.safetensors``, ``LiverModel``'s key layout), a checkpoint to resume from (split
into files under 16 MiB) and ``run.json``."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import STAGES, sha256_of
from LiverSegExtension.training.packed.common import (
    CASES,
    CHECKPOINT,
    FILE_LIMIT,
    MANIFEST,
    NEXT_WEIGHTS,
    ROOT,
    RUN_INFO,
    SHARD_BYTES,
    WEIGHTS,
    atomic,
    config_of,
    current_weights,
    mib,
    read_manifest,
    say,
)


def save_checkpoint(out: Path, plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    """``checkpoint.pt`` with the plain values and the first tensors, the rest in files of at most
    :data:`SHARD_BYTES` named by where the run stands (written first, so the checkpoint before stays whole)."""
    import torch

    shards: list[dict[str, Any]] = [{}]
    used = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if used + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][key] = t
        used += n
    names = [f"checkpoint-{plain['stage_index']}-{plain['iteration']}-{i}.pt" for i in range(1, len(shards))]
    for name, shard in zip(names, shards[1:]):
        atomic(out / name, lambda tmp, shard=shard: torch.save(shard, tmp))
    atomic(out / CHECKPOINT, lambda tmp: torch.save({**plain, "tensors": shards[0], "shards": names}, tmp))
    for stale in out.glob("checkpoint-*.pt"):
        if stale.name not in names:
            stale.unlink()


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        tensors = dict(ckpt.pop("tensors"))
        for name in ckpt["shards"]:
            tensors.update(torch.load(path.parent / name, map_location="cpu", weights_only=True))
    except (OSError, KeyError, RuntimeError, EOFError, AttributeError, pickle.UnpicklingError) as exc:
        raise LiverSegError(f"{path}: not a whole packed-run checkpoint ({str(exc)[:120]})") from None
    return ckpt, tensors


def _find_checkpoint(resume: Path | None, out: Path, pack_dir: Path) -> Path | None:
    if resume is not None:
        if not resume.is_file():
            raise LiverSegError(f"--resume {resume}: no such checkpoint")
        return resume
    return next((p for p in (out / CHECKPOINT, pack_dir / CHECKPOINT) if p.is_file()), None)


def load_weights(model: Any, path: Path, what: str) -> dict[str, Any]:
    """Weights in ``LiverModel``'s key layout (``coarse.…``, ``fine.…``) into ``model``'s networks."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    model.load_state(tensors, f"{path} ({what} weights, against the pack's architecture)")
    return tensors


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


class _Runner:
    """A packed run: the networks from the manifest, each trained stage stepped by ``training.steps`` from where
    the run stands, within this call's minutes; the weights, a checkpoint and ``run.json`` in ``out``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from monai.utils import set_determinism

        from LiverSegExtension.model.devices import resolve_device
        from LiverSegExtension.model.networks import LiverModel
        from LiverSegExtension.training.steps import sample_stream

        self.t0 = time.perf_counter()
        self.pack, self.out, self.args = Path(args.pack), Path(args.out), args
        self.manifest = read_manifest(self.pack)
        if not (self.pack / CASES).is_file() or sha256_of(self.pack / CASES) != self.manifest["cases_sha256"]:
            raise LiverSegError(f"{self.pack / CASES}: not the cases {MANIFEST} was written with (pack again)")
        self.cfg = config_of(self.manifest)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(args.device)
        self.settings = {**self.manifest["settings"], "pack": self.manifest["cases_sha256"]}
        set_determinism(seed=self.cfg.seed)  # as liverseg train: then the networks, drawn alike
        self.model = LiverModel.new(self.manifest["architecture"])
        if self.manifest["init"]:
            load_weights(self.model, self._init_weights(), "the starting model's")
        for net in self.model.networks.values():
            net.to(self.device).train()
        self.state: dict[str, Any] = {"stage_index": 0, "iteration": 0, "elapsed": 0.0, "curve": [], "calls": [],
                                      "reached": {s: 0 for s in STAGES}}
        self.optim_state = self.ema_state = None
        ckpt = _find_checkpoint(args.resume, self.out, self.pack)
        if ckpt is not None:
            self.resume(ckpt)
        ahead = [s for s in STAGES[int(self.state["stage_index"]):] if s in self.cfg.stages]
        self.start = {"stage": ahead[0] if ahead else None, "iteration": int(self.state["iteration"]),
                      "resumed_from": str(ckpt) if ckpt else None}
        self.rng = sample_stream(self.cfg.seed, int(self.state["stage_index"]), int(self.state["iteration"]))
        self.steps_taken, self.stage_seconds = 0, {s: [0, 0.0] for s in STAGES}
        self.weights_sha = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _init_weights(self) -> Path:
        init = self.manifest["init"]
        path = (self.pack if init["travels_in"] == "pack" else ROOT) / init["weights"]
        if not path.is_file() or sha256_of(path) != init["weights_sha256"]:
            raise LiverSegError(f"{path}: not the weights the pack was made from ({init['name']} {init['version']})")
        return path

    def resume(self, path: Path) -> None:
        """Where the run stands, from a checkpoint and the weights beside it: the moving average (and the stages
        not in progress) from the weights, the network in training and the optimiser from the checkpoint."""
        from LiverSegExtension.training.checkpoint import check_resume

        ckpt, tensors = load_checkpoint(path)
        check_resume(path, ckpt.get("settings"), self.settings)
        weights = current_weights(path.parent, ckpt["weights_sha256"])
        if weights is None:
            raise LiverSegError(f"{path.parent / WEIGHTS}: not the weights written with {path}: resume from that "
                                "checkpoint's own folder, or start again")
        averaged = load_weights(self.model, weights, "the run's")
        self.state = {k: ckpt[k] for k in self.state}
        si, it = int(ckpt["stage_index"]), int(ckpt["iteration"])
        if it > 0:  # a stage in progress
            stage = STAGES[si]
            self.model.networks[stage].load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            state: dict[int, dict[str, Any]] = {}
            for key, t in tensors.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    state.setdefault(int(idx), {})[name] = t
            self.optim_state = {"state": state, "param_groups": ckpt["optim_groups"]}
            if "ema.n_averaged" in tensors:
                self.ema_state = {"n_averaged": tensors["ema.n_averaged"],
                                  **{f"module.{k[len(stage) + 1:]}": v for k, v in averaged.items()
                                     if k.startswith(f"{stage}.")}}
        say(f"resuming from {path}: " + (f"stage {STAGES[si]}, iteration {it}" if si < len(STAGES) else "finished"))

    def items(self, stage: str) -> list[dict[str, Any]]:
        with np.load(self.pack / CASES) as z:
            return [{"image": z[f"{i}_{stage}_image"].astype(np.float32)[None], "label": z[f"{i}_{stage}_label"][None],
                     "name": name} for i, name in enumerate(self.manifest["cases"])]

    def out_of_time(self) -> bool:
        return self.elapsed() > self.args.minutes * 60 or 0 < self.args.stop_after <= self.steps_taken

    def all_stages(self) -> bool:
        """Train from where the run stands; True when every stage is done."""
        from LiverSegExtension.training.steps import StageSteps, stage_budget

        for si in range(int(self.state["stage_index"]), len(STAGES)):
            stage = STAGES[si]
            if stage not in self.cfg.stages:
                continue
            if self.out_of_time():
                return False
            start = int(self.state["iteration"]) if si == int(self.state["stage_index"]) else 0
            steps = StageSteps(self.cfg, stage, si, self.model.networks[stage], self.model.window,
                               self.model.stage(stage), self.items(stage), start, self.device, self.optim_state,
                               self.ema_state)
            self.optim_state = self.ema_state = None
            done, t_stage = start, time.perf_counter()
            for done, running in steps.run(self.rng, self.elapsed, stage_budget(self.args.minutes * 60, stage), say):
                self.steps_taken += 1
                self.state["reached"][stage] = done
                self.tell(stage, done, steps.n_it, running, last=self.out_of_time())
                if steps.checkpoint_due(done):
                    self.save(si, done, steps)
                if 0 < self.args.stop_after <= self.steps_taken:
                    break
            self.stage_seconds[stage][0] += done - start
            self.stage_seconds[stage][1] += time.perf_counter() - t_stage
            if done < steps.n_it and self.out_of_time():
                say(f"[{stage}] stopped at {done}/{steps.n_it}")
                self.save(si, done, steps)  # on from here next time
                return False
            steps.end()  # as in liverseg train: a stage out of its share of the time ends there
            self.save(si + 1, 0, None)
        self.save(len(STAGES), 0, None)
        return True

    def tell(self, stage: str, done: int, n_it: int, running: float, last: bool = False) -> None:
        """The loss curve every 25 iterations (as liverseg train's log) and at a stage's or this call's end."""
        if done % 25 == 0 or done == n_it or last:
            self.state["curve"].append([stage, done, round(running, 5), round(self.state["elapsed"] + self.elapsed(), 1)])
        if done % 25 == 0 or done == n_it or last or self.steps_taken == 1:
            say(f"[{stage}] {done}/{n_it} loss {running:.4f} ({self.elapsed():.0f} s)")

    def save(self, si: int, it: int, steps: Any) -> None:
        """The weights (the moving average of the stage in progress), then the checkpoint, then ``run.json``."""
        from safetensors.torch import save_file

        from LiverSegExtension.model.networks import LiverModel

        nets, tensors, groups = dict(self.model.networks), {}, None
        if steps is not None:
            nets[steps.stage] = steps.averaged
            tensors = {f"net.{k}": v for k, v in steps.net.state_dict().items()}
            resume = steps.resume_state()
            for idx, entry in resume["optim"]["state"].items():
                tensors.update({f"optim.{idx}.{name}": t for name, t in entry.items()})
            groups = resume["optim"]["param_groups"]
            if "ema" in resume:
                tensors["ema.n_averaged"] = resume["ema"]["n_averaged"]
        weights = LiverModel(card=self.model.card, networks=nets).state_dict()

        def write_weights(tmp: str) -> None:
            save_file(weights, tmp)
            os.chmod(tmp, 0o644)  # safetensors creates 0600
            self.weights_sha = sha256_of(tmp)

        # Weights, checkpoint and run.json agree whenever the run is stopped: the new weights are named by the other
        # two before they replace the old (see common.current_weights).
        atomic(self.out / NEXT_WEIGHTS, write_weights)
        calls = [*self.state["calls"], self.call_record()]
        plain = {**self.state, "stage_index": si, "iteration": it, "elapsed": self.state["elapsed"] + self.elapsed(),
                 "settings": self.settings, "weights_sha256": self.weights_sha, "optim_groups": groups, "calls": calls}
        save_checkpoint(self.out, plain, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self.report(si, it, calls)
        os.replace(self.out / NEXT_WEIGHTS, self.out / WEIGHTS)

    def call_record(self) -> dict[str, Any]:
        """This call: where it started, on what, for how long, and its seconds per iteration by stage."""
        import torch

        return {**self.start, "device": _device_name(self.device), "torch": str(torch.__version__),
                "minutes": self.args.minutes, "seconds": round(self.elapsed(), 1), "iterations": self.steps_taken,
                "seconds_per_iteration": {s: round(t / n, 3) for s, (n, t) in self.stage_seconds.items() if n}}

    def report(self, si: int, it: int, calls: list[dict[str, Any]]) -> None:
        from LiverSegExtension.training.steps import stage_iterations

        info = {"device": calls[-1]["device"], "finished": si >= len(STAGES),
                "stands_at": {"stage": STAGES[min(si, len(STAGES) - 1)], "iteration": it},
                "stages": {s: {"trained": s in self.cfg.stages, "iterations": int(self.state["reached"][s]),
                               "of": stage_iterations(self.cfg, s)} for s in STAGES},
                "seconds": round(self.state["elapsed"] + self.elapsed(), 1), "calls": calls,
                "weights_sha256": self.weights_sha, "settings": self.settings, "loss": self.state["curve"],
                "files": {(WEIGHTS if f.name == NEXT_WEIGHTS else f.name): f.stat().st_size for f in sorted(self.out.iterdir())
                          if f.is_file() and f.name not in (RUN_INFO, WEIGHTS)}}
        atomic(self.out / RUN_INFO, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1) + "\n"))


def run(args: argparse.Namespace) -> int:
    runner = _Runner(args)
    say(f"training on {_device_name(runner.device)} for at most {args.minutes} min")
    finished = runner.all_stages()
    big = {f.name: f.stat().st_size for f in runner.out.iterdir() if f.stat().st_size >= FILE_LIMIT}
    say(("finished" if finished else "stopped; run again to go on") + f": {runner.out / WEIGHTS}")
    if big:
        say(f"warning: over {mib(FILE_LIMIT)}, will not come back from a lent machine: {big}")
    return 0
