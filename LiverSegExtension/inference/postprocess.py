"""What is done with the networks' answer on the fine grid: the liver's connected parts (the largest, less
what hangs on by a thin neck, plus parts a band of slices cut off), and the checks that name a mask that
may be wrong (a small liver, a liver on the patient's left or in front of the spine).

scipy's ``ndimage`` is imported on first use (:data:`ndimage`): its import costs a quarter of a second of
the command's start, which a segmenter spends meanwhile in a thread of its own
(:func:`prefetch_ndimage`), while the CT is read and the coarse network runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk


class _LazyNdimage:
    """``scipy.ndimage``, imported when first used."""

    def __getattr__(self, name: str) -> Any:
        from scipy import ndimage as module

        return getattr(module, name)


ndimage: Any = _LazyNdimage()


def prefetch_ndimage() -> None:
    """Import scipy.ndimage in a thread while this one reads and runs the networks (both release the GIL);
    the first use waits for it there, or imports it itself if the thread failed."""
    import sys

    if "scipy.ndimage" not in sys.modules:
        threading.Thread(target=_import_ndimage, name="liverseg-import", daemon=False).start()


def _import_ndimage() -> None:
    try:
        import scipy.ndimage  # noqa: F401
    except Exception:  # noqa: BLE001 - the first real use raises it again, where it can be reported
        pass


# A part of the mask cut off from the liver by a band of slices (metal streaks) is kept when the gap is at
# most this and the part at least this share of the liver (a metal band of 5 slices of 3 mm is 15 mm).
SPLIT_GAP_MM = 30.0
SPLIT_SHARE = 0.1
# The liver's side is judged only on scans whose body is at least this wide (not crops around the liver);
# a liver whose centre lies this far to the patient's left of the body's centre is worth a warning.
SIDE_CHECK_WIDTH_MM = 250.0
WRONG_SIDE_MM = 20.0
# Less than a fifth of a typical adult liver (1-2.5 L; the labelled ones here: 1.1-2.1 L): the scan shows
# only part of the liver, or none, and what was found may not be liver (on CORT's pelvis alone: 102 mL of
# muscle on the right flank; above its liver's dome: 43 mL).
SMALL_LIVER_ML = 300.0
# The spine, seen from the liver found (LPS mm): on every correctly oriented scan here it lies 25-106 mm
# behind the liver's centre and 5-119 mm to its left. Beyond these limits the header misstates the anatomy.
SPINE_IN_FRONT_MM = 20.0
SPINE_ON_RIGHT_MM = 10.0
BONE_HU = 150.0  # a vertebra's spongy bone, on the 2.5 mm grid; the liver is left out however bright it is


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(26-connected component labels of a binary mask, each label's size; the background's counted as 0)."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask.

    scipy rather than MONAI's KeepLargestConnectedComponent, which needs scikit-image on the CPU: one
    package fewer to install into Slicer.
    """
    labels, sizes = components(mask)
    if len(sizes) <= 2:
        return mask.astype(bool)
    return labels == int(sizes.argmax())


