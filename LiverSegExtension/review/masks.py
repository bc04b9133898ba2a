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


def _liver_segment(seg, path: Path):
    """The SEG's segment named Liver, or its only one."""
    segments = {int(s.SegmentNumber): s for s in getattr(seg, "SegmentSequence", [])}
    liver = [n for n, s in segments.items() if str(getattr(s, "SegmentLabel", "")).strip().lower() == "liver"]
    number = liver[0] if len(liver) == 1 else next(iter(segments)) if len(segments) == 1 else None
    if getattr(seg, "Modality", "") != "SEG" or number is None:
        raise LiverSegError(f"{path}: not a DICOM SEG with one segment named Liver (or one segment only)")
    return number, segments[number]


def dicom_seg_mask(path: Path, ct: InputCase) -> tuple[sitk.Image, str]:
    """(the liver of a DICOM SEG on the series' grid as SimpleITK reads ``ct``, the algorithm the SEG names): each
    frame goes to the slice whose SOPInstanceUID it references, as LiverSeg's SEG and highdicom's write them."""
    import pydicom

    from LiverSegExtension import io

    if not ct.files:
        raise LiverSegError(f"{path}: a DICOM SEG belongs to a DICOM series; this case's CT is {ct.label}")
    try:
        seg = pydicom.dcmread(str(path))
        frames = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    except Exception as exc:  # noqa: BLE001 - pydicom's many ways of failing on a damaged file
        raise LiverSegError(f"{path}: not a readable DICOM SEG ({exc})") from None
    number, segment = _liver_segment(seg, path)
    slices = {str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID): k
              for k, f in enumerate(ct.files)}
    grid = io.input_grid(ct)  # slice k from ct.files[k]
    mask = np.zeros(grid.GetSize()[::-1], np.uint8)
    threshold = 0 if getattr(seg, "SegmentationType", "BINARY") == "BINARY" else int(seg.MaximumFractionalValue) // 2
    shared = (getattr(seg, "SharedFunctionalGroupsSequence", None) or [None])[0]

    def group(frame_groups, keyword: str) -> list:  # per frame, or shared by every frame (a SEG of one segment)
        return getattr(frame_groups, keyword, None) or getattr(shared, keyword, None) or []

    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        identification = group(groups, "SegmentIdentificationSequence")
        if identification and int(identification[0].ReferencedSegmentNumber) != number:
            continue
        sources = [s.ReferencedSOPInstanceUID for d in group(groups, "DerivationImageSequence")
                   for s in getattr(d, "SourceImageSequence", [])]
        k = next((slices[uid] for uid in sources if uid in slices), None)
        if k is None:
            raise LiverSegError(f"{path}: a frame references no slice of {ct.label}: is it this series' SEG?")
        mask[k] |= (frame > threshold).astype(np.uint8)
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(grid)
    algorithm = str(getattr(segment, "SegmentAlgorithmName", "") or "")
    for item in getattr(segment, "SegmentationAlgorithmIdentificationSequence", None) or []:
        algorithm = f"{getattr(item, 'AlgorithmName', '')} v{getattr(item, 'AlgorithmVersion', '')}".strip()
    return image, algorithm
