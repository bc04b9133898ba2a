"""The CORT heart leak before and after a fine-tune on a corrected CORT.

CORT (unlabelled whole-trunk native CT) is where the shipped model leaks from the liver's dome into the
heart. The "correction" is the parent's own mask with its top 40 mm removed, as an annotator would erase
the heart part; the fine-tune (default recipe, the README's command) then trains on it. Reported: the
mask's volume above the corrected top (mL), for the parent and the new model, and the guard's verdict.

    python benchmarks/cort_heart.py --cort ../shared/data/unlabelled/cort_liver_trunk_3mm.nii.gz --out runs/cort
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LiverSegExtension.data.dataset import add_case_images  # noqa: E402
from LiverSegExtension.inference.segmenter import LiverSegmenter  # noqa: E402
from LiverSegExtension.io import read_image  # noqa: E402
from LiverSegExtension.model.catalog import default_model_dir  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cort", type=Path, required=True)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("train_options", nargs="*", help="extra options for liverseg train (after --)")
    args = p.parse_args(argv)
    cort = read_image(args.cort)
    before = LiverSegmenter(args.model, device="cpu").segment_image(cort).mask
    top = int(np.nonzero(before.any(axis=(1, 2)))[0].max())
    cut = top - int(round(40 / cort.GetSpacing()[2]))
    corrected = before.copy()
    corrected[cut:] = 0
    label = sitk.GetImageFromArray(corrected.astype(np.uint8))
    label.CopyInformation(cort)
    corrections = args.out / "corrections"
    if not (corrections / "dataset.json").is_file():
        add_case_images(corrections, cort, label, provenance={"annotator": "heart part (top 40 mm) removed"})
    model = args.out / "model"
    r = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "train", "--init", str(args.model), "--data",
                        str(corrections), "--output", str(model), "--device", "cpu", *args.train_options], cwd=ROOT)
    after = LiverSegmenter(model, device="cpu").segment_image(cort).mask
    voxel_ml = float(np.prod(cort.GetSpacing())) / 1000
    card = json.loads((model / "card.json").read_text())
    print(json.dumps({"above_cut_ml_parent": round(float(before[cut:].sum()) * voxel_ml, 1),
                      "above_cut_ml_new": round(float(after[cut:].sum()) * voxel_ml, 1),
                      "total_ml_parent": round(float(before.sum()) * voxel_ml, 1),
                      "total_ml_new": round(float(after.sum()) * voxel_ml, 1),
                      "exit": r.returncode, "verdict": card["verdict"]["reason"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