def split_parts(labels: np.ndarray, sizes: np.ndarray, main: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The components of a mask (``labels``, ``sizes``: :func:`components`) that a band of slices cut off from
    ``main``, the liver found in the largest of them.

    Metal streaks or a motion band across a few slices can leave the net nothing on them, and the liver
    falls into an upper and a lower part; keeping the largest alone would turn that local failure into the
    loss of a whole part. A part is kept when it lies wholly above or below ``main`` within
    :data:`SPLIT_GAP_MM`, overlaps ``main``'s outline seen from above by half its own, and is at least
    :data:`SPLIT_SHARE` of ``main``'s size; an organ beside the liver (the spleen, a kidney) shares the
    liver's slices and is not kept."""
    out = np.zeros(labels.shape, dtype=bool)
    size = int(main.sum())
    candidates = [i for i in np.nonzero(sizes >= max(1, SPLIT_SHARE * size))[0] if i != int(sizes.argmax())]
    if not candidates or size == 0:
        return out
    main_zs = np.nonzero(main.any(axis=(1, 2)))[0]
    outline = main.any(axis=0)
    gap = SPLIT_GAP_MM / spacing_mm
    boxes = ndimage.find_objects(labels)
    for i in candidates:
        box = boxes[i - 1]
        part = labels[box] == i
        z0, z1 = box[0].start, box[0].stop - 1
        below = z1 < main_zs.min() and main_zs.min() - z1 <= gap
        above = z0 > main_zs.max() and z0 - main_zs.max() <= gap
        footprint = part.any(axis=0)
        if (below or above) and (footprint & outline[box[1:]]).sum() >= 0.5 * footprint.sum():
            out[box] |= part
    return out


def liver_body(mask: np.ndarray, neck_voxels: int, spacing_mm: float = 2.5) -> np.ndarray:
    """The largest component, less whatever hangs on to it by a thin neck, plus the parts of the liver a
    band of slices cut off from it (:func:`split_parts`).

    A leak into the heart or a bowel loop is often joined to the liver only through a few voxels, so
    the largest component keeps it. Eroding by ``neck_voxels`` cuts such necks; every voxel of the mask
    then goes to the nearest eroded part, and only the voxels nearest to the largest part are kept.
    Unlike an opening, thin parts of the liver itself (its edges, the tip of a lobe) stay, since the
    liver's own core is nearest to them.
    """
    labels, sizes = components(mask)
    if len(sizes) <= 1:  # an empty mask
        return mask.astype(bool)
    body = _without_necks(labels == int(sizes.argmax()), neck_voxels)
    return body | split_parts(labels, sizes, body, spacing_mm)


def _without_necks(mask: np.ndarray, neck_voxels: int) -> np.ndarray:
    if neck_voxels < 1 or not mask.any():
        return mask
    box = ndimage.find_objects(mask.view(np.uint8))[0]
    sub = mask[box]
    core = ndimage.binary_erosion(sub, ndimage.generate_binary_structure(3, 1), iterations=neck_voxels)
    parts, n = ndimage.label(core, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    nearest = parts[tuple(ndimage.distance_transform_edt(parts == 0, return_distances=False, return_indices=True))]
    out = np.zeros_like(mask)
    out[box] = largest_component(sub & (nearest == int(sizes.argmax())))
    return out


# An adult abdomen is 280-400 mm across (the scans here: 290-370 mm); less is a child's, or a thin adult's.
SMALL_BODY_MM = 240.0
SHORT_SCAN_MM = 120.0  # a liver is 130-200 mm tall: a scan shorter than this cannot hold a whole one


def body_extent(image: sitk.Image) -> tuple[float, float, float]:
    """(the body's width across, the scan's length along the body, the field of view's width across), in mm,
    of an image in the canonical (LPS-nearest) index order; the width is 0 when the body reaches both sides
    of the field of view (a crop: its size is unknown). The body is what is above -500 HU, sampled every
    fourth voxel; columns count as body where it is at least a sixth as deep as at its deepest, so the CT
    table, wider but thin, does not."""
    view = sitk.GetArrayViewFromImage(image)[::4, ::4, ::4]
    depth = (view > -500).mean(axis=(0, 1))
    columns = np.nonzero(depth > depth.max() / 6)[0] if depth.size and depth.max() > 0 else np.array([], int)
    step = 4 * image.GetSpacing()[0]
    crop = columns.size == 0 or (columns[0] == 0 and columns[-1] == depth.size - 1)
    width = 0.0 if crop else float((columns[-1] - columns[0] + 1) * step)
    return width, float(image.GetSize()[2] * image.GetSpacing()[2]), float(image.GetSize()[0] * image.GetSpacing()[0])


def size_warning(liver_ml: float, source: str, body: tuple[float, float, float] | None = None) -> str | None:
    """A warning when nothing, or less than a whole liver, was found, else None; it names what the scan
    shows that may explain it (``body``: :func:`body_extent`)."""
    if liver_ml == 0:
        return f"{source}: no liver found"
    if liver_ml >= SMALL_LIVER_ML:
        return None
    width, length, fov = body or (0.0, 0.0, 0.0)
    found = f"{source}: only {liver_ml:.0f} mL found, less than an adult's whole liver"
    if length and length < SHORT_SCAN_MM:
        return (f"{found}: the scan covers only {length:.0f} mm along the body, less than a liver's height; "
                "check that what was found is liver")
    if fov and not width:
        return (f"{found}: the field of view ({fov:.0f} mm across) cuts through the body: the liver may lie "
                "partly outside it; check the mask")
    if width and width < SMALL_BODY_MM:
        return (f"{found}: the body is small ({width:.0f} mm across: a child?); a small liver may be right, but "
                "the model was trained on adults: check the mask")
    return (f"{found}: the scan may show part of the liver or none of it (a scan of the chest or the pelvis?); "
            "check that it is liver")


def side_warning(volume: np.ndarray, liver: np.ndarray, x_spacing: float, source: str) -> str | None:
    """A warning when the liver lies on the patient's left, else None.

    ``volume`` (HU) and ``liver`` are ``[z, y, x]`` on an axis-aligned LPS grid, so +x is the patient's
    left. On whole-body-width scans the liver's centre lies 35-90 mm to the right of the body's; a liver
    on the left means a header that swaps left and right (the mask is then wrong without any other sign),
    or a situs inversus. Crops around the liver have no midline to judge by and are not judged.
    """
    body = volume > -500
    body_x = np.nonzero(body.any(axis=(0, 1)))[0]
    if body_x.size == 0 or (body_x[-1] - body_x[0]) * x_spacing < SIDE_CHECK_WIDTH_MM:
        return None
    body_centre = float(np.nonzero(body)[2].mean())
    offset = (float(np.nonzero(liver)[2].mean()) - body_centre) * x_spacing
    if offset <= WRONG_SIDE_MM:
        return None
    return (f"{source}: the liver found lies on the patient's left ({offset:.0f} mm left of the body's centre); "
            "check the image's orientation (left and right swapped?)")


def spine_column(volume: np.ndarray, liver: np.ndarray, spacing: Sequence[float]) -> np.ndarray | None:
    """The ``(y, x)`` voxel centre of the spine in an axial projection, or None when none is seen.

    ``volume`` (HU) and ``liver`` are ``[z, y, x]`` on an axis-aligned grid of ``spacing`` (x, y, z) mm. The spine is
    the bone that runs through most slices: of the axial places where bone (outside the liver) lies in at
    least 40 % of the slices (discs are not bone), the largest compact patch no wider than a vertebra with
    its processes. A CT table is wider, and is left out; so are small patches of a rib or a vessel.
    """
    sx, sy = float(spacing[0]), float(spacing[1])
    bone = (volume > BONE_HU) & ~ndimage.binary_dilation(liver, iterations=2)
    share = bone.mean(axis=0)
    patches, _ = ndimage.label(share >= 0.4)
    best, best_weight = None, 0.0
    for index, found in enumerate(ndimage.find_objects(patches), start=1):
        extent = np.array([(found[0].stop - found[0].start) * sy, (found[1].stop - found[1].start) * sx])
        inside = patches == index
        area = inside.sum() * sx * sy
        if extent[0] > 150 or extent[1] > 120 or not 100 <= area <= 4000:
            continue
        weight = float(share[inside].sum())
        if weight > best_weight:
            best, best_weight = inside, weight
    if best is None:
        return None
    return np.array(ndimage.center_of_mass(share * best))


def spine_warning(volume: np.ndarray, liver: np.ndarray, spacing: Sequence[float], source: str) -> str | None:
    """A warning when the liver found does not lie in front of the spine and to its right, else None.

    ``volume`` (HU) and ``liver`` are ``[z, y, x]`` on an axis-aligned LPS grid of ``spacing`` (x, y, z) mm, so +y is
    the patient's back and +x their left. Unlike :func:`side_warning` this needs no body around the liver:
    crops are judged too. A header turned 180 degrees in-plane (lits_117_crop as written) puts the spine in
    front of the liver; one that swaps left and right puts the liver on the spine's left.
    """
    if not liver.any():
        return None
    spine = spine_column(volume, liver, spacing)
    if spine is None:
        return None
    behind, left = (spine - np.argwhere(liver)[:, 1:].mean(axis=0)) * [spacing[1], spacing[0]]
    if behind < -SPINE_IN_FRONT_MM:
        return (f"{source}: the spine lies in front of the liver found ({-behind:.0f} mm); check the image's "
                "orientation (front and back swapped, or the image turned?)")
    if left < -SPINE_ON_RIGHT_MM:
        return (f"{source}: the liver found lies on the patient's left of the spine ({-left:.0f} mm); check the "
                "image's orientation (left and right swapped?)")
    return None
