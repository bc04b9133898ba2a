"""``pack`` (here, with SimpleITK): the training cases on each trained stage's grid as ``liverseg train`` prepares
them, in ``cases.npz`` (int16 HU, uint8 label, bzip2: 28 % smaller than zip's deflate on CT noise), and the run's
settings, architecture and starting model in ``manifest.json``; refused when it would not travel."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.catalog import WEIGHTS_FILE, sha256_of
from LiverSegExtension.training.packed.common import (
    AIR_HU,
    CASES,
    CHECKPOINT,
    INIT_WEIGHTS,
    MANIFEST,
    MONAI_WHEEL,
    PACK_LIMIT,
    REMOTE_OUT,
    ROOT,
    atomic,
    git,
    mib,
    say,
    split_cases_as_train,
)


def _grids(cfg: Any, card: dict[str, Any], cases: list) -> dict[str, np.ndarray]:
    """Each training case on each trained stage's grid, as ``liverseg train`` prepares it: int16 HU, uint8 label."""
    from LiverSegExtension.training.loop import prepare

    arrays = {}
    for stage in cfg.stages:
        spacing = card["stages"][stage]["spacing_mm"]
        say(f"[{stage}] {len(cases)} training cases onto the {spacing} mm grid")
        for i, item in enumerate(prepare(cases, spacing)):
            arrays[f"{i}_{stage}_image"] = np.clip(np.rint(item["image"][0]), -32768, 32767).astype(np.int16)
            arrays[f"{i}_{stage}_label"] = item["label"][0].astype(np.uint8)
    return arrays


def _crop_air(arrays: dict[str, np.ndarray]) -> dict[str, list[list[int]]]:
    """Crop each case to what is not air (and its label) with a 2-voxel margin; returns the boxes kept."""
    boxes = {}
    for key in [k for k in arrays if k.endswith("_image")]:
        lab_key = key[: -len("_image")] + "_label"
        keep = (arrays[key] > AIR_HU) | (arrays[lab_key] > 0)
        if not keep.any():
            continue
        box = [[max(0, int(ix.min()) - 2), int(ix.max()) + 3] for ix in
               (np.nonzero(keep.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3))]
        region = tuple(slice(lo, hi) for lo, hi in box)
        arrays[key], arrays[lab_key] = arrays[key][region], arrays[lab_key][region]
        boxes[key[: -len("_image")]] = box
    return boxes


