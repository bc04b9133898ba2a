"""``finish`` (here, with SimpleITK): the model folder as ``liverseg train`` writes it (card, safetensors, the ONNX
twin checked against PyTorch), validated on the held-out cases at their own resolution, and for a pack made with
``--init`` judged by the fine-tuning guard against that parent."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import STAGES, WEIGHTS_FILE, sha256_of
from LiverSegExtension.training.packed.common import (
    RUN_INFO,
    WEIGHTS,
    atomic,
    config_of,
    current_weights,
    read_manifest,
    say,
    split_cases_as_train,
)
from LiverSegExtension.training.packed.run import load_weights


def _write_log(out: Path, info: dict[str, Any]) -> None:
    """The run's loss curve as the training log ``liverseg train`` writes (no validation during a packed run)."""
    import csv

    from LiverSegExtension.training.loop import LOG

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stage", "iteration", "loss", "val_dice", "elapsed_s"])
            w.writerows([stage, it, f"{loss:.5f}", "", f"{t:.1f}"] for stage, it, loss, t in info["loss"])

    atomic(out / LOG, write)


def _run_info(run_dir: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The run's ``run.json`` and the weights it names, checked to be a run of this pack."""
    info_path = run_dir / RUN_INFO
    if not info_path.is_file():
        raise LiverSegError(f"{run_dir}: not a packed run's folder (needs {WEIGHTS} and {RUN_INFO})")
    info = json.loads(info_path.read_text())
    if info.get("settings") != {**manifest["settings"], "pack": manifest["cases_sha256"]}:
        raise LiverSegError(f"{run_dir}: a run of another pack (other cases or settings): finish it with its own pack")
    weights = current_weights(run_dir, info["weights_sha256"])
    if weights is None:
        raise LiverSegError(f"{run_dir / WEIGHTS}: not the weights {info_path} describes")
    return info, weights


def finish(args: argparse.Namespace) -> int:
    from LiverSegExtension.model.networks import LiverModel
    from LiverSegExtension.training import finetune
    from LiverSegExtension.training.card import save_model
    from LiverSegExtension.training.loop import load_validation, validate

    run_dir, out = Path(args.weights), Path(args.output)
    manifest = read_manifest(Path(args.pack))
    info, weights = _run_info(run_dir, manifest)
    cfg = config_of(manifest, out)
    train_cases, val_cases, p = split_cases_as_train(cfg, manifest["replay"], manifest["holdout"])
    if [c.name for c in train_cases] != manifest["cases"] or [c.name for c in val_cases] != manifest["validation_cases"]:
        raise LiverSegError("the datasets no longer split as they did when the pack was made: finish with those data")
    if cfg.init and sha256_of(cfg.init / WEIGHTS_FILE) != manifest["init"]["weights_sha256"]:
        raise LiverSegError(f"{cfg.init}: its weights changed since the pack was made from it")
    model = LiverModel.new(manifest["architecture"])
    load_weights(model, weights, "the run's")
    if not info["finished"]:
        say(f"the run stopped at {info['stands_at']['stage']} iteration {info['stands_at']['iteration']}: "
             "the model is the moving average of the weights so far")
    cfg.device = f"{info['device']} (scripts/device_train.py run)"
    cfg.max_minutes = round(sum(c["minutes"] for c in info["calls"] if c["iterations"]), 2)  # the calls that trained
    last = [s for s in STAGES if s in cfg.stages][-1]
    reached = int(info["stages"][last]["iterations"])
    if p is None:  # training: validated on the validation cases, no parent to compare with
        rows = validate(model, load_validation(val_cases), args.device) if val_cases else []
        save_model(model, cfg, None, train_cases, rows, out, reached)
        _write_log(out, info)
        say(f"model written to {out}" + "".join(f"; {r['case']} Dice {r['dice']:.3f}" for r in rows))
        return 0
    save_model(model, cfg, LiverModel.load(cfg.init), train_cases, [], out, reached)
    _write_log(out, info)
    rows, verdict = finetune.guard(cfg.init, out, p, args.device)  # as liverseg train --init
    if rows:
        say(finetune.table(rows))
    say(f"{out}: {verdict['reason']}")
    return 0 if verdict["accepted"] else 1
