"""Does the answer depend on the grid a CT is given on? The same crop at its own spacing and resampled finer.

chaos_ct3 (a real contrast-enhanced abdomen, ../shared/data/dicom) is put on 0.57 mm pixels (as the speed
benchmarks do), a cube around its liver is cropped (120 mm by default), and that crop is also resampled onto
finer grids (0.3 mm in-plane; 0.3 mm isotropic; ...) covering the same physical extent. Each version is
segmented by the same model; the finer masks are put back onto the crop's own grid (nearest neighbour) and
compared with its mask by Dice. A model that reads the scan, not its sampling, gives Dice near 1.

    python benchmarks/resolution.py [--model DIR] [--crop-mm 120] [--spacings 0.3,0.3,2 0.3,0.3,0.3 0.5,0.5,0.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.data.metrics import dice
from LiverSegExtension.inference.segmenter import LiverSegmenter

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT.parent / "shared" / "data" / "dicom" / "chaos_ct3"


def on_spacing(image: sitk.Image, spacing: tuple[float, ...]) -> sitk.Image:
    """``image`` resampled (linearly) onto ``spacing``, covering the same physical extent, edge to edge."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [max(1, int(round(e / s))) for e, s in zip(extent, spacing)]
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(spacing)
    ref.SetDirection(image.GetDirection())
    edge = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    ref.SetOrigin(tuple(edge + np.array(ref.GetDirection()).reshape(3, 3) @ (0.5 * np.array(spacing))))
    # the crop's edge voxels reach to its edge: pad by one replicated voxel so the finer grid reads them
    padded = sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1])
    return sitk.Resample(padded, ref, sitk.Transform(), sitk.sitkLinear, -1024, image.GetPixelID())


def chaos_crop(segmenter: LiverSegmenter, crop_mm: float) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CHAOS)))
    ct = reader.Execute()
    native = on_spacing(ct, (0.57, 0.57, ct.GetSpacing()[2]))
    centre = np.argwhere(segmenter.segment_image(native).mask).mean(axis=0)[::-1]  # x, y, z
    half = np.array([crop_mm / 2 / s for s in native.GetSpacing()]).astype(int)
    lo = np.maximum(0, centre.astype(int) - half)
    hi = np.minimum(native.GetSize(), lo + 2 * half)
    return native[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--crop-mm", type=float, default=120.0)
    parser.add_argument("--spacings", nargs="+", default=["0.3,0.3,2", "0.3,0.3,0.3", "0.5,0.5,0.5", "1,1,1"])
    args = parser.parse_args()
    segmenter = LiverSegmenter(args.model, device="cpu", runtime="onnxruntime")
    crop = chaos_crop(segmenter, args.crop_mm)
    base = segmenter.segment_image(crop)
    rows = [{"spacing_mm": list(crop.GetSpacing()), "liver_ml": round(base.liver_ml, 1), "dice_to_crop": 1.0,
             "uncertainty": round(base.uncertainty, 3)}]
    for text in args.spacings:
        spacing = tuple(float(v) for v in text.split(","))
        finer = on_spacing(crop, spacing)
        result = segmenter.segment_image(finer)
        mask = sitk.GetImageFromArray(result.mask)
        mask.CopyInformation(finer)
        back = sitk.GetArrayFromImage(sitk.Resample(mask, crop, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        rows.append({"spacing_mm": list(spacing), "liver_ml": round(result.liver_ml, 1),
                     "dice_to_crop": round(float(dice(back > 0, base.mask > 0)), 4),
                     "uncertainty": round(result.uncertainty, 3)})
    print(json.dumps({"crop_size": crop.GetSize(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
