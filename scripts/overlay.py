"""Render a CT with its liver mask as a PNG montage (axial, coronal, sagittal through the liver).

    python scripts/overlay.py CT MASK OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from LiverSegExtension.io import read_image  # noqa: E402


def to_rgb(ct: np.ndarray, mask: np.ndarray) -> np.ndarray:
    gray = np.clip((ct + 160.0) / 400.0, 0, 1) * 255
    rgb = np.stack([gray] * 3, axis=-1)
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb[mask] = rgb[mask] * 0.6 + np.array([221, 130, 101]) * 0.4
    rgb[edge] = [255, 60, 30]
    return rgb.astype(np.uint8)


def main(ct_path: str, mask_path: str, out: str) -> None:
    # Resample both to 1.5 mm LPS-aligned so the views are upright and isotropic.
    ct = read_image(ct_path)
    mask = sitk.ReadImage(mask_path)
    ref = sitk.Image([int(round(sz * sp / 1.5)) for sz, sp in zip(ct.GetSize(), ct.GetSpacing())], sitk.sitkInt16)
    ref.SetSpacing((1.5, 1.5, 1.5))
    corners = np.array([ct.TransformIndexToPhysicalPoint([int(c) for c in idx]) for idx in
                        [(0, 0, 0), (ct.GetSize()[0] - 1, ct.GetSize()[1] - 1, ct.GetSize()[2] - 1)]])
    ref.SetOrigin(corners.min(axis=0).tolist())
    a = sitk.GetArrayFromImage(sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkFloat32))
    m = sitk.GetArrayFromImage(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    c = np.argwhere(m).mean(axis=0).astype(int) if m.any() else np.array(a.shape) // 2
    views = [to_rgb(a[c[0]], m[c[0]]), to_rgb(a[::-1, c[1]], m[::-1, c[1]]), to_rgb(a[::-1, :, c[2]], m[::-1, :, c[2]])]
    h = max(v.shape[0] for v in views)
    canvas = np.zeros((h, sum(v.shape[1] for v in views), 3), np.uint8)
    x = 0
    for v in views:
        canvas[: v.shape[0], x : x + v.shape[1]] = v
        x += v.shape[1]
    Image.fromarray(canvas).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
