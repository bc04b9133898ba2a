"""Geometry helpers: IJK-to-RAS matrices, SimpleITK images and the axis-aligned grids the model sees.

Conventions (the same as Slicer's ``arrayFromVolume`` and SimpleITK's ``GetArrayFromImage``): volume
arrays are indexed ``[k, j, i]``; ``ijk_to_ras`` is the 4x4 matrix that maps ``(i, j, k, 1)`` to RAS mm.
ITK works in LPS, so the conversion flips the first two physical axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_from_array(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """Wrap a ``[k, j, i]`` array and its IJK-to-RAS matrix as a SimpleITK image (one copy, same dtype)."""
    if array.ndim != 3:
        raise LiverSegError(f"expected a 3D volume, got an array with {array.ndim} dimensions")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    set_geometry(image, ijk_to_ras)
    return image


def set_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    """Give ``image`` the origin, spacing and direction encoded in an IJK-to-RAS matrix."""
    matrix = LPS_FROM_RAS @ np.asarray(ijk_to_ras, dtype=float)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise LiverSegError(f"the IJK-to-RAS matrix has a zero or invalid voxel spacing: {spacing.tolist()}")
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (columns / spacing).ravel()])
    image.SetOrigin([float(v) for v in matrix[:3, 3]])


def ijk_to_ras_of(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK image."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    matrix[:3, 3] = image.GetOrigin()
    return LPS_FROM_RAS @ matrix


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when two images share size, spacing, origin and direction (within float noise)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def physical_corners(image: sitk.Image) -> np.ndarray:
    """LPS positions (8x3) of the centres of the 8 corner voxels."""
    size = image.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in idx]) for idx in corners])


CANONICAL = "LPS"  # index axes i, j, k closest to L, P, S: the order ITK's DICOM reader gives axial scans


def orientation_code(image: sitk.Image) -> str:
    """The three-letter code of the anatomical axes closest to the image's index axes (e.g. ``LPS``)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def canonical(image: sitk.Image) -> sitk.Image:
    """``image`` with its axes permuted and flipped to the canonical order: the same voxels at the same
    places (an oblique grid stays oblique), no interpolation. The image itself when already in that order."""
    if orientation_code(image) == CANONICAL:
        return image
    return sitk.DICOMOrient(image, CANONICAL)


def to_original_order(mask: np.ndarray, work: sitk.Image, original: sitk.Image) -> np.ndarray:
    """A ``[k, j, i]`` mask on ``work`` (:func:`canonical` of ``original``) as a mask on ``original``'s grid."""
    if work is original:
        return mask
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(work)
    back = sitk.DICOMOrient(image, orientation_code(original))
    if back.GetSize() != original.GetSize():  # cannot happen for a permutation; guard the invariant
        raise LiverSegError(f"internal error: the mask's grid {back.GetSize()} is not the input's {original.GetSize()}")
    return sitk.GetArrayFromImage(back)


@dataclass(frozen=True)
class Grid:
    """An LPS-axis-aligned voxel grid (identity direction): where the network sees the world."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]  # x, y, z (ITK order)

    @classmethod
    def covering(cls, lower: np.ndarray, upper: np.ndarray, spacing: float | tuple[float, ...]) -> Grid:
        """The smallest grid of this spacing whose voxel centres span the LPS box [lower, upper]."""
        sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
        size = np.maximum(np.ceil((np.asarray(upper) - np.asarray(lower)) / sp - 1e-6).astype(int) + 1, 1)
        # Centre the grid on the box so rounding spreads evenly on both sides.
        origin = (np.asarray(lower) + np.asarray(upper)) / 2 - (size - 1) * sp / 2
        return cls(tuple(float(v) for v in origin), tuple(float(v) for v in sp), tuple(int(v) for v in size))

    def reference(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An image with this geometry; used as the target of resampling."""
        ref = sitk.Image([int(s) for s in self.size], pixel_type)
        ref.SetOrigin(self.origin)
        ref.SetSpacing(self.spacing)
        return ref

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(index_xyz, dtype=float) * np.asarray(self.spacing)


def _edge_padded(image: sitk.Image, grid: Grid) -> sitk.Image:
    """``image`` with its edge voxels replicated once on each side that ``grid`` reaches past its voxel centres.

    A grid laid over a scan's outermost voxel centres (``Grid.covering``) overhangs them by up to half a grid voxel.
    ITK reads the edge out to half an input voxel and ``default`` beyond, and a block average drops a remainder of
    voxels: whether a face of the grid read the scan or a slab of air then depended on rounding, and the network saw
    the body end at some faces and not others. The same 120 mm crop of a CT at 0.57 mm and at 0.3 mm gave masks
    agreeing at Dice 0.91; reading the edge there, 0.98. Grids inside the scan (the fine box of a larger one) are
    untouched and need no copy."""
    corners = np.array([grid.index_to_physical(np.array([i, j, k]) * (np.array(grid.size) - 1))
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    index = np.array([image.TransformPhysicalPointToContinuousIndex([float(v) for v in c]) for c in corners])
    lower = [int(v) for v in index.min(axis=0) < 1e-6]
    upper = [int(v) for v in index.max(axis=0) > np.array(image.GetSize()) - 1 - 1e-6]
    return sitk.ZeroFluxNeumannPad(image, lower, upper) if any(lower) or any(upper) else image


def resample_to_grid(
    image: sitk.Image,
    grid: Grid,
    default: float = -1024.0,
    interpolator: int = sitk.sitkLinear,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``image`` onto ``grid``.

    Before a large downsampling the input is block-averaged (``BinShrink``) by the integer part of the
    spacing ratio: a cheap anti-aliasing that never makes a float copy of the whole input. With linear
    interpolation, grid points up to one (block-averaged) voxel past the outermost voxel centres read the edge
    voxels (see :func:`_edge_padded`); points further out read ``default``.
    """
    factors = [max(1, min(n, int(np.floor(g / s + 1e-3)))) for g, s, n in zip(grid.spacing, image.GetSpacing(), image.GetSize())]
    if interpolator == sitk.sitkLinear:
        if any(f > 1 for f in factors):
            image = sitk.BinShrink(image, factors)
        image = _edge_padded(image, grid)
    out_type = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator, default, out_type)


def index_box(
    image: sitk.Image, lower: np.ndarray, upper: np.ndarray, margin_vox: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Index range [lo, hi) (x, y, z) of the voxels of ``image`` that cover the LPS box."""
    corners = np.array([[x, y, z] for x in (lower[0], upper[0]) for y in (lower[1], upper[1]) for z in (lower[2], upper[2])])
    idx = np.array([image.TransformPhysicalPointToContinuousIndex([float(v) for v in c]) for c in corners])
    size = np.array(image.GetSize())
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - margin_vox, 0, size)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1 + margin_vox, 0, size)
    return lo, hi
