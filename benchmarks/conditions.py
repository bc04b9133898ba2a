"""Dice per simulated condition: metal streaks, body sizes, contrast phases; and CORT's heart leak.

Each validation case (never trained on) is segmented as it is and under each condition drawn onto it with
``LiverSegExtension.data.simulate`` (the same code the training augmentations use, with a fixed seed per case
and condition): metal on a 15 mm slab (5 slices of 3 mm) at the liver's mid-height, implants behind the liver,
streaks of 400, 800 and 1600 HU; the body scaled 0.6, 0.8 and 1.2 (every spacing times the factor); the liver
and blood remapped to the native, arterial and delayed phases. Dice on the streaked slab alone is reported too.
CORT (unlabelled native trunk CT): mL of mask in the heart region located by eye (Testing/test_real_data.py).

    python benchmarks/conditions.py --data runs/liver-train-corrected --model Resources/Models/liverseg-v1.2.0 \
        --out runs/conditions.csv --summary runs/conditions.json --cort ../shared/data/unlabelled/cort_liver_trunk_3mm.nii.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LiverSegExtension.data.metrics import dice  # noqa: E402
from LiverSegExtension.data.msd import load_msd  # noqa: E402
from LiverSegExtension.data.simulate import PHASES, liver_level, metal_behind_liver, phase_curve, scaled  # noqa: E402
from LiverSegExtension.geometry import ijk_to_ras_of  # noqa: E402
from LiverSegExtension.inference.segmenter import LiverSegmenter  # noqa: E402
from LiverSegExtension.io import read_image  # noqa: E402

VALIDATION = ["ts_a", "lits_117_crop", "ircad_e05", "ircad_e12"]
METAL_HU = (400.0, 800.0, 1600.0)
SLAB_MM = 15.0
SCALES = (0.6, 0.8, 1.2)
SIM_PHASES = ("native", "arterial", "delayed")


def _with_array(image: sitk.Image, arr: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(image)
    return out


def conditions(seed: int) -> dict[str, Callable[[sitk.Image, sitk.Image], tuple[sitk.Image, sitk.Image, np.ndarray | None]]]:
    """name -> f(image, label) -> (image, label, the slab's slices as a [z] mask or None)."""
    def metal(strength: float):
        def f(image, label):
            hu = sitk.GetArrayFromImage(image).astype(np.float32)
            liver = sitk.GetArrayFromImage(label) > 0
            rng = np.random.default_rng(seed)
            out = metal_behind_liver(hu, liver, image.GetSpacing()[::-1], SLAB_MM, strength, rng)
            slab = np.any(out != hu, axis=(1, 2))
            return _with_array(image, out), label, slab
        return f

    def size(factor: float):
        return lambda image, label: (scaled(image, factor), scaled(label, factor), None)

    def phase(name: str):
        def f(image, label):
            hu = sitk.GetArrayFromImage(image).astype(np.float32)
            liver = sitk.GetArrayFromImage(label) > 0
            (l_lo, l_hi), (b_lo, b_hi) = PHASES[name]
            out = phase_curve(hu, liver_level(hu, liver), (l_lo + l_hi) / 2, (b_lo + b_hi) / 2)
            return _with_array(image, out), label, None
        return f

    table = {"as scanned": lambda image, label: (image, label, None)}
    table.update({f"metal {int(s)} HU": metal(s) for s in METAL_HU})
    table.update({f"body x{f}": size(f) for f in SCALES})
    table.update({f"phase {p}": phase(p) for p in SIM_PHASES})
    return table


def cort_heart_region(image: sitk.Image) -> np.ndarray:
    """``[k, j, i]`` voxels of CORT's heart, located by eye (RAS mm): above S = 13, where the liver's left lobe has
    ended, and less than 29.5 mm to the right, where the right lobe's dome (up to S = 30) has not begun."""
    m = ijk_to_ras_of(image)
    kji = np.indices(image.GetSize()[::-1]).reshape(3, -1).T
    ras = kji[:, ::-1] @ m[:3, :3].T + m[:3, 3]
    return ((ras[:, 2] > 13.0) & (ras[:, 0] < 29.5)).reshape(image.GetSize()[::-1])


def cort_heart_ml(seg: LiverSegmenter, path: Path) -> tuple[float, float]:
    """(mL of mask in CORT's heart region, mL of the whole mask)."""
    image = read_image(path)
    result = seg.segment_image(image)
    heart = np.count_nonzero(result.mask.astype(bool) & cort_heart_region(image)) * np.prod(image.GetSpacing()) / 1000
    return float(heart), float(result.liver_ml)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="MSD folder with the validation cases")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--cases", default=",".join(VALIDATION))
    p.add_argument("--out", type=Path, help="CSV of every case and condition")
    p.add_argument("--summary", type=Path,
                   help="JSON of the Dice per condition: mean, lowest, per case (for scripts/finalize_card.py)")
    p.add_argument("--cort", type=Path, help="CORT trunk scan, for the heart leak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    seg = LiverSegmenter(args.model, device="cpu")
    cases = {c.name: c for c in load_msd(args.data)}
    rows = []
    for i, name in enumerate(args.cases.split(",")):
        image, label = cases[name].read()
        image = sitk.Cast(image, sitk.sitkFloat32)
        for cname, make in conditions(args.seed * 1000 + i).items():
            img, lab, slab = make(image, label)
            t = time.perf_counter()
            result = seg.segment_image(img, source=name)
            ref = sitk.GetArrayFromImage(lab) > 0
            row = {"case": name, "condition": cname, "dice": round(dice(result.mask > 0, ref), 4),
                   "slab_dice": round(dice(result.mask[slab] > 0, ref[slab]), 4) if slab is not None else "",
                   "ml": round(result.liver_ml, 1), "seconds": round(time.perf_counter() - t, 2),
                   "warnings": " | ".join(result.warnings)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by: dict[str, list[float]] = defaultdict(list)
    per_case: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by[r["condition"]].append(r["dice"])
        per_case[r["condition"]][r["case"]] = r["dice"]
    print(f"\n{'condition':<16} mean Dice  min Dice   ({args.model.name})")
    for cname, ds in by.items():
        print(f"{cname:<16} {np.mean(ds):.4f}    {np.min(ds):.4f}")
    summary = {"model": seg.model.card.get("name"), "version": seg.model.card.get("version"),
               "weights_sha256": seg.model.card.get("weights_sha256"), "cases": args.cases.split(","),
               "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
               "dice": {c: {"mean": round(float(np.mean(ds)), 4), "min": round(float(np.min(ds)), 4),
                            "cases": per_case[c]} for c, ds in by.items()}}
    if args.cort:
        heart, whole = cort_heart_ml(seg, args.cort)
        print(f"CORT: {heart:.1f} mL in the heart region, {whole:.1f} mL in all")
        rows.append({"case": "cort", "condition": "heart mL", "ml": round(heart, 1)})
        summary["cort_heart_ml"] = round(heart, 1)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "condition", "dice", "slab_dice", "ml", "seconds", "warnings"])
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
