"""Memory of a long headless batch: does LiverSegBatch's memory stay flat over many cases?

    python benchmarks/batch_soak.py [--cases 40] [--input ../shared/data/dicom/chaos_ct3] [--model DIR]

Runs ``LiverSegModule/Scripts/LiverSegBatch.py`` (plain Python with slicer-core, as CI does; in Slicer it is the
same script) on N links to one real CT, samples the process's resident memory every 0.2 s, and prints
one JSON line: RSS after the first case, after the last, the peak, and seconds per case. A leak of the
scene's nodes or of the model's buffers shows as RSS growing with the case count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--input", type=Path, default=SHARED / "dicom" / "chaos_ct3")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    if not args.input.exists():
        print(f"batch_soak: {args.input} not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        suffix = "".join(args.input.suffixes) if args.input.is_file() else ""
        for n in range(args.cases):
            (inputs / f"case{n:03d}{suffix}").symlink_to(args.input.resolve())
        cmd = [sys.executable, str(ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"), "-i", str(inputs), "-o", str(out)]
        cmd += ["--model", str(args.model)] if args.model else []
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        after_case: list[float] = []

        def watch_lines() -> None:  # "[n/N] status ..." is printed after each case
            for line in proc.stdout:
                if line.startswith("["):
                    after_case.append(rss_mb(proc.pid))

        reader = threading.Thread(target=watch_lines, daemon=True)
        reader.start()
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, rss_mb(proc.pid))
            time.sleep(0.2)
        reader.join()
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not after_case:
            print(f"batch_soak: the batch failed (exit {proc.returncode})", file=sys.stderr)
            return 1
    print(json.dumps({
        "input": str(args.input), "cases": args.cases, "rss_after_first_mb": round(after_case[0]),
        "rss_after_half_mb": round(after_case[len(after_case) // 2]), "rss_after_last_mb": round(after_case[-1]),
        "peak_rss_mb": round(peak), "seconds_per_case": round(seconds / args.cases, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
