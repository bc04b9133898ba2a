"""A start barrier for tests that run two processes at once (two annotators on one folder): each waits for the
other's file, so both really overlap, whatever the machine's speed."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def wait_for(sync: Path, name: str) -> None:
    """Wait until ``sync/name`` exists; a generous bound only stops a hang (the other process comes in seconds)."""
    end = time.monotonic() + 600
    while not (Path(sync) / name).exists():
        if time.monotonic() > end:
            sys.exit(f"{name} never came")
        time.sleep(0.005)
