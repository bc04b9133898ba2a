"""Training augmentation for the realities of the data (MONAI transforms plus CT-specific ones).

No left-right (or any) flips: the liver has a side. Intensity and contrast-phase variation (native CT
included), noise, blur (resolution), scale (livers of every size, and scans whose written spacing is wrong) and
field-of-view changes (scans cropped tightly around the liver, or cutting it), and the artefacts of
the reconstructed IRCAD HU (air aliased onto water) in both directions, so that the model ignores how
air looks. Fine-stage crops centre on the liver's dome now and then, where masks leak into the heart,
and the liver's lowest part is now and then stretched downwards, as a Riedel's lobe or a long right lobe
reaches (livers vary far more in shape than 16 training cases show).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    OneOf,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialCrop,
    SpatialPadd,
)
from scipy import ndimage

from LiverSegExtension.data.simulate import PHASES, liver_level, metal_streaks, phase_curve


def _drawn_liver(transform: Randomizable, prob: float, data: dict, label_key: str) -> np.ndarray | None:
    """The ``[z, y, x]`` liver mask of ``data`` when ``transform`` is drawn (probability ``prob``) and the
    sample has liver, else None. The draw comes first, so that samples with and without liver use the
    random stream alike."""
    if transform.R.rand() >= prob:
        return None
    label = np.asarray(data[label_key])[0] > 0
    return label if label.any() else None


class RandAirArtefactd(Randomizable, MapTransform):
    """Make air look like the reconstructed IRCAD HU (wrapped onto water), or make water-like voxels
    outside the liver look like real air. Works on HU, before windowing."""

    def __init__(self, keys: str = "image", label_key: str = "label", prob: float = 0.4, bright: float = 0.3) -> None:
        MapTransform.__init__(self, [keys])
        self.label_key, self.prob, self.bright = label_key, prob, bright
        self._mode = "none"

    def randomize(self, data: object = None) -> None:
        r = self.R.rand()
        self._mode = "none" if r >= self.prob else ("alias" if r < self.prob / 2 else "darken")
        self._band = (self.R.uniform(-60, -20), self.R.uniform(20, 60))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if self._mode == "none":
            return data
        d = dict(data)
        img = np.array(d[self.key], dtype=np.float32, copy=True)
        if self._mode == "alias":
            # The unwrapping chose the offset per connected region: most air landed on water, but some
            # regions one wrap higher (ircad_e19's right lung is bright, above the liver). So per region.
            low = img < -200
            regions, n = ndimage.label(low)
            up = np.where(self.R.rand(n + 1) < self.bright, 256.0, 0.0)[regions[low]]
            img[low] = ((img[low] + 128.0) % 256.0) - 128.0 + up + self.R.normal(0, 15, int(low.sum()))
        else:
            liver = np.asarray(d[self.label_key]) > 0
            near = ndimage.binary_dilation(liver[0], iterations=3)[None] if liver.any() else liver
            band = (img > self._band[0]) & (img < self._band[1]) & ~near
            img[band] = -1000.0 + self.R.normal(0, 20, int(band.sum()))
        d[self.key] = img
        return d

    @property
    def key(self) -> str:
        return self.keys[0]


class RandContrastPhased(Randomizable, MapTransform):
    """Move a scan to another contrast phase: the liver's parenchyma and everything enhanced beyond it (blood
    pool, heart, vessels, kidneys) to a phase's levels (``data.simulate.PHASES``): native (no contrast: in a
    native CT the heart above the dome looks much like liver, and a model trained on enhanced scans only
    learns "bright blood is not liver" and leaks into it), arterial (bright aorta, liver barely enhanced),
    portal venous, delayed (liver and blood alike). Continuous; air, fat, water and bone keep their values.
    Works on HU, with the case's liver label."""

    def __init__(self, keys: str = "image", label_key: str = "label", prob: float = 0.5,
                 phases: dict[str, float] | None = None) -> None:
        MapTransform.__init__(self, [keys])
        self.label_key, self.prob = label_key, prob
        self.phases = phases or dict(PHASE_WEIGHTS)

    def __call__(self, data: dict) -> dict:
        if self.R.rand() >= self.prob:
            return data
        names = list(self.phases)
        weights = np.array([self.phases[n] for n in names], dtype=float)
        (l_lo, l_hi), (b_lo, b_hi) = PHASES[names[self.R.choice(len(names), p=weights / weights.sum())]]
        d = dict(data)
        img = np.asarray(d[self.keys[0]], dtype=np.float32)
        liver = np.asarray(d[self.label_key])[0] > 0
        d[self.keys[0]] = phase_curve(img, liver_level(img[0], liver), self.R.uniform(l_lo, l_hi),
                                      self.R.uniform(b_lo, b_hi))
        return d


