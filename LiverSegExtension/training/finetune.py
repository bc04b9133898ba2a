"""Fine-tuning on corrected cases, safely: a recipe for a handful of cases, the parent's own data
replayed, validation cases held back, and a regression guard that never lets a worse model pass.

``fine_tune`` is what ``liverseg train --init MODEL --data CORRECTIONS`` and the Slicer panel run:

1. **plan**: the corrections (``--data``) are split into training cases and held-back cases (one in five,
   at least one when there are two or more; ``--val`` names them instead). The parent's card names the
   datasets it was trained on (``training_data``); found by their recorded path or by name under
   :func:`data_search_dirs`, their training cases are replayed beside the corrections (which are drawn
   so that they make about a third of the samples) and their validation cases are scored by the guard.
2. **train** the fine stage only (the coarse one only places the box; retrained on a few cases it can
   move the box onto a neighbouring organ), ``catalog.FINE_TUNE_ITERATIONS`` iterations.
3. **guard**: the parent and the new model segment the same cases; per case Dice, HD95 and volume error
   side by side go to the terminal, ``comparison.csv`` and the card. :data:`GUARD_RULE` decides; the
   verdict goes into the card. A rejected model keeps its folder (for inspection) but is not listed by
   default (``catalog.list_models``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from LiverSegExtension.data.msd import LabelledCase, load_msd
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import atomic_write
from LiverSegExtension.model.catalog import CARD_FILE

CORRECTION_SHARE = 1 / 3  # of the samples drawn, when the parent's data is replayed
MEAN_DROP = 0.005  # about the spread of mean validation Dice between seeds (0.007)
CASE_DROP = 0.02
# Noise on the corrections trained on: after 2 iterations (nothing learnt) their mean Dice moved -0.0005 to
# +0.0012 over seeds 0-2 (benchmarks/guard_noise.py; the parent scored the same every time).
TRAINED_DROP = 0.002
GUARD_RULE = (f"accepted only if, in each group of cases scored (the parent's validation cases, the held-back "
              f"corrections), the new model's mean Dice is not lower than the parent's by more than {MEAN_DROP} "
              f"and no case's Dice is lower by more than {CASE_DROP}; on the corrections it was trained on, its mean "
              f"Dice is not lower than the parent's by more than {TRAINED_DROP} (the noise of a fine-tune that learnt "
              f"nothing: it must not have unlearnt them); with no parent validation case or held-back correction to "
              f"score, rejected")
PARENT_VALIDATION = "parent validation"
HELD_BACK = "held-back correction"
TRAINED = "trained-on correction"
COMPARISON = "comparison.csv"

Progress = Callable[[dict[str, Any]], None]


def data_search_dirs() -> list[Path]:
    """Where a parent's training data is looked for by name: ``LIVERSEG_DATA_DIR`` (a path list), then
    ``~/.liverseg/data``, then ``shared/data`` beside a source checkout of LiverSeg."""
    dirs = [Path(p) for p in os.environ.get("LIVERSEG_DATA_DIR", "").split(os.pathsep) if p]
    dirs.append(Path.home() / ".liverseg" / "data")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return dirs


def find_dataset(entry: dict[str, Any]) -> Path | None:
    """A ``training_data`` entry's dataset folder: its recorded path if it is still there, else by name."""
    candidates = [Path(entry["path"])] if entry.get("path") else []
    if entry.get("name"):
        candidates += [d / str(entry["name"]) for d in data_search_dirs()]
    return next((c for c in candidates if (c / "dataset.json").is_file()), None)


def _fix_headers(cases: list[LabelledCase], fixes: dict[str, Any]) -> list[LabelledCase]:
    for c in cases:
        fix = fixes.get(c.name)
        if isinstance(fix, dict) and "from" in fix and "to" in fix:
            c.direction_fix = (tuple(float(v) for v in fix["from"]), tuple(float(v) for v in fix["to"]))
    return cases


def parent_validation_cases(card: dict[str, Any]) -> list[LabelledCase]:
    """The parent's validation cases that can be found (in the datasets its card names), header fixes applied."""
    names = [r.get("case") for r in card.get("validation", {}).get("cases", []) if r.get("case")]
    found: list[LabelledCase] = []
    for entry in card.get("training_data") or []:
        folder = find_dataset(entry)
        if folder is not None:
            seen = {c.name for c in found}
            found += [c for c in _fix_headers(load_msd(folder), entry.get("header_fixes", {}))
                      if c.name in names and c.name not in seen]
    return found


