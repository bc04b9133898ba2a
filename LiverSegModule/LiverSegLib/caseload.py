"""A batch's case loaded into the scene for review, as the batch loads it: the CT through Slicer's volume reader (a
volume file, or a DICOM series from its own files in slice order), its mask (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``
through Slicer's segmentation reader, or a DICOM SEG) read onto the CT's grid, refused in one line when it does
not lie there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import InputCase
from LiverSegLib import mrml


def volumes_logic(scene):
    """Slicer's volumes logic (the one the batch reads with); a logic of its own on a scene outside Slicer."""
    modules = getattr(slicer, "modules", None)
    if scene is slicer.mrmlScene and hasattr(modules, "volumes"):
        return modules.volumes.logic()
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    return logic


def load_ct(volumes, scene, ct: InputCase, name: str, read_before: bool = False):
    """The CT as a scalar volume node, read as the batch reads it (a series from its files in slice order).
    ``read_before``: the batch read the whole file already (its row says so): a .nii.gz's header is checked
    against its length, and the stream (half a second for a 512x512x130 CT) is not decompressed once more."""
    import vtk

    from LiverSegExtension import io

    for path in ct.files or (ct.source,):
        io.check_name_encoding(path)  # ITK would abort the process
    if ct.files:
        io.check_series_layout(ct)
        files = io.series_files_in_order(ct)
        names = vtk.vtkStringArray()
        for file in files:
            names.InsertNextValue(file)
        node = volumes.AddArchetypeScalarVolume(files[0], name, 0, names)
    else:
        io.check_file_length(ct.source, check_stream=not read_before)  # ITK would zero-fill a truncated NIfTI
        io.check_data_files_beside(ct.source)
        node = volumes.AddArchetypeVolume(str(ct.source), name, 0)
    if node is None or node.GetImageData() is None:
        if node is not None:
            scene.RemoveNode(node)
        raise LiverSegError(f"{ct.label}: Slicer could not read this CT")
    if ct.files:
        array, matrix = mrml.volume_array_and_matrix(node)
        io.check_loaded_grid(ct, matrix, array.shape)
    return node


def on_volume_grid(image, volume, what: str) -> np.ndarray:
    """A SimpleITK mask (or probability map) on the volume's grid (``masks.on_grid``)."""
    from LiverSegExtension.review.masks import on_grid

    array, matrix = mrml.volume_array_and_matrix(volume)
    return on_grid(image, array.shape, matrix, what)


def seg_nrrd_mask(path: Path, volume) -> np.ndarray:
    """The "Liver" segment (or the only one) of a Slicer segmentation file, on the volume's grid; the file's
    nodes leave the scene again."""
    scene = volume.GetScene()
    before = mrml.node_ids(scene)
    try:
        try:  # Slicer's loadNodeFromFile raises RuntimeError ("Failed to load node from file: ...") on failure
            node = slicer.util.loadSegmentation(str(path))
        except RuntimeError:
            raise LiverSegError(f"{path}: Slicer could not read this segmentation file (damaged, or not a "
                                "segmentation)") from None
        segmentation = node.GetSegmentation()
        segment_id = mrml.find_liver_segment(node) or (
            segmentation.GetNthSegmentID(0) if segmentation.GetNumberOfSegments() == 1 else None)
        if segment_id is None:
            raise LiverSegError(f"{path}: no segment named 'Liver' among its {segmentation.GetNumberOfSegments()}")
        label = segmentation.GetSegment(segment_id).GetLabelValue()
        own = int(np.count_nonzero(slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id) == label))
        mask = mrml.segment_mask(node, segment_id, volume)
        if int(mask.sum()) != own:
            raise LiverSegError(f"{path}: does not lie on this CT's grid ({int(mask.sum())} of {own} voxels land "
                                "on it): is it this patient's?")
        return mask
    finally:
        mrml.remove_nodes_added_since(scene, before)


def read_mask(mask_path: Path | None, ct: InputCase, volume, name: str = "") -> tuple[np.ndarray, str]:
    """(the mask on the volume's grid, the model that made it where the file says); an empty mask for a case
    without one (failed, or no liver found)."""
    from LiverSegExtension.io import format_of, read_image
    from LiverSegExtension.io.formats import DICOM_SEG, SEG_NRRD

    if mask_path is None:
        return np.zeros(mrml.volume_array_and_matrix(volume)[0].shape, np.uint8), ""
    if not mask_path.exists():
        raise LiverSegError(f"{mask_path}: the mask summary.csv records for {name or ct.label} is not there")
    kind = format_of(mask_path)
    if kind is SEG_NRRD:
        return seg_nrrd_mask(mask_path, volume), ""
    algorithm = ""
    if kind is DICOM_SEG:
        from LiverSegExtension.review.masks import dicom_seg_mask

        image, algorithm = dicom_seg_mask(mask_path, ct)
    else:
        image = read_image(mask_path)
    mask = on_volume_grid(image, volume, str(mask_path))
    return np.minimum(mask, 1, out=mask), algorithm  # any label value is liver (a mask of 0 and 255, say)