class RandMetalArtefactd(Randomizable, MapTransform):
    """Draw metal into a slab of slices (``data.simulate.metal_streaks``): bright implant cores and the bright
    and dark streaks they throw across each slice, as from spinal hardware behind the liver, or from clips,
    coils and drains beside or in it. Arrays ``[1, z, y, x]`` in HU on a grid of ``spacing`` mm, z towards
    the head. The label is kept: the liver under the streaks is still liver."""

    def __init__(self, keys: str = "image", label_key: str = "label", spacing: float = 2.5, prob: float = 0.2,
                 slab_mm: tuple[float, float] = (5.0, 30.0), strength_hu: tuple[float, float] = (200.0, 2000.0)) -> None:
        MapTransform.__init__(self, [keys])
        self.label_key, self.spacing, self.prob = label_key, spacing, prob
        self.slab_mm, self.strength_hu = slab_mm, strength_hu

    def __call__(self, data: dict) -> dict:
        label = _drawn_liver(self, self.prob, data, self.label_key)
        if label is None:
            return data
        zyx = np.argwhere(label)
        z, y, x = zyx[self.R.randint(len(zyx))]
        if self.R.rand() < 0.5:  # behind the liver, where the spine and its hardware are
            ys = np.nonzero(label[z, :, x])[0]
            y = min(label.shape[1] - 1, int(ys.max()) + self.R.randint(5, 20))
        slices = max(1, int(round(self.R.uniform(*self.slab_mm) / self.spacing)))
        rng = np.random.default_rng(self.R.randint(2**31))
        d = dict(data)
        img = np.asarray(d[self.keys[0]], dtype=np.float32)
        d[self.keys[0]] = metal_streaks(img[0], [self.spacing] * 3, (z, y, x), slices, self.R.uniform(*self.strength_hu),
                                        rng, cores=int(self.R.randint(1, 3)))[None]
        return d


class RandFieldOfViewd(Randomizable, MapTransform):
    """Blank everything outside a random box around the liver, as in a scan reconstructed with a small
    field of view or cropped around the liver: image set to the window's floor (what lies outside a
    scan at inference), label cleared there (no model can see liver that is not in the scan). The box
    faces sit from ``cut`` voxels inside the liver to ``margin`` voxels outside it. Works on windowed
    images; patches without liver are left alone."""

    def __init__(self, keys: list[str], label_key: str = "label", prob: float = 0.15,
                 cut: int = 6, margin: int = 16) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.prob, self.cut, self.margin = label_key, prob, cut, margin

    def __call__(self, data: dict) -> dict:
        label = _drawn_liver(self, self.prob, data, self.label_key)
        if label is None:
            return data
        zyx = np.argwhere(label)
        lo = zyx.min(axis=0) - self.R.randint(-self.cut, self.margin + 1, size=3)
        hi = zyx.max(axis=0) + 1 + self.R.randint(-self.cut, self.margin + 1, size=3)
        lo, hi = np.clip(lo, 0, label.shape), np.clip(hi, 0, label.shape)
        inside = np.zeros(label.shape, dtype=bool)
        inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        d = dict(data)
        for key in self.keys:
            if isinstance(d[key], torch.Tensor):
                d[key] = d[key] * torch.from_numpy(inside).to(d[key].dtype)[None]
            else:
                d[key] = np.asarray(d[key]) * inside[None].astype(np.asarray(d[key]).dtype)
        return d