@dataclass
class Plan:
    """Which cases a fine-tune trains on and which the guard scores, and why."""

    train: list[LabelledCase]
    guard: list[LabelledCase]
    groups: dict[str, str]  # guard case -> PARENT_VALIDATION, HELD_BACK or TRAINED
    oversample: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(parent_card: dict[str, Any], corrections: list[Path], val_names: list[str], replay: str | Path = "auto",
         holdout: int | None = None, seed: int = 0) -> Plan:
    """Split corrections into training and held-back cases and add the parent's data (see the module doc)."""
    cases = [c for d in corrections for c in load_msd(d)]
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LiverSegError(f"case name(s) in more than one --data dataset: {', '.join(duplicates)}")
    notes: list[str] = []
    if val_names:
        missing = [v for v in val_names if v not in names]
        if missing:
            raise LiverSegError(f"validation case(s) not in the dataset: {', '.join(missing)}")
        held = [c for c in cases if c.name in val_names]
    else:
        n_held = (math.ceil(len(cases) / 5) if len(cases) >= 2 else 0) if holdout is None else holdout
        if n_held >= len(cases):
            raise LiverSegError(f"--holdout {n_held} leaves none of the {len(cases)} correction(s) to train on")
        held = random.Random(seed).sample(cases, n_held) if n_held else []
        if not held:
            notes.append(f"{len(cases)} correction(s), all trained on: none held back to check the new model on")
    train = [c for c in cases if c not in held]
    trained = {c.name for c in train}

    replayed: list[LabelledCase] = []
    parent_val: list[LabelledCase] = []
    parent_train = set(parent_card.get("training", {}).get("cases", []))
    parent_val_names = [r.get("case") for r in parent_card.get("validation", {}).get("cases", []) if r.get("case")]
    if replay != "none":
        entries = parent_card.get("training_data") or []
        if replay != "auto":
            fixes = {k: v for e in entries for k, v in e.get("header_fixes", {}).items()}
            entries = [{"path": str(replay), "header_fixes": fixes}]
            if not (Path(replay) / "dataset.json").is_file():
                raise LiverSegError(f"--replay {replay}: not a dataset folder (no dataset.json)")
        if not entries:
            notes.append("the parent's card names no training data: only the corrections are trained on")
        for entry in entries:
            folder = find_dataset(entry)
            label = entry.get("name") or entry.get("path")
            if folder is None:
                notes.append(f"the parent's training data '{label}' was not found (looked in "
                             + ", ".join(str(d) for d in data_search_dirs()) + "; set LIVERSEG_DATA_DIR): not replayed")
                continue
            found = _fix_headers(load_msd(folder), entry.get("header_fixes", {}))
            listed = set(entry.get("cases") or parent_train)
            replay_here = [c for c in found if c.name in listed and c.name not in trained and c.name not in parent_val_names]
            replayed += replay_here
            taken = trained | {c.name for c in held} | {c.name for c in parent_val}
            parent_val += [c for c in found if c.name in parent_val_names and c.name not in taken]
            notes.append(f"replaying {len(replay_here)} training case(s) of the parent from {folder}")
    if not train:
        raise LiverSegError("no training cases left after taking out the validation cases")
    oversample: dict[str, int] = {}
    if replayed:
        times = max(1, round(CORRECTION_SHARE / (1 - CORRECTION_SHARE) * len(replayed) / len(train)))
        oversample = {c.name: times for c in train} if times > 1 else {}
    scored = {c.name for c in parent_val + held}
    missing_val = [n for n in parent_val_names if n not in scored and n not in trained]
    if missing_val:
        notes.append(f"parent validation case(s) not found, not scored: {', '.join(missing_val)}")
    guard = parent_val + held + train
    groups = ({c.name: PARENT_VALIDATION for c in parent_val} | {c.name: HELD_BACK for c in held}
              | {c.name: TRAINED for c in train})
    return Plan(train=train + replayed, guard=guard, groups=groups, oversample=oversample, notes=notes)


