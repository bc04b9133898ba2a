"""Does the per-case ``uncertainty`` predict the error? Rank correlation with 1 - Dice over the validation
cases and altered versions of them, and where the uncertain band lies on CORT (the heart leak).

    python benchmarks/uncertainty.py [--model DIR]

Alterations of each validation case (ts_a, lits_117_crop with its header corrected, ircad_e05, ircad_e12):
as it is; the field of view cut to the lower 60 % of the liver's slices; Gaussian noise of 40 HU and of
120 HU; resampled to 6 mm slices; a header that mirrors left and right. The label follows each alteration,
so Dice measures the mask against the same voxels. Prints one JSON line per scan and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))

from LiverSegExtension.data.metrics import UNSURE, dice  # noqa: E402
from LiverSegExtension.inference.segmenter import LiverSegmenter  # noqa: E402
from LiverSegExtension.io import read_image  # noqa: E402

CASES = ["ts_a", "lits_117_crop", "ircad_e05", "ircad_e12"]


def altered(image: sitk.Image, label: sitk.Image, kind: str, rng: np.random.Generator):
    if kind == "as is":
        return image, label
    if kind == "cut":
        z = np.nonzero(sitk.GetArrayViewFromImage(label).any(axis=(1, 2)))[0]
        top = int(z[0] + 0.6 * (z[-1] - z[0]))
        return image[:, :, :top], label[:, :, :top]
    if kind.startswith("noise"):
        sd = float(kind.split()[1])
        arr = sitk.GetArrayFromImage(image).astype(np.float32) + rng.normal(0, sd, image.GetSize()[::-1]).astype(np.float32)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(image)
        return out, label
    if kind == "6 mm slices":
        ref = sitk.Image([image.GetSize()[0], image.GetSize()[1],
                          int(image.GetSize()[2] * image.GetSpacing()[2] / 6.0)], image.GetPixelID())
        ref.SetSpacing([image.GetSpacing()[0], image.GetSpacing()[1], 6.0])
        ref.SetOrigin(image.GetOrigin())
        ref.SetDirection(image.GetDirection())
        return (sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024),
                sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if kind == "mirrored header":
        out, lab = sitk.Image(image), sitk.Image(label)
        d = (np.diag([-1.0, 1, 1]) @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist()
        out.SetDirection(d)
        lab.SetDirection(d)
        return out, lab
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    from scipy.stats import spearmanr

    seg = LiverSegmenter(args.model, device="cpu")
    rng = np.random.default_rng(0)
    rows = []
    for case in CASES:
        image = read_image(SHARED / "liver-train" / "imagesTr" / f"{case}.nii.gz")
        label = read_image(SHARED / "liver-train" / "labelsTr" / f"{case}.nii.gz")
        if case == "lits_117_crop":  # its header turns the anatomy 180 degrees in-plane (see the README)
            for im in (image, label):
                im.SetDirection(np.eye(3).ravel().tolist())
        for kind in ("as is", "cut", "noise 40", "noise 120", "6 mm slices", "mirrored header"):
            img, lab = altered(image, label, kind, rng)
            result = seg.segment_image(img)
            d = dice(result.mask > 0, sitk.GetArrayViewFromImage(lab) > 0)
            rows.append({"case": case, "alteration": kind, "dice": round(d, 4), "uncertainty": round(result.uncertainty, 4),
                         "liver_ml": round(result.liver_ml, 1), "warnings": len(result.warnings)})
            print(json.dumps(rows[-1]), flush=True)
    u = [r["uncertainty"] for r in rows]
    err = [1 - r["dice"] for r in rows]
    rho, p = spearmanr(u, err)
    clean = [r for r in rows if r["alteration"] == "as is"]
    rho_clean = spearmanr([r["uncertainty"] for r in clean], [1 - r["dice"] for r in clean])[0] if len(clean) > 2 else None

    cort = SHARED / "unlabelled" / "cort_liver_trunk_3mm.nii.gz"
    band_in_heart = None
    if cort.is_file():
        from LiverSegExtension.geometry import ijk_to_ras_of

        image = read_image(cort)
        result = seg.segment_image(image, probabilities=True)
        p255 = result.probability
        band = (p255 > UNSURE[0] * 255) & (p255 < UNSURE[1] * 255)
        m = ijk_to_ras_of(image)
        kji = np.argwhere(band)
        ras = (m @ np.c_[kji[:, ::-1], np.ones(len(kji))].T).T[:, :3]
        heart = (ras[:, 2] > 13.0) & (ras[:, 0] < 29.5)  # the heart region of test_real_data.py
        kji_mask = np.argwhere(result.mask > 0)
        ras_mask = (m @ np.c_[kji_mask[:, ::-1], np.ones(len(kji_mask))].T).T[:, :3]
        mask_heart = (ras_mask[:, 2] > 13.0) & (ras_mask[:, 0] < 29.5)
        band_in_heart = {"band_ml": round(len(kji) * float(np.prod(image.GetSpacing())) / 1000, 1),
                         "band_share_in_heart_region": round(float(heart.mean()), 3),
                         "mask_share_in_heart_region": round(float(mask_heart.mean()), 3),
                         "uncertainty": round(result.uncertainty, 4)}
    print(json.dumps({"scans": len(rows), "spearman_uncertainty_vs_1_minus_dice": round(float(rho), 3),
                      "p_value": float(f"{p:.2g}"), "spearman_on_unaltered_cases": rho_clean, "cort": band_in_heart}))


if __name__ == "__main__":
    main()
