"""Segmentation metrics in physical units: Dice, surface Dice (NSD), 95 % Hausdorff distance, mean surface
distance, volume."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty, 0.0 when only one is."""
    p, r = pred.astype(bool), ref.astype(bool)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def volume_ml(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Volume of the non-zero voxels in mL (the spacing's order does not matter)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b``."""
    struct = ndimage.generate_binary_structure(3, 1)
    surf_a = a & ~ndimage.binary_erosion(a, struct, border_value=0)
    surf_b = b & ~ndimage.binary_erosion(b, struct, border_value=0)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing_zyx)
    return dist_to_b[surf_a]


NSD_TOLERANCE_MM = 2.0  # surface Dice's tolerance: the one reported beside Dice, HD95 and volume error


def _distances_both_ways(pred: np.ndarray, ref: np.ndarray,
                         spacing_zyx: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(distances from pred's surface voxels to ref's surface, and back) in mm; None when either is empty."""
    p, r = pred.astype(bool), ref.astype(bool)
    if not p.any() or not r.any():
        return None
    # Work on the bounding box of both masks (plus one voxel) to keep the distance transforms small.
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = idx.max(axis=0) + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, r = np.pad(p[sl], 1), np.pad(r[sl], 1)
    return _surface_distances(p, r, spacing_zyx), _surface_distances(r, p, spacing_zyx)


def _surface(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, ...],
             tolerance_mm: float = NSD_TOLERANCE_MM) -> tuple[float, float, float]:
    """(HD95, mean symmetric surface distance, surface Dice at ``tolerance_mm``) from one pair of distance
    transforms, so that every metric of a case comes from the same surfaces. When either mask is empty the
    distances are NaN and the surface Dice is 1.0 if both are, 0.0 if only one is (as :func:`dice`)."""
    d = _distances_both_ways(pred, ref, spacing_zyx)
    if d is None:
        return math.nan, math.nan, 1.0 if not pred.any() and not ref.any() else 0.0
    d_pr, d_rp = d
    both = np.concatenate([d_pr, d_rp])
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    # Surface Dice (NSD) as MONAI's compute_surface_dice counts it: the share of both surfaces' voxels that
    # lie within the tolerance of the other surface.
    nsd = float(np.count_nonzero(both <= tolerance_mm)) / both.size
    return hd95, float(both.mean()), nsd


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, ...]) -> tuple[float, float]:
    """(HD95, mean symmetric surface distance) in mm; NaN when either mask is empty."""
    hd95, msd, _ = _surface(pred, ref, spacing_zyx)
    return hd95, msd


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, ...],
                 tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice: the share of both masks' surface voxels within ``tolerance_mm`` of the other
    mask's surface; 1.0 when both are empty, 0.0 when only one is (as :func:`dice`)."""
    return _surface(pred, ref, spacing_zyx, tolerance_mm)[2]


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, ...]) -> dict[str, float]:
    """All metrics for one case; volumes in mL, volume error relative to the reference in %, ``nsd_2mm`` the
    surface Dice at 2 mm (NSD_TOLERANCE_MM)."""
    pred_ml, ref_ml = volume_ml(pred, spacing_zyx), volume_ml(ref, spacing_zyx)
    hd95, msd, nsd = _surface(pred, ref, spacing_zyx)
    return {
        "dice": dice(pred, ref),
        "nsd_2mm": nsd,
        "hd95_mm": hd95,
        "msd_mm": msd,
        "pred_ml": pred_ml,
        "ref_ml": ref_ml,
        "volume_error_pct": (pred_ml - ref_ml) / ref_ml * 100.0 if ref_ml > 0 else math.nan,
    }


UNSURE = (0.1, 0.9)  # probabilities between these: the model hesitates


def uncertainty_of(prob: np.ndarray) -> float:
    """How unsure the model is of a case, 0..1: of the voxels it calls liver or hesitates on (probability
    above 0.1), the share where the probability lies between 0.1 and 0.9. A clean boundary gives a thin
    band (a few percent); a scan the model does not know gives wide bands and scattered doubt."""
    band = (prob > UNSURE[0]) & (prob < UNSURE[1])
    considered = int(np.count_nonzero(prob > UNSURE[0]))
    return float(np.count_nonzero(band)) / considered if considered else 0.0
