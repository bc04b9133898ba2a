"""Kill ``liverseg segment`` and ``liverseg dataset add`` at random moments; check what each kill leaves and
that the next run cleans it up and completes.

    python benchmarks/kill_faults.py [--runs 12] [--seed 0]

Per round: a run is started, killed with SIGKILL after a random delay (0.2 s to about its whole duration),
and what it left is listed (temporary files, a mask under its final name, summary rows, dataset entries).
Then the same command runs to its end: it must exit 0, leave no temporary file, and give a complete
mask (segment) or a dataset whose ``dataset check`` passes once the kill's orphans are named (dataset add).
Prints one JSON line per round and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))

from LiverSegExtension.io import TEMP_MARK, complete_output  # noqa: E402

CLI = [sys.executable, "-m", "LiverSegExtension.cli"]


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if TEMP_MARK in p.name)


def killed(cmd: list[str], delay: float) -> int:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="rounds for each command")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    import numpy as np
    import SimpleITK as sitk
    from synthetic import make_affine, phantom

    from LiverSegExtension.geometry import image_from_array

    work = Path(tempfile.mkdtemp(prefix="liverseg-kills-"))
    m = make_affine((0.8, 0.8, 2.0), (120, 512, 512))
    ct, liver = phantom((120, 512, 512), m)
    sitk.WriteImage(image_from_array(ct, m), str(work / "ct.nii.gz"))
    sitk.WriteImage(image_from_array(liver.astype(np.uint8), m), str(work / "mask.nii.gz"))
    totals = {"segment_kills_with_debris": 0, "segment_reruns_ok": 0, "add_kills_with_debris": 0, "add_reruns_ok": 0,
              "add_orphans_reported": 0, "rounds": args.runs}

    for n in range(args.runs):
        out = work / f"seg{n}"
        cmd = [*CLI, "segment", str(work / "ct.nii.gz"), "-o", str(out), "--device", "cpu", "-q"]
        code = killed(cmd, rng.uniform(0.2, 7.0))
        left = temporaries(out) if out.exists() else []
        final = out / "ct_liver.nii.gz"
        partial_mask = final.exists() and not complete_output(final)
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        ok = rerun.returncode == 0 and not temporaries(out) and complete_output(final)
        totals["segment_kills_with_debris"] += bool(left)
        totals["segment_reruns_ok"] += ok
        print(json.dumps({"command": "segment", "round": n + 1, "exit_when_killed": code, "debris": left,
                          "mask_cut_short": partial_mask, "rerun_ok": ok}), flush=True)

    ds = work / "dataset"
    for n in range(args.runs):
        edited = sitk.ReadImage(str(work / "mask.nii.gz"))
        edited[1 + n, 0, 0] = 1  # another correction each time (the same one twice is refused)
        label = work / f"mask{n}.nii.gz"
        sitk.WriteImage(edited, str(label))
        cmd = [*CLI, "dataset", "add", "--dataset", str(ds), "--image", str(work / "ct.nii.gz"), "--label", str(label)]
        code = killed(cmd, rng.uniform(0.2, 4.0))
        left = temporaries(ds) if ds.exists() else []
        check = subprocess.run([*CLI, "dataset", "check", str(ds)], cwd=ROOT, capture_output=True, text=True)
        orphans = [line for line in check.stdout.splitlines() if "in dataset.json" in line]
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        # The killed run may have finished adding the case: then the rerun is refused as a duplicate.
        ok = (rerun.returncode == 0 or "already case" in rerun.stderr) and not temporaries(ds)
        final = subprocess.run([*CLI, "dataset", "check", str(ds)], cwd=ROOT, capture_output=True, text=True)
        ok = ok and not [line for line in final.stdout.splitlines() if "temporary" in line]
        totals["add_kills_with_debris"] += bool(left)
        totals["add_reruns_ok"] += ok
        totals["add_orphans_reported"] += len(orphans)
        print(json.dumps({"command": "dataset add", "round": n + 1, "exit_when_killed": code, "debris": left,
                          "orphans_reported_by_check": len(orphans), "rerun_ok": ok}), flush=True)
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
