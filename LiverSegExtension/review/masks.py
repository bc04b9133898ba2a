"""A batch's mask files read onto the grid of the CT they belong to, for review: any volume format placed voxel for
voxel (refused when its voxels are not the CT's), and a DICOM SEG placed slice by slice through the source
images its frames reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import InputCase


def on_grid(image: sitk.Image, shape_kji: tuple[int, ...], ijk_to_ras: np.ndarray, what: str) -> np.ndarray:
    """A mask (or probability map) as a uint8 ``[k, j, i]`` array on the grid ``shape_kji``/``ijk_to_ras``: the
    same voxels in that grid's index order (Slicer flips K of left-handed files), refused in one line naming
    ``what`` when they are not all the grid's voxels (another patient's mask, a resampled one)."""
    from LiverSegExtension.geometry import same_grid, set_geometry

    grid = sitk.Image([int(n) for n in shape_kji[::-1]], sitk.sitkUInt8)
    set_geometry(grid, ijk_to_ras)
    if same_grid(image, grid):  # the usual case: one copy of the voxels, no resampling
        return sitk.GetArrayFromImage(image if image.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(image, sitk.sitkUInt8))
    moved = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                 sitk.sitkUInt8))
    before, after = int(np.count_nonzero(sitk.GetArrayViewFromImage(image))), int(np.count_nonzero(moved))
    if before != after or image.GetNumberOfPixels() != grid.GetNumberOfPixels():
        raise LiverSegError(f"{what}: does not lie on this CT's grid ({image.GetSize()} voxels against "
                            f"{grid.GetSize()}; {after} of {before} set voxels land on it): is it this patient's?")
    return moved


def dicom_seg_mask(path: Path, ct: InputCase) -> tuple[sitk.Image, str]:
    """(the liver of a DICOM SEG on the series' grid as SimpleITK reads ``ct``, the algorithm the SEG names): the
    frames are placed by the one SEG reader (:func:`LiverSegExtension.io.dicom_seg.read_dicom_seg`)."""
    import pydicom

    from LiverSegExtension import io
    from LiverSegExtension.io.dicom_seg import read_dicom_seg

    if not ct.files:
        raise LiverSegError(f"{path}: a DICOM SEG belongs to a DICOM series; this case's CT is {ct.label}")
    image = read_dicom_seg(path, io.input_grid(ct))
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - read whole just above: only a race could fail here
        raise LiverSegError(f"{path}: not a readable DICOM SEG ({exc})") from None
    algorithm = ""
    for segment in getattr(header, "SegmentSequence", None) or []:
        if str(getattr(segment, "SegmentLabel", "")).strip().lower() == "liver" or len(header.SegmentSequence) == 1:
            algorithm = str(getattr(segment, "SegmentAlgorithmName", "") or "")
            for item in getattr(segment, "SegmentationAlgorithmIdentificationSequence", None) or []:
                algorithm = f"{getattr(item, 'AlgorithmName', '')} v{getattr(item, 'AlgorithmVersion', '')}".strip()
    return image, algorithm
