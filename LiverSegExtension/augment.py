"""Training augmentation for the realities of the data (MONAI transforms plus one CT-specific one).

No left-right (or any) flips: the liver has a side. Intensity and contrast-phase variation, noise,
blur (resolution), scale and field-of-view changes, and the artefacts of the reconstructed IRCAD HU
(air aliased onto water) in both directions, so that the model ignores how air looks.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import (
    Compose,
    MapTransform,
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
    SpatialPadd,
)
from scipy import ndimage


class RandAirArtefactd(Randomizable, MapTransform):
    """Make air look like the reconstructed IRCAD HU (wrapped onto water), or make water-like voxels
    outside the liver look like real air. Works on HU, before windowing."""

    def __init__(self, keys: str = "image", label_key: str = "label", prob: float = 0.4) -> None:
        MapTransform.__init__(self, [keys])
        self.label_key, self.prob = label_key, prob
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
            low = img < -200
            img[low] = ((img[low] + 128.0) % 256.0) - 128.0 + self.R.normal(0, 15, int(low.sum()))
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


def training_transforms(stage: str, window: tuple[float, float], patch: list[int]) -> Compose:
    """The random pipeline for one stage; inputs are dicts of ``[1, z, y, x]`` HU image and label."""
    keys = ["image", "label"]
    small = [max(16, p // 2) for p in patch]
    if stage == "coarse":
        crop = [RandSpatialCropd(keys, roi_size=small, max_roi_size=patch, random_size=True, random_center=True)]
    else:
        crop = [
            RandCropByPosNegLabeld(keys, "label", spatial_size=patch, pos=3, neg=1, num_samples=1, allow_smaller=True),
            RandSpatialCropd(keys, roi_size=[int(p * 0.7) for p in patch], max_roi_size=patch, random_size=True),
        ]
    return Compose([
        RandAirArtefactd("image", "label", prob=0.4),
        ScaleIntensityRanged("image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        *crop,
        SpatialPadd(keys, spatial_size=patch, value=0),
        RandAffined(keys, prob=0.7, rotate_range=(0.2, 0.15, 0.15), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianSmoothd("image", sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), sigma_z=(0.3, 1.2), prob=0.2),
        RandGaussianNoised("image", std=0.03, prob=0.3),
    ])
