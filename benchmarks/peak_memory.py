"""Peak memory of a whole ``liverseg segment`` process on a large CT, stored as float64 and as int16.

    python benchmarks/peak_memory.py [--slices 1500] [--formats nrrd,nii,nii.gz]
    python benchmarks/peak_memory.py --tile 4 --types int16 --formats nrrd     # 512 x 512 x 516
    python benchmarks/peak_memory.py --tile 4 --types int16 --formats nii.gz,nrrd --pixel 0.57   # fine pixels

The CT is chaos_ct3 from ../shared/data resampled to 512 x 512 x SLICES (real HU, the same anatomy in
thinner slices), or with --tile N, resampled to 129 slices and stacked N times along z (N abdomens, one
above the other: a long scan with as much to look at as N); a synthetic CT when the data is absent. With
--pixel, its pixels are resampled to that size first (0.57 mm: a 292 mm field of view around the scan's
centre, where the liver fills more of the grid and the paste back onto it is largest).
Each file is written once, then segmented in a fresh process whose peak resident memory (ru_maxrss,
from wait4) is printed as one JSON
line per file. The files are large (3.1 GB for float64 at 1500 slices): they go to --work (default /tmp)
and are removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "Testing"))


def large_ct(slices: int, pixel: float | None = None):
    import SimpleITK as sitk

    from LiverSegExtension.io import read_image

    series = SHARED / "dicom" / "chaos_ct3"
    if pixel:
        from process_time import fine_ct

        image, source = fine_ct(pixel)
    elif series.is_dir():
        image, source = read_image(series), "chaos_ct3 resampled"
    else:
        from synthetic import phantom_image

        image, _ = phantom_image(shape_kji=(80, 512, 512), spacing=(0.75, 0.75, 2.0))
        source = "synthetic"
    size, spacing = image.GetSize(), image.GetSpacing()
    ref = sitk.Image([size[0], size[1], slices], image.GetPixelID())
    ref.SetSpacing([spacing[0], spacing[1], spacing[2] * (size[2] - 1) / (slices - 1)])
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024), source


def tiled_ct(tiles: int, pixel: float | None = None):
    """chaos_ct3 at 512 x 512 x 129, stacked ``tiles`` times along z."""
    import numpy as np
    import SimpleITK as sitk

    image, source = large_ct(129, pixel)
    array = np.concatenate([sitk.GetArrayViewFromImage(image)] * tiles, axis=0)
    tiled = sitk.GetImageFromArray(array)
    tiled.SetSpacing(image.GetSpacing())
    tiled.SetOrigin(image.GetOrigin())
    tiled.SetDirection(image.GetDirection())
    return tiled, f"{source}, tiled {tiles} times along z"


def run(ct: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from LiverSegExtension import console; "
                             "sys.exit(console())", "segment", str(ct), "-o", str(out), "--device", "cpu", "-q"], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    row = {}
    if (out / "summary.csv").exists():
        with open(out / "summary.csv", newline="") as f:
            row = next(csv.DictReader(f), {})
    return {"exit": code, "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "wall_s": round(wall, 1),
            "status": row.get("status"), "liver_ml": row.get("liver_ml"), "error": row.get("error") or None}


def write(path: Path, slices: int, type_name: str, tiles: int = 0, pixel: float | None = None) -> None:
    import SimpleITK as sitk

    image, source = tiled_ct(tiles, pixel) if tiles else large_ct(slices, pixel)
    pixel = {"float64": sitk.sitkFloat64, "float32": sitk.sitkFloat32, "int16": sitk.sitkInt16, "int32": sitk.sitkInt32}
    sitk.WriteImage(sitk.Cast(image, pixel[type_name]), str(path), path.name.endswith(".gz"))
    print(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1500)
    parser.add_argument("--formats", default="nrrd,nii")
    parser.add_argument("--types", default="float64,int16")
    parser.add_argument("--tile", type=int, default=0, help="stack the 129-slice CT this many times instead")
    parser.add_argument("--pixel", type=float, default=None, help="resample the pixels to this size (mm) first")
    parser.add_argument("--work", default=tempfile.gettempdir())
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # internal: make one file, in a process of its own
    parser.add_argument("--type", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write(args.write, args.slices, args.type, args.tile, args.pixel)
        return

    work = Path(tempfile.mkdtemp(prefix="liverseg-memory-", dir=args.work))
    try:
        for type_name in args.types.split(","):
            for fmt in args.formats.split(","):
                ct = work / f"ct_{type_name}.{fmt}"
                # Written by a child: a fork of a process holding the CT would count its pages in the
                # peak of the process measured next.
                pixel = ["--pixel", str(args.pixel)] if args.pixel else []
                source = subprocess.run([sys.executable, __file__, "--write", str(ct), "--slices", str(args.slices),
                                         "--type", type_name, "--tile", str(args.tile), *pixel], check=True,
                                        capture_output=True, text=True).stdout.strip()
                result = run(ct, work / f"out_{type_name}_{fmt}")
                slices = 129 * args.tile if args.tile else args.slices
                print(json.dumps({"ct": f"{source}, 512x512x{slices} {type_name} .{fmt}",
                                  "file_gb": round(ct.stat().st_size / 1e9, 2), **result}), flush=True)
                ct.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
