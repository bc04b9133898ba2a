"""Conditions the training data lacks, drawn onto real CT: metal artefacts, contrast phases, body sizes.

Plain numpy on ``[z, y, x]`` HU arrays (z towards the head, y towards the back, x towards the patient's
left, as on the model's grids), so that the training augmentations (``training.augment``) and the
per-condition benchmark (``benchmarks/conditions.py``) draw the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only ``scaled`` needs SimpleITK: the augmentations run where it is not installed
    import SimpleITK as sitk

# Enhancement by phase (HU of the liver parenchyma, HU of the blood pool), from the usual protocols: native
# liver 50-70 (down to 15 when fatty), arterial aorta 250-400 with the liver barely enhanced, portal venous
# liver 100-140, delayed (3-5 min) liver and blood alike about 80-110.
PHASES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "native": ((15.0, 70.0), (30.0, 50.0)),
    "arterial": ((60.0, 90.0), (220.0, 380.0)),
    "portal": ((100.0, 140.0), (150.0, 200.0)),
    "delayed": ((75.0, 105.0), (85.0, 120.0)),
}
METAL_HU = 3000.0  # a metal core, well above bone; the model's window clips it to bright anyway


def phase_curve(img: np.ndarray, level: float, liver_hu: float, blood_hu: float) -> np.ndarray:
    """``img`` (HU) remapped so that the liver's ``level`` (:func:`liver_level`) becomes ``liver_hu`` and what is
    enhanced beyond it (blood pool, heart, vessels, kidneys: up to 300 HU) goes to ``blood_hu``; air, fat, water and bone keep
    their values, and the map is continuous. Within 30 HU above the liver's level the slope stays at most 1,
    so that the liver's texture and noise are not amplified into bright speckle."""
    level = min(max(float(level), 40.0), 200.0)
    blood_hu = min(float(blood_hu), 499.0)
    near = liver_hu + min(30.0, max(blood_hu - liver_hu, 0.0))
    # Outer knots far beyond any HU: np.interp clamps outside its knots.
    xs = [-1e5, 20.0, level, level + 30.0, 300.0, 500.0, 1e5]
    ys = [-1e5, 20.0, liver_hu, near, blood_hu, 500.0, 1e5]
    return np.interp(img, xs, ys).astype(np.float32)


def liver_level(img: np.ndarray, liver: np.ndarray | None) -> float:
    """The liver's median HU, or 110 (portal venous) when no liver is labelled."""
    return float(np.median(img[liver])) if liver is not None and liver.any() else 110.0


def metal_streaks(img: np.ndarray, spacing_zyx: Sequence[float], centre_zyx: Sequence[float], slices: int,
                  strength: float, rng: np.random.Generator, cores: int = 2) -> np.ndarray:
    """``img`` (HU, ``[z, y, x]``) with metal drawn in: ``cores`` bright cores (implants 4-8 mm across, 3000
    HU) near ``centre_zyx`` (voxels) on ``slices`` slices, and streaks radiating from them across each of
    those slices: bright and dark lines through the cores, fading with distance, of peak ``strength`` HU,
    and the dark band between two cores (beam hardening) that makes tissue between rods look like fat or
    air. A copy; the input is not changed."""
    out = np.array(img, dtype=np.float32, copy=True)
    nz, ny, nx = out.shape
    sy, sx = float(spacing_zyx[1]), float(spacing_zyx[2])
    z0 = int(round(centre_zyx[0] - slices / 2))
    zs = range(max(0, z0), min(nz, z0 + slices))
    if len(zs) == 0:
        return out
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float32) * sy, np.arange(nx, dtype=np.float32) * sx, indexing="ij")
    centres = [np.array([centre_zyx[1] * sy, centre_zyx[2] * sx]) + rng.uniform(-25, 25, 2) for _ in range(cores)]
    radii = rng.uniform(2.0, 4.0, cores)
    pattern = np.zeros((ny, nx), np.float32)
    core_mask = np.zeros((ny, nx), bool)
    for (cy, cx), radius in zip(centres, radii):
        dy, dx = yy - cy, xx - cx
        r = np.hypot(dy, dx)
        core_mask |= r <= radius
        theta = np.arctan2(dy, dx)
        fade = np.exp(-r / rng.uniform(60.0, 150.0))
        for angle in rng.uniform(0, np.pi, rng.integers(6, 14)):
            across = np.abs(r * np.sin(theta - angle))  # mm from the line through the core
            sign = 1.0 if rng.random() < 0.4 else -1.0
            width = rng.uniform(0.8, 2.5)
            pattern += sign * rng.uniform(0.4, 1.0) * np.exp(-0.5 * (across / width) ** 2) * fade
    if cores >= 2:  # the dark band along the line joining the first two cores
        (ay, ax), (by, bx) = centres[0], centres[1]
        length = max(np.hypot(by - ay, bx - ax), 1e-3)
        uy, ux = (by - ay) / length, (bx - ax) / length
        along = (yy - ay) * uy + (xx - ax) * ux
        across = np.abs((yy - ay) * ux - (xx - ax) * uy)
        inside = np.clip(1.0 - np.abs(along - length / 2) / (length / 2 + 20.0), 0.0, 1.0)
        pattern -= 1.2 * inside * np.exp(-0.5 * (across / 6.0) ** 2)
    for z in zs:
        slab = out[z] + strength * pattern * rng.uniform(0.8, 1.2)
        slab[core_mask] = METAL_HU
        out[z] = np.clip(slab, -1024.0, METAL_HU)
    return out


def metal_behind_liver(img: np.ndarray, liver: np.ndarray, spacing_zyx: Sequence[float], slab_mm: float,
                       strength: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`metal_streaks` on a slab ``slab_mm`` thick at the liver's mid-height, the implants 20-40 mm
    behind the liver's back edge there, at the liver's middle from left to right (where spinal hardware,
    drains and clips sit)."""
    zs = np.nonzero(liver.any(axis=(1, 2)))[0]
    z = int((zs.min() + zs.max()) // 2) if zs.size else img.shape[0] // 2
    ys, xs = np.nonzero(liver[z]) if zs.size else (np.array([img.shape[1] // 2]), np.array([img.shape[2] // 2]))
    back = float(ys.max()) + rng.uniform(20.0, 40.0) / float(spacing_zyx[1])
    centre = (z, min(back, img.shape[1] - 1.0), float(xs.mean()))
    slices = max(1, int(round(slab_mm / float(spacing_zyx[0]))))
    return metal_streaks(img, spacing_zyx, centre, slices, strength, rng)


def scaled(image: sitk.Image, factor: float) -> sitk.Image:
    """The same voxels with every spacing times ``factor``: the body, liver included, ``factor`` times its
    size (0.6: a child's abdomen), the origin kept. Labels are scaled alike with this function."""
    import SimpleITK as sitk

    out = sitk.Image(image)
    out.SetSpacing([s * factor for s in image.GetSpacing()])
    return out