def _write_cases(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` (``np.load`` reads it) whose members are bzip2-compressed; the same arrays make the same bytes."""
    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_BZIP2, compresslevel=9) as z:
            for key, arr in arrays.items():
                member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                member.compress_type = zipfile.ZIP_BZIP2
                with z.open(member, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    atomic(path, write)


def _init_record(init: Path, out: Path) -> dict[str, Any]:
    """The model started from: its weights referred to where the repository carries them, else copied."""
    from LiverSegExtension.model.catalog import read_card

    card, src = read_card(init), init / WEIGHTS_FILE
    record = {"name": card.get("name"), "version": card.get("version"), "path": str(init.resolve()),
              "weights_sha256": sha256_of(src)}
    rel = os.path.relpath(src.resolve(), ROOT)
    if not rel.startswith("..") and git("ls-files", "--error-unmatch", rel) is not None:
        return {**record, "weights": rel, "travels_in": "repository"}  # tracked: it travels anyway
    shutil.copyfile(src, out / INIT_WEIGHTS)
    return {**record, "weights": INIT_WEIGHTS, "travels_in": "pack"}


def _travel_size(out: Path) -> tuple[int, int, int]:
    """(pack bytes, wheel bytes, repository bytes that travel anyway: tracked and untracked-not-ignored)."""
    pack = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    wheel = sum(f.stat().st_size for f in wheels) if wheels else MONAI_WHEEL
    listed = git("ls-files", "-co", "--exclude-standard", "-z") or ""
    repo = sum((ROOT / f).stat().st_size for f in listed.split("\0") if f and (ROOT / f).is_file())
    return pack, wheel, repo


def pack(args: argparse.Namespace) -> int:
    import monai

    from LiverSegExtension.model.catalog import read_card
    from LiverSegExtension.training.card import starting_architecture
    from LiverSegExtension.training.checkpoint import run_settings
    from LiverSegExtension.training.options import train_config

    cfg = train_config(args, Path(args.out))
    train_cases, val_cases, p = split_cases_as_train(cfg, args.replay, args.holdout)
    for note in p.notes if p else []:
        say(note)
    card = starting_architecture(cfg, read_card(cfg.init) if cfg.init else None)
    out = Path(args.out)
    if (out / CHECKPOINT).exists():
        raise LiverSegError(f"{out} holds a run's checkpoint, which a new pack would not match: move it away first")
    out.mkdir(parents=True, exist_ok=True)
    for old in (MANIFEST, INIT_WEIGHTS):  # this pack's own, made again
        (out / old).unlink(missing_ok=True)
    arrays = _grids(cfg, card, train_cases)
    _write_cases(out / CASES, arrays)
    init = _init_record(cfg.init, out) if cfg.init else None
    crops = {}
    if sum(_travel_size(out)[:2]) > PACK_LIMIT:
        say(f"over {mib(PACK_LIMIT)}: cropping the air around each case")
        crops = _crop_air(arrays)
        _write_cases(out / CASES, arrays)
    size, wheel, repo = _travel_size(out)
    if size + wheel > PACK_LIMIT:
        for f in (out / CASES, out / INIT_WEIGHTS):
            f.unlink(missing_ok=True)
        raise LiverSegError(f"the pack and the MONAI wheel would take {mib(size + wheel)}, over the {mib(PACK_LIMIT)} "
                            "that may travel beside the repository: train fewer stages (--stages fine) or cases")
    record = {k: [str(v) for v in val] if k == "data" else str(val) if isinstance(val, Path) else val
              for k, val in asdict(cfg).items()}
    manifest = {
        "format": 1, "monai": monai.__version__, "mode": "fine-tune" if cfg.init else "train", "config": record,
        "settings": run_settings(cfg, train_cases, val_cases), "architecture": card,
        "cases": [c.name for c in train_cases], "validation_cases": [c.name for c in val_cases],
        "guard": {"cases": [c.name for c in p.guard], "groups": p.groups, "notes": p.notes} if p else None,
        "replay": args.replay if args.replay in ("auto", "none") else str(Path(args.replay).resolve()),
        "holdout": args.holdout, "init": init, "air_crops": crops,
        "shapes": {k: list(a.shape) for k, a in arrays.items() if k.endswith("_image")},
        "cases_sha256": sha256_of(out / CASES),
    }
    atomic(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    size = _travel_size(out)[0]
    rel = os.path.relpath(out.resolve(), ROOT)
    if rel.startswith(".."):
        say(f"note: {out} is outside the repository {ROOT}: only what is inside it travels to a lent machine")
    say(f"pack {out}: {mib(size)} ({len(train_cases)} training cases, stages {', '.join(cfg.stages)}); with the "
         f"MONAI wheel {mib(size + wheel)} of {mib(PACK_LIMIT)}; with the repository's {mib(repo)}, "
         f"{mib(size + wheel + repo)} travel (at most 64 MiB)")
    say(f"the wheel, once: python3 -m pip download monai=={monai.__version__} --no-deps --only-binary=:all: "
         "--python-version 3.12 -d .whl")
    say(f"on the lent machine (carry [\"{rel}\", \".whl\"], timeout_s 600):\n  python3 -m pip install -q --no-index "
         "--no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && PYTHONUNBUFFERED=1 "
         f"python3 scripts/device_train.py run --pack {rel} --out {REMOTE_OUT} --minutes 8; rc=$?; "
         f"cp -r {REMOTE_OUT} $OUT/run; exit $rc")
    say(f"then here: python scripts/device_train.py finish --pack {rel} --weights RETURNED/run --output MODEL_DIR")
    return 0
