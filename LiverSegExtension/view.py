"""``liverseg view``: a PNG of a CT with its liver mask, to look at a result instead of reading numbers.

Three panels, axial, coronal and sagittal, each through the slice where the liver is largest, cropped to
the body, in radiological display (patient's right on the image's left, anterior at the top of the axial
view, head at the top of the others), the liver tinted and outlined, each panel labelled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import Grid, physical_corners
from LiverSegExtension.io import LIVER_SEGMENT, atomic_write, read_image

WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window, HU
OUTLINE = (255, 215, 0)


def _panels(ct: sitk.Image, mask: sitk.Image) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, HU [rows, cols], liver [rows, cols]) for the three views, on a common isotropic LPS grid."""
    corners = physical_corners(ct)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = max(1.0, float((hi - lo).max()) / 512)  # at most 512 samples along the longest axis
    grid = Grid.covering(lo, hi, spacing)
    hu = sitk.GetArrayFromImage(sitk.Resample(ct, grid.reference(), sitk.Transform(), sitk.sitkLinear, -1024.0,
                                              sitk.sitkFloat32))
    liver = sitk.GetArrayFromImage(sitk.Resample(mask, grid.reference(), sitk.Transform(), sitk.sitkNearestNeighbor,
                                                 0, sitk.sitkUInt8)) > 0
    if not liver.any():  # an empty overlay would look like "no liver found"
        raise LiverSegError("none of the mask lies inside the CT: another patient's mask, or one on another grid far "
                            "from this CT's? Nothing drawn")
    body = hu > -500
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(body)) if body.any() else (slice(None),) * 3
    hu, liver = hu[box], liver[box]  # [z, y, x]: z up (S), y to the back (P), x to the patient's left (L)
    if liver.any():
        z, y, x = (int(np.argmax(liver.sum(axis=axes))) for axes in ((1, 2), (0, 2), (0, 1)))
    else:
        z, y, x = (n // 2 for n in hu.shape)
    return [
        ("axial", hu[z], liver[z]),
        ("coronal", hu[::-1, y, :], liver[::-1, y, :]),
        ("sagittal", hu[::-1, :, x], liver[::-1, :, x]),
    ]


def render(ct_path: str | Path, mask_path: str | Path, out: str | Path, height: int = 400, overwrite: bool = False) -> Path:
    """Write the picture; return its path. The mask may lie on any grid (it is placed in physical space)."""
    from PIL import Image, ImageDraw

    out = Path(out)
    if not out.name.lower().endswith(".png"):
        raise LiverSegError(f"{out}: the picture is written as PNG; give a name ending in .png")
    if height < 64:
        raise LiverSegError(f"--height {height}: at least 64 pixels")
    ct, mask = read_image(ct_path), read_image(mask_path)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise LiverSegError(f"{mask_path}: the mask is empty: nothing to show")
    tiles = []
    try:
        panels = _panels(ct, mask)
    except LiverSegError as exc:
        raise LiverSegError(f"{mask_path}: {exc}") from None
    for label, hu, liver in panels:
        width = max(1, round(hu.shape[1] * height / hu.shape[0]))
        gray = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1) * 255
        tile = np.array(Image.fromarray(gray.astype(np.uint8)).resize((width, height), Image.BILINEAR).convert("RGB"))
        inside = np.array(Image.fromarray(liver.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
        edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))
        tile[inside] = (tile[inside] * 0.65 + np.array(LIVER_SEGMENT["color"]) * 0.35).astype(np.uint8)
        tile[edge] = OUTLINE
        picture = Image.fromarray(tile)
        ImageDraw.Draw(picture).text((6, 4), label, fill=(255, 255, 255))
        tiles.append(picture)
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), (40, 40, 40))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 2
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"), overwrite)
    return out
