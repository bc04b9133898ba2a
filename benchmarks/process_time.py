"""Wall time of a whole ``liverseg segment`` process on one CT, for every input kind a user brings: start,
imports, model, reading, segmenting, writing, exit. What a user waits for at the terminal (and a batch job
per case, without the batch script).

    python benchmarks/process_time.py [--runs 5] [--kinds nii.gz,nii,nrrd,dicom] [--pixel 0.57] [--runtime auto]

The CT is chaos_ct3 from ../shared/data resampled to 512 x 512 x 129 with PIXEL mm pixels (0.57 mm: a field
of view of 292 mm, the research CTs' usual fine grid; real HU, centred on the scan), or a synthetic CT of that
size when the data is absent. It is written once as each kind: a gzip NIfTI, a plain NIfTI, an uncompressed
NRRD and a DICOM series (one file a slice). Each process runs the ``liverseg`` command's entry point on this
folder's code, with Python's bytecode cached in the work folder as an installed package has it (a first,
uncounted run per kind writes it). Prints one JSON line per run (wall seconds, the case's own seconds from
summary.csv, peak RSS) and one with the medians per kind.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))
#: what the installed ``liverseg`` script runs, on this folder's code
LIVERSEG = "import sys; from LiverSegExtension import console; sys.exit(console())"


def fine_ct(pixel_mm: float):
    """(chaos_ct3 resampled to 512 x 512 x 129 with ``pixel_mm`` pixels around the scan's centre, its source)."""
    import numpy as np
    import SimpleITK as sitk

    series = SHARED / "dicom" / "chaos_ct3"
    if series.is_dir():
        from LiverSegExtension.io import read_image

        image, source = read_image(series), f"chaos_ct3 resampled to {pixel_mm} mm pixels"
    else:
        from synthetic import phantom_image

        image, source = phantom_image(shape_kji=(80, 512, 512), spacing=(0.75, 0.75, 2.0))[0], "synthetic"
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(size[0] - 1) / 2, (size[1] - 1) / 2, 0.0]))
    ref = sitk.Image([512, 512, 129], sitk.sitkInt16)
    ref.SetSpacing([pixel_mm, pixel_mm, spacing[2] * (size[2] - 1) / 128])
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin((centre - direction @ np.array([511 * pixel_mm / 2, 511 * pixel_mm / 2, 0.0])).tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024), source


def write_kind(image, kind: str, work: Path) -> Path:
    import SimpleITK as sitk

    if kind == "dicom":
        from synthetic import write_dicom_series

        from LiverSegExtension.geometry import ijk_to_ras_of

        write_dicom_series(work / "ct_dicom", sitk.GetArrayFromImage(image), ijk_to_ras_of(image))
        return work / "ct_dicom"
    path = work / f"ct.{kind}"
    sitk.WriteImage(image, str(path), kind.endswith(".gz"))
    return path


def segment(ct: Path, out: Path, runtime: str, env: dict) -> tuple[float, dict, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LIVERSEG, "segment", str(ct), "-o", str(out),
                             "--device", "cpu", "--runtime", runtime, "-q"], cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"liverseg segment {ct} failed (exit {os.waitstatus_to_exitcode(status)})")
    with open(out / "summary.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    shutil.rmtree(out)
    return wall, row, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kinds", default="nii.gz,nii,nrrd,dicom")
    parser.add_argument("--pixel", type=float, default=0.57, help="in-plane pixel size, mm")
    parser.add_argument("--runtime", default="auto", help="auto (ONNX Runtime on the CPU), onnxruntime or torch")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="liverseg-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        image, source = fine_ct(args.pixel)
        for kind in args.kinds.split(","):
            ct = write_kind(image, kind, work)
            segment(ct, work / "out", args.runtime, env)  # caches the bytecode, warms the file cache
            walls, cases = [], []
            for run in range(args.runs):
                wall, row, peak_mb = segment(ct, work / "out", args.runtime, env)
                walls.append(wall)
                cases.append(float(row["seconds"]))
                print(json.dumps({"kind": kind, "run": run + 1, "wall_s": round(wall, 2), "case_s": cases[-1],
                                  "liver_ml": row["liver_ml"], "peak_rss_mb": round(peak_mb)}), flush=True)
            print(json.dumps({"ct": f"{source}, 512x512x129", "kind": kind, "runtime": args.runtime,
                              "runs": args.runs, "median_wall_s": round(statistics.median(walls), 2),
                              "median_case_s": round(statistics.median(cases), 2),
                              "min_wall_s": round(min(walls), 2)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
