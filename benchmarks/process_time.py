"""Wall time of a whole ``liverseg segment`` process on one CT: start, imports, model, reading, segmenting,
writing, exit. What a user waits for at the terminal (and a batch job per case, without the batch script).

    python benchmarks/process_time.py [--runs 5] [--format nii.gz] [--runtime auto|torch]

The CT is chaos_ct3 from ../shared/data resampled to 512 x 512 x 129 (real HU), or a synthetic CT of that
size when the data is absent, written once as an uncompressed NRRD. Prints one JSON line per run (wall
seconds, the case's own seconds from summary.csv, peak RSS) and a last line with the medians.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", default="nii.gz")
    parser.add_argument("--runtime", default="auto", help="auto (ONNX Runtime on the CPU), onnxruntime or torch")
    args = parser.parse_args()

    import SimpleITK as sitk
    from slicer_click import ct_512x512x129

    work = Path(tempfile.mkdtemp(prefix="liverseg-bench-"))
    image, source = ct_512x512x129()
    ct = work / "ct.nrrd"
    sitk.WriteImage(image, str(ct), False)
    walls, cases = [], []
    for run in range(args.runs):
        out = work / f"out{run}"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", str(ct), "-o", str(out),
                               "--format", args.format, "--device", "cpu", "--runtime", args.runtime, "-q"], cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"liverseg segment failed (exit {done.returncode})")
        with open(out / "summary.csv", newline="") as f:
            [row] = list(csv.DictReader(f))
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        walls.append(wall)
        cases.append(float(row["seconds"]))
        print(json.dumps({"run": run + 1, "wall_s": round(wall, 2), "case_s": cases[-1], "liver_ml": row["liver_ml"],
                          "peak_rss_mb_so_far": round(peak_mb)}), flush=True)
    print(json.dumps({"ct": f"{source}, 512x512x129", "runtime": args.runtime,
                      "runs": args.runs, "median_wall_s": round(statistics.median(walls), 2),
                      "median_case_s": round(statistics.median(cases), 2), "min_wall_s": round(min(walls), 2)}))


if __name__ == "__main__":
    main()
