"""MRML glue: volume nodes to arrays, masks to the "Liver" segment and back. Main thread only."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from LiverSegExtension.io import LIVER_SEGMENT

SEGMENT_NAME = LIVER_SEGMENT["name"]
DRAFT_ATTRIBUTE = "LiverSeg.Draft"
UNCERTAIN_ATTRIBUTE = "LiverSeg.Uncertain"  # where the model hesitated (0.1 < p < 0.9), on the volume's grid
UNCERTAIN_SEGMENT = "Liver: uncertain"  # shown on request, never exported (the export takes "Liver" only)
UNCERTAIN_COLOR = (255, 215, 0)


def encode_mask(mask: np.ndarray) -> str:
    """A binary mask as compact text for a node attribute (saved with the scene): its box, bit-packed,
    zlib-compressed, base64. A liver on a 512x512x200 grid takes tens of kilobytes."""
    shape = [int(n) for n in mask.shape]
    lo, hi = [0, 0, 0], [0, 0, 0]
    for axis in range(3):  # the box from per-axis projections: cheaper than listing every voxel
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if len(hit):
            lo[axis], hi[axis] = int(hit[0]), int(hit[-1]) + 1
    box = np.asarray(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=bool)
    payload = base64.b64encode(zlib.compress(np.packbits(box).tobytes(), 6)).decode("ascii")
    return json.dumps({"v": 1, "shape": shape, "lo": lo, "hi": hi}, separators=(",", ":")) + "|" + payload


def decode_mask(text: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask ``encode_mask`` wrote, or None when there is none, it is damaged, or the grid changed."""
    if not text or "|" not in text:
        return None
    try:
        head, payload = text.split("|", 1)
        meta = json.loads(head)
        if meta.get("v") != 1 or tuple(meta["shape"]) != tuple(shape):
            return None
        lo, hi = meta["lo"], meta["hi"]
        size = [b - a for a, b in zip(lo, hi)]
        bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(payload)), dtype=np.uint8))
        mask = np.zeros(shape, dtype=np.uint8)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = bits[: int(np.prod(size))].reshape(size)
        return mask
    except (ValueError, KeyError, TypeError, zlib.error):
        return None


def volume_array_and_matrix(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The ``[k, j, i]`` voxels (a view of the node's memory: copy before leaving the main thread)
    and the IJK-to-RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVolume(volume_node), slicer.util.arrayFromVTKMatrix(matrix)


def oriented_image_from_mask(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """A vtkOrientedImageData holding ``mask`` ([k, j, i]) on the grid given by ``ijk_to_ras``."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8, copy=False).ravel()
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return image


def find_liver_segment(segmentation_node) -> str | None:
    """The ID of the segment LiverSeg writes: named "Liver" (what a rerun updates in place)."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(SEGMENT_NAME)
    return segment_id or None


def write_liver_segment(segmentation_node, volume_node, mask: np.ndarray) -> str:
    """Put ``mask`` into the segmentation's "Liver" segment (created if missing), on the volume's grid.

    Other segments are left alone. Terminology, color and reference geometry are (re)applied, the
    segmentation follows the volume's parent transform and sits under the volume's study.
    """
    segment_id = write_segment(segmentation_node, volume_node, mask, SEGMENT_NAME, LIVER_SEGMENT["color"],
                               LIVER_SEGMENT["terminology"])
    segmentation_node.CreateClosedSurfaceRepresentation()  # for the 3D view
    place_beside(segmentation_node, volume_node)
    return segment_id


def write_segment(segmentation_node, volume_node, mask: np.ndarray, name: str, color, terminology: str | None = None) -> str:
    """Put ``mask`` into the segment called ``name`` (created if missing), on the volume's grid."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    if not segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name) or segmentation.AddEmptySegment(name, name)
    segment = segmentation.GetSegment(segment_id)
    segment.SetColor(*(c / 255.0 for c in color))
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    if terminology:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
    image = oriented_image_from_mask(mask, slicer.util.arrayFromVTKMatrix(matrix))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent()
    )
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    return segment_id


def segment_terminology(segment) -> str:
    """The segment's terminology entry string ("" when none); works from Slicer 5.4 on."""
    value = vtk.reference("")
    found = segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value) if found else ""


def place_beside(node, volume_node) -> None:
    """Put ``node`` in the subject hierarchy under the same parent (study) as ``volume_node``."""
    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    node_item = sh.GetItemByDataNode(node)
    if node_item:
        sh.SetItemParent(node_item, parent)
    else:  # Slicer's subject hierarchy plugins normally add the item; without them, add it here
        sh.CreateItem(parent, node)


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene, before: set[str]) -> None:
    """Remove every node added to ``scene`` since ``before`` (``node_ids``): an export's labelmap, and the
    display, storage and color table nodes Slicer creates with it. Singletons (the subject hierarchy, say) are
    shared by the whole scene and stay."""
    for node_id in node_ids(scene) - before:
        node = scene.GetNodeByID(node_id)
        if node is not None and not node.GetSingletonTag():
            scene.RemoveNode(node)


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a uint8 ``[k, j, i]`` array on the volume's grid (what the annotator sees).

    Leaves no node behind (Slicer's ``arrayFromSegmentBinaryLabelmap`` removes its labelmap and color table too).
    """
    scene = volume_node.GetScene()
    before = node_ids(scene)
    try:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__liverseg_export__")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        )
        if not ok:
            raise RuntimeError(f"could not export segment {segment_id} to a labelmap")
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        remove_nodes_added_since(scene, before)
