"""How much one "Remove here" click takes off CORT's heart leak.

    python benchmarks/cort_clicks.py [--cort ../shared/data/unlabelled/cort_liver_trunk_3mm.nii.gz] [--below-mm 15]

The bundled model segments CORT (whole-trunk native CT, where the mask leaks from the liver's dome into the
heart); one click is placed, as an annotator would, inside the leak: in the middle of the mask's part in the
heart (the region located by eye, ``conditions.cort_heart_region``) on the slice BELOW-MM under that part's
top; ``fixes.remove_here`` cuts there. Prints the volumes before and after, in all, in the heart region and
in the top 40 mm of the mask (the part benchmarks/cort_heart.py calls the heart part), and the click's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.conditions import cort_heart_region  # noqa: E402
from LiverSegExtension.inference.fixes import remove_here  # noqa: E402
from LiverSegExtension.inference.segmenter import LiverSegmenter  # noqa: E402
from LiverSegExtension.io import read_image  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cort", type=Path, default=ROOT.parent / "shared" / "data" / "unlabelled" / "cort_liver_trunk_3mm.nii.gz")
    p.add_argument("--below-mm", type=float, default=15.0)
    args = p.parse_args(argv)
    cort = read_image(args.cort)
    mask = LiverSegmenter(device="cpu").segment_image(cort).mask
    spacing = cort.GetSpacing()
    voxel_ml = float(np.prod(spacing)) / 1000
    top = int(np.nonzero(mask.any(axis=(1, 2)))[0].max())
    cut = top - int(round(40 / spacing[2]))
    leak = mask.astype(bool) & cort_heart_region(cort)
    k = int(np.nonzero(leak.any(axis=(1, 2)))[0].max()) - int(round(args.below_mm / spacing[2]))
    rows, columns = np.nonzero(leak[k])
    point = (k, int(np.median(rows)), int(np.median(columns)))
    start = time.perf_counter()
    fixed, removed = remove_here(mask, point)
    seconds = time.perf_counter() - start
    print(json.dumps({"click_kji": point, "removed_ml": round(removed * voxel_ml, 1), "seconds": round(seconds, 2),
                      "total_ml": [round(float(mask.sum()) * voxel_ml, 1), round(float(fixed.sum()) * voxel_ml, 1)],
                      "heart_region_ml": [round(float(leak.sum()) * voxel_ml, 1),
                                          round(float((fixed.astype(bool) & leak).sum()) * voxel_ml, 1)],
                      "top_40mm_ml": [round(float(mask[cut:].sum()) * voxel_ml, 1),
                                      round(float(fixed[cut:].sum()) * voxel_ml, 1)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
