"""One-click fixes of a liver mask, from what the model already knows (its probability, the mask's shape):

- :func:`add_here`: at a point, add the connected region where the last run's liver probability was above a
  threshold: what the 0.5 threshold or the clean-up cut away (a lobe the model was unsure of);
- :func:`remove_here`: at a point inside a leak, cut the mask at the narrowest neck between that point and the
  liver's body and remove the part beyond it (a leak into the heart or a bowel loop).

Arrays are ``[k, j, i]``; a point is ``(k, j, i)`` voxel indices. Each returns a new mask and the voxels it
changed; neither touches anything but the mask it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from LiverSegExtension.errors import LiverSegError

FULL = np.ones((3, 3, 3), bool)
MAX_NECK_VOXELS = 12  # necks up to about twice this wide (in voxels) are cut


def _point(mask: np.ndarray, point: Sequence[float]) -> tuple[int, int, int]:
    k, j, i = (int(round(float(v))) for v in point)
    if not all(0 <= v < n for v, n in zip((k, j, i), mask.shape)):
        raise LiverSegError("the point lies outside the volume")
    return k, j, i


def add_here(mask: np.ndarray, probability: np.ndarray, point: Sequence[float],
             threshold: float = 0.1) -> tuple[np.ndarray, int]:
    """``mask`` plus the connected region (26-neighbours) around ``point`` where ``probability`` (uint8, 255 x p)
    is above ``threshold``; (new mask, voxels added)."""
    k, j, i = _point(mask, point)
    candidate = probability > threshold * 255
    if not candidate[k, j, i]:
        raise LiverSegError(f"the model gave this point a liver probability of {probability[k, j, i] / 255:.2f}, "
                            f"below {threshold}: nothing to add here (paint it in the Segment Editor)")
    labels, _ = ndimage.label(candidate, structure=FULL)
    region = labels == labels[k, j, i]
    out = mask.astype(bool) | region
    return out.astype(np.uint8), int(out.sum() - np.count_nonzero(mask))


def remove_here(mask: np.ndarray, point: Sequence[float]) -> tuple[np.ndarray, int]:
    """``mask`` less the part that ``point`` lies in, cut off at the narrowest neck joining it to the liver's
    body (the largest part): the mask is eroded one voxel at a time until the point's part separates from
    the body; each voxel then goes to the nearest eroded part, and the point's goes. (new mask, voxels removed)"""
    k, j, i = _point(mask, point)
    binary = mask.astype(bool)
    if not binary[k, j, i]:
        raise LiverSegError("the point is not in the mask: nothing to remove here")
    labels, _ = ndimage.label(binary, structure=FULL)
    if labels[k, j, i] != np.argmax(np.bincount(labels.ravel())[1:]) + 1:  # a separate part: remove it whole
        out = binary & (labels != labels[k, j, i])
        return out.astype(np.uint8), int(binary.sum() - out.sum())
    box = ndimage.find_objects(binary.view(np.uint8))[0]
    sub = binary[box]
    here = tuple(p - s.start for p, s in zip((k, j, i), box))
    core = sub
    cross = ndimage.generate_binary_structure(3, 1)
    for _ in range(MAX_NECK_VOXELS):
        core = ndimage.binary_erosion(core, cross)
        parts, n = ndimage.label(core, structure=FULL)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        body = int(sizes.argmax())
        nearest = parts[tuple(ndimage.distance_transform_edt(parts == 0, return_distances=False,
                                                             return_indices=True))]
        mine = int(nearest[here])
        if mine != body:
            gone = sub & (nearest == mine)
            out = binary.copy()
            out[box] &= ~gone
            return out.astype(np.uint8), int(gone.sum())
    raise LiverSegError("no neck found between this point and the liver's body: the point seems to lie in the "
                        "liver itself (use the Segment Editor's scissors)")
