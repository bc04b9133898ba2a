"""What the three steps of a packed run share: the pack's files and limits, its manifest and the
``TrainConfig`` and case split it records, and small file helpers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from LiverSegExtension.errors import LiverSegError

ROOT = Path(__file__).resolve().parents[3]  # the repository: what travels to a lent machine lies under it

CASES, MANIFEST, INIT_WEIGHTS = "cases.npz", "manifest.json", "init.safetensors"
WEIGHTS, RUN_INFO, CHECKPOINT = "weights.safetensors", "run.json", "checkpoint.pt"
NEXT_WEIGHTS = WEIGHTS + ".next"  # written first: the checkpoint and run.json name it before it replaces WEIGHTS
MIB = 2**20
PACK_LIMIT = 40 * MIB  # pack and wheels: beside the repository's files, within the 64 MiB that travel
FILE_LIMIT = 16 * MIB  # each file that comes back from the lent machine
SHARD_BYTES = 15 * MIB  # tensors per checkpoint file, leaving room for what else it holds
MONAI_WHEEL = 2 * MIB  # counted for the MONAI wheel until it is in .whl/ (1.6 MiB for 1.6.1)
AIR_HU = -500.0  # cropped from a case's edges only when the pack would not fit otherwise
REMOTE_OUT = "/tmp/liverseg-run"  # on the lent machine: kept between calls while it stays warm


def say(msg: str) -> None:
    print(msg, flush=True)


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a stopped run never leaves a half-written file. Not
    ``io.atomic_write``: ``run`` must import on the lent machine, and ``LiverSegExtension.io`` needs SimpleITK."""
    tmp = f"{path}.part"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def read_manifest(pack: Path) -> dict[str, Any]:
    path = pack / MANIFEST
    if not path.is_file():
        raise LiverSegError(f"{pack}: not a training pack (no {MANIFEST}); make one with `device_train.py pack`")
    return json.loads(path.read_text())


def config_of(manifest: dict[str, Any], output: Path | None = None) -> Any:
    """The pack's ``TrainConfig``."""
    from LiverSegExtension.training.config import TrainConfig

    c = dict(manifest["config"])
    c.update(data=[Path(d) for d in c["data"]], output=Path(output or c["output"]),
             init=Path(c["init"]) if c["init"] else None)
    return TrainConfig(**c)


def split_cases_as_train(cfg: Any, replay: str, holdout: int | None) -> tuple[list, list, Any]:
    """(training cases, validation cases, the fine-tuning plan or None) as ``liverseg train`` splits them: with
    ``init`` by the fine-tuning plan (its oversampling merged into ``cfg``), else by ``cfg.val_cases``."""
    from LiverSegExtension.data.msd import load_msd
    from LiverSegExtension.model.catalog import read_card
    from LiverSegExtension.training.finetune import plan
    from LiverSegExtension.training.loop import check_config, split_cases

    if cfg.init is not None:
        p = plan(read_card(cfg.init), list(cfg.data), list(cfg.val_cases), replay if replay in ("auto", "none")
                 else Path(replay), holdout, cfg.seed)
        cfg.oversample = {**p.oversample, **cfg.oversample}
        train_cases, val_cases = p.train, []
    else:
        p = None
        train_cases, val_cases = split_cases([c for d in cfg.data for c in load_msd(d)], cfg.val_cases)
    check_config(cfg, train_cases)
    return train_cases, val_cases, p


def current_weights(folder: Path, sha256: str) -> Path | None:
    """The run's weights file whose sha256 the checkpoint or ``run.json`` names: ``weights.safetensors``, or the
    ``.next`` one when the run was stopped after naming it and before it took the final name; None if neither."""
    from LiverSegExtension.model.catalog import sha256_of

    for name in (WEIGHTS, NEXT_WEIGHTS):
        if (folder / name).is_file() and sha256_of(folder / name) == sha256:
            return folder / name
    return None