class RandDomeCropd(Randomizable, MapTransform):
    """Crop ``roi_size`` around the top (dome) of the liver: arrays ``[1, z, y, x]`` with z pointing to
    the head, as on the model's grids. The dome is where the liver meets the diaphragm, heart and
    lung, and where masks leak; a crop by label alone seldom centres there, and the few scans that
    reach into the chest show the heart only in such crops. The centre is a random voxel of the
    liver's top 15 slices, moved up by up to a third of the crop. Label-free patches are left to the
    next transform's padding."""

    def __init__(self, keys: list[str], roi_size: list[int], label_key: str = "label") -> None:
        MapTransform.__init__(self, keys)
        self.roi_size, self.label_key = list(roi_size), label_key

    def __call__(self, data: dict) -> dict:
        label = np.asarray(data[self.label_key])[0] > 0
        if not label.any():
            return data
        first = max(0, int(np.nonzero(label.any(axis=(1, 2)))[0].max()) - 14)  # the top 15 slices
        zyx = np.argwhere(label[first:])
        centre = zyx[self.R.randint(len(zyx))] + [first, 0, 0]
        centre[0] += self.R.randint(0, self.roi_size[0] // 3 + 1)
        crop = SpatialCrop(roi_center=[int(c) for c in centre], roi_size=self.roi_size)
        d = dict(data)
        for key in self.keys:
            d[key] = crop(d[key])
        return d


# Scale factors: the grid is sampled this much wider (>0) or tighter (<0), so the anatomy shrinks or grows.
# Skewed towards shrinking: a scan whose written spacing is smaller than the truth shows a small liver.
# From a child's body (0.6 of an adult's: a grid 1.7 times wider) to a large adult's (1.25).
SCALE_RANGE = ((-0.2, 0.7),) * 3
# How often each contrast phase is drawn when a scan is moved to another one: the data is portal venous,
# native and arterial scans are what it lacks (and where the heart leaks, and a third of a liver is lost).
PHASE_WEIGHTS = {"native": 0.45, "arterial": 0.35, "delayed": 0.1, "portal": 0.1}
METAL = 0.2  # share of samples with metal drawn in
DOME_CROP = 0.25  # share of fine-stage crops centred at the liver's dome
INFERIOR_LOBE = 0.25  # share of fine-stage samples whose liver gets a longer lowest part


class RandInferiorLobed(Randomizable, MapTransform):
    """Stretch the lowest part of the liver downwards, as in a Riedel's lobe: arrays ``[1, z, y, x]`` on an
    axis-aligned grid of ``spacing`` mm, z towards the head, keys image then label.

    Within a vertical Gaussian column (sigma ``sigma_mm``) around the centroid of the liver's lowest quarter,
    the liver's lowest 35 % is stretched ``extend_mm`` further down, and what lay below it moves down too:
    a tongue of liver over the kidney and colon. Above that part nothing moves. The image is interpolated
    linearly, the label by nearest neighbour, so both move together."""

    def __init__(self, keys: list[str], spacing: float, label_key: str = "label", prob: float = 0.25,
                 extend_mm: tuple[float, float] = (30.0, 100.0), sigma_mm: tuple[float, float] = (25.0, 45.0)) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.prob, self.spacing = label_key, prob, spacing
        self.extend_mm, self.sigma_mm = extend_mm, sigma_mm

    def __call__(self, data: dict) -> dict:
        label = _drawn_liver(self, self.prob, data, self.label_key)
        if label is None:
            return data
        zs = np.nonzero(label.any(axis=(1, 2)))[0]
        z0, height = int(zs.min()), int(zs.max() - zs.min() + 1)
        lowest = np.argwhere(label[z0 : z0 + max(1, height // 4)])
        cy, cx = lowest[:, 1].mean(), lowest[:, 2].mean()
        extend = self.R.uniform(*self.extend_mm) / self.spacing
        sigma = self.R.uniform(*self.sigma_mm) / self.spacing
        top = z0 + max(2, int(0.35 * height))
        y0, y1 = max(0, int(cy - 3 * sigma)), min(label.shape[1], int(cy + 3 * sigma) + 1)
        x0, x1 = max(0, int(cx - 3 * sigma)), min(label.shape[2], int(cx + 3 * sigma) + 1)
        zz, yy, xx = np.meshgrid(np.arange(top + 1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32),
                                 np.arange(x0, x1, dtype=np.float32), indexing="ij")
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        # Where each output voxel samples from: [z0 - extend, top] onto [z0, top], and below it a shift.
        new_bottom = z0 - extend
        source = np.where(zz >= new_bottom, top - (top - zz) * (top - z0) / (top - new_bottom), zz + extend)
        coords = np.stack([zz + weight * (source - zz), yy, xx])
        d = dict(data)
        for key, order in zip(self.keys, (1, 0)):
            arr = d[key]
            is_tensor = isinstance(arr, torch.Tensor)
            out = np.array(arr.detach().cpu().numpy() if is_tensor else arr, dtype=np.float32, copy=True)
            out[0, : top + 1, y0:y1, x0:x1] = ndimage.map_coordinates(out[0], coords, order=order, mode="nearest")
            d[key] = torch.from_numpy(out).to(arr.dtype) if is_tensor else out.astype(np.asarray(arr).dtype)
        return d


def training_transforms(stage: str, window: tuple[float, float], patch: list[int], spacing_mm: float) -> Compose:
    """The random pipeline for one stage; inputs are dicts of ``[1, z, y, x]`` HU image and label on an
    axis-aligned grid of ``spacing_mm``, z towards the head."""
    keys = ["image", "label"]
    # The affine reads a larger region than it writes, so that zooming out shows real anatomy, not padding.
    context = [int(p * 4 // 3) for p in patch]
    if stage == "coarse":
        small = [max(16, p // 2) for p in patch]
        crop = [RandSpatialCropd(keys, roi_size=small, max_roi_size=context, random_size=True, random_center=True)]
        last = []
    else:
        # One crop in four at the liver's dome; the rest by label, three in four of those on the liver.
        crop = [RandInferiorLobed(keys, spacing_mm, "label", prob=INFERIOR_LOBE),
                OneOf([RandCropByPosNegLabeld(keys, "label", spatial_size=context, pos=3, neg=1, num_samples=1,
                                              allow_smaller=True),
                       RandDomeCropd(keys, context)], weights=[1.0 - DOME_CROP, DOME_CROP]),
                SpatialPadd(keys, spatial_size=context, value=0)]
        last = [RandSpatialCropd(keys, roi_size=[int(p * 0.7) for p in patch], max_roi_size=patch, random_size=True),
                SpatialPadd(keys, spatial_size=patch, value=0)]
    return Compose([
        RandAirArtefactd("image", "label", prob=0.4),
        RandContrastPhased("image", "label", prob=0.5),
        RandMetalArtefactd("image", "label", spacing_mm, prob=METAL),
        ScaleIntensityRanged("image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        *crop,
        RandFieldOfViewd(keys, "label", prob=0.15),
        RandAffined(keys, prob=0.8, spatial_size=patch, rotate_range=(0.2, 0.15, 0.15), scale_range=SCALE_RANGE,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        *last,
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianSmoothd("image", sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), sigma_z=(0.3, 1.2), prob=0.2),
        RandGaussianNoised("image", std=0.03, prob=0.3),
    ])