def compare(parent_dir: Path, child_dir: Path, p: Plan, device: str, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Both models on the plan's guard cases: one row per case, parent and new side by side."""
    from LiverSegExtension.model.networks import LiverModel
    from LiverSegExtension.training.loop import load_validation, validate

    cases = load_validation(p.guard)  # read once, scored by both models

    def score(model_dir: Path, label: str) -> dict[str, dict[str, Any]]:
        def report(i: int, r: dict[str, Any]) -> None:
            if progress:
                progress({"stage": "guard", "iteration": i + 1, "total": len(cases), "model": label,
                          "case": r["case"], "val_dice": r["dice"]})

        return {r["case"]: r for r in validate(LiverModel.load(model_dir), cases, device, report)}

    before, after = score(parent_dir, "parent"), score(child_dir, "new")
    rows = []
    for c in p.guard:
        a, b = before[c.name], after[c.name]
        rows.append({"group": p.groups[c.name], "case": c.name,
                     "dice_parent": round(a["dice"], 4), "dice_new": round(b["dice"], 4),
                     "delta_dice": round(b["dice"] - a["dice"], 4),
                     "hd95_mm_parent": round(a["hd95_mm"], 2), "hd95_mm_new": round(b["hd95_mm"], 2),
                     "volume_error_pct_parent": round(a["volume_error_pct"], 2),
                     "volume_error_pct_new": round(b["volume_error_pct"], 2),
                     "ref_ml": round(a["ref_ml"], 1)})
    return rows


def decide(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply :data:`GUARD_RULE`: ``accepted``, a one-line ``reason``, and each group's means."""
    groups: dict[str, dict[str, Any]] = {}
    failures = []
    for group in (PARENT_VALIDATION, HELD_BACK, TRAINED):
        mine = [r for r in rows if r["group"] == group]
        if not mine:
            continue
        before = float(np.mean([r["dice_parent"] for r in mine]))
        after = float(np.mean([r["dice_new"] for r in mine]))
        groups[group] = {"cases": len(mine), "mean_dice_parent": round(before, 4), "mean_dice_new": round(after, 4)}
        if group == TRAINED:
            if after < before - TRAINED_DROP:
                failures.append(f"it fits the corrections it was trained on worse than its parent (mean Dice "
                                f"{before:.4f} -> {after:.4f}, more than the {TRAINED_DROP} of noise)")
        elif after < before - MEAN_DROP:
            failures.append(f"mean Dice on the {group} cases fell {before - after:.3f} ({before:.3f} -> {after:.3f}), "
                            f"more than {MEAN_DROP}")
        for r in mine:
            if r["delta_dice"] < -CASE_DROP:
                failures.append(f"{r['case']} Dice fell {-r['delta_dice']:.3f} ({r['dice_parent']:.3f} -> "
                                f"{r['dice_new']:.3f}), more than {CASE_DROP}")
    if not any(r["group"] in (PARENT_VALIDATION, HELD_BACK) for r in rows):
        failures.append("no case to compare the models on (no held-back correction, parent's validation data not "
                        "found): name --val cases or make the parent's data available")
    summary = "; ".join(f"{g}: {v['mean_dice_parent']:.3f} -> {v['mean_dice_new']:.3f} ({v['cases']} case(s))"
                        for g, v in groups.items())
    accepted = not failures
    reason = f"accepted: {summary}" if accepted else "rejected: " + "; ".join(failures)
    return {"accepted": accepted, "reason": reason, "rule": GUARD_RULE, "groups": groups}


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as aligned text for the terminal."""
    header = f"{'group':22s} {'case':24s} {'Dice parent':>11s} {'new':>7s} {'HD95 parent':>11s} {'new':>7s} " \
             f"{'vol.err% parent':>15s} {'new':>7s}"
    lines = [header]
    for r in rows:
        lines.append(f"{r['group']:22s} {r['case']:24s} {r['dice_parent']:11.3f} {r['dice_new']:7.3f} "
                     f"{r['hd95_mm_parent']:11.1f} {r['hd95_mm_new']:7.1f} {r['volume_error_pct_parent']:15.1f} "
                     f"{r['volume_error_pct_new']:7.1f}")
    return "\n".join(lines)


@dataclass
class FineTuneResult:
    model_dir: Path
    accepted: bool
    reason: str
    rows: list[dict[str, Any]]


def guard(parent: Path, out: Path, p: Plan, device: str, progress: Progress | None = None
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The new model in ``out`` against its parent on the plan's cases: the comparison and the verdict, both
    recorded in ``out`` (``comparison.csv``, the card); every way a fine-tune is made ends here."""
    rows = compare(parent, out, p, device, progress)
    verdict = decide(rows)
    _record(out, rows, verdict, p)
    return rows, verdict


def _record(out: Path, rows: list[dict[str, Any]], verdict: dict[str, Any], p: Plan) -> None:
    """The comparison into ``comparison.csv`` and, with the verdict, into the new model's card."""
    fields = list(rows[0]) if rows else ["group", "case"]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / COMPARISON, write_csv, overwrite=True)
    card_path = out / CARD_FILE
    card = json.loads(card_path.read_text())
    independent = [r for r in rows if r["group"] != TRAINED]  # validation: cases it was not trained on
    card["validation"] = {
        "cases": [{"case": r["case"], "group": r["group"], "dice": r["dice_new"], "hd95_mm": r["hd95_mm_new"],
                   "volume_error_pct": r["volume_error_pct_new"]} for r in independent],
        "mean": {"dice": round(float(np.mean([r["dice_new"] for r in independent])), 4)} if independent else {},
        "parent_mean": ({"dice": round(float(np.mean([r["dice_parent"] for r in independent])), 4)}
                        if independent else {}),
    }
    card["comparison_with_parent"] = rows
    card["verdict"] = verdict
    card["fine_tune_notes"] = p.notes
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"), overwrite=True)


def recipe(data: list[Path], output: Path, init: Path, *, iterations: int | None = None, stages: list[str] | None = None,
           ema: float | None = None, lr: float | None = None, **options: Any) -> Any:
    """The fine-tuning recipe as a ``training.TrainConfig``; what is not given takes the recipe's value."""
    from LiverSegExtension.model.catalog import FINE_TUNE_EMA, FINE_TUNE_ITERATIONS, FINE_TUNE_LR, STAGES
    from LiverSegExtension.training.config import TrainConfig

    n = iterations or FINE_TUNE_ITERATIONS
    return TrainConfig(data=list(data), output=Path(output), init=Path(init), iterations=n, val_every=n,
                       stages=[s for s in STAGES if s in (stages or ["fine"])],
                       ema=FINE_TUNE_EMA if ema is None else ema, lr=FINE_TUNE_LR if lr is None else lr,
                       warmup=0.1, **options)


def fine_tune(cfg: Any, replay: str | Path = "auto", holdout: int | None = None,
              progress: Progress | None = None, log: Callable[[str], None] = print) -> FineTuneResult:
    """Plan, train and guard (see the module doc); ``cfg`` is a ``training.TrainConfig`` with ``init`` set."""
    from LiverSegExtension.model.catalog import read_card
    from LiverSegExtension.training.checkpoint import finished_run
    from LiverSegExtension.training.loop import train

    if cfg.init is None:
        raise LiverSegError("fine-tuning needs the model to start from (--init)")
    out = Path(cfg.output)
    if finished_run(out, cfg) and (out / CARD_FILE).is_file():
        card = json.loads((out / CARD_FILE).read_text())
        if "verdict" in card:
            verdict = card["verdict"]
            log(f"{out}: this fine-tune is already finished; {verdict['reason']}")
            return FineTuneResult(out, bool(verdict["accepted"]), verdict["reason"], card.get("comparison_with_parent", []))
    parent_card = read_card(cfg.init)
    p = plan(parent_card, list(cfg.data), list(cfg.val_cases), replay, holdout, cfg.seed)
    for note in p.notes:
        log(note)
    if p.guard:
        log("scored by the guard: " + ", ".join(f"{c.name} ({p.groups[c.name]})" for c in p.guard))
    cfg.oversample = {**p.oversample, **cfg.oversample}
    train(cfg, progress=progress, split=(p.train, []))
    rows, verdict = guard(Path(cfg.init), out, p, cfg.device, progress)
    if rows:
        log(table(rows))
    log(f"comparison written to {out / COMPARISON}")
    return FineTuneResult(out, verdict["accepted"], verdict["reason"], rows)
