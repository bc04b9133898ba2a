"""Reading Medical Segmentation Decathlon datasets and putting cases on the model's grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import Grid, physical_corners, resample_to_grid
from LiverSegExtension.io import read_image, volume_stem


@dataclass
class LabelledCase:
    """A training or validation case of a dataset: a CT with its reference label (an input to segment, without
    one, is ``io.cases.InputCase``)."""

    name: str
    image: Path
    label: Path
    provenance: dict[str, Any] | None = None  # the dataset's ``cases`` entry: where image and label came from
    # A header fix named by a model card: (direction as written, direction to use). Applied only to a file
    # whose direction is the one written, so an already corrected copy is read as it is.
    direction_fix: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    dataset: Path | None = None  # the dataset folder (holding dataset.json) the case was listed in

    def read(self) -> tuple[sitk.Image, sitk.Image]:
        """Image and label, with the header fix applied to both."""
        image, label = read_image(self.image), read_image(self.label)
        if self.direction_fix is not None:
            wrong, right = self.direction_fix
            for im in (image, label):
                if np.allclose(im.GetDirection(), wrong, atol=1e-4):
                    im.SetDirection(right)
        return image, label


def case_name(path: Path) -> str:
    """A case's name: its file's name without the volume format (any case, ``.nhdr`` too)."""
    return volume_stem(path)


def load_msd(folder: str | Path) -> list[LabelledCase]:
    """The training cases of an MSD dataset (``dataset.json`` with imagesTr/ and labelsTr/)."""
    folder = Path(folder)
    meta = folder / "dataset.json"
    if not meta.is_file():
        raise LiverSegError(f"{folder}: not a Medical Segmentation Decathlon dataset (no dataset.json)")
    from LiverSegExtension.data.dataset import dataset_meta

    content = dataset_meta(folder)  # checked: JSON, entries, no path outside the folder
    entries = content.get("training", [])
    provenance = content.get("cases") if isinstance(content.get("cases"), dict) else {}
    cases = []
    for entry in entries:
        image, label = folder / entry["image"], folder / entry["label"]
        if not image.is_file() or not label.is_file():
            raise LiverSegError(f"{meta}: case {entry['image']} lists a missing image or label file")
        name = case_name(image)
        cases.append(LabelledCase(name, image, label, provenance=provenance.get(name), dataset=folder.resolve()))
    if not cases:
        raise LiverSegError(f"{meta}: the dataset lists no training cases")
    return cases


def grid_for(image: sitk.Image, spacing: list[float]) -> Grid:
    corners = physical_corners(image)
    return Grid.covering(corners.min(axis=0), corners.max(axis=0), spacing)


def to_grid(image: sitk.Image, label: sitk.Image | None, spacing: list[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """A case resampled onto the axis-aligned grid of ``spacing`` covering it: HU float32 and uint8 label.

    The label is resampled linearly and thresholded at 0.5, which keeps its shape better than nearest.
    """
    grid = grid_for(image, spacing)
    hu = sitk.GetArrayFromImage(resample_to_grid(image, grid, pixel_type=sitk.sitkFloat32))
    if label is None:
        return hu, None
    label_f = sitk.Cast(label > 0, sitk.sitkFloat32)
    lab = sitk.GetArrayFromImage(resample_to_grid(label_f, grid, default=0.0)) >= 0.5
    return hu, lab.astype(np.uint8)
