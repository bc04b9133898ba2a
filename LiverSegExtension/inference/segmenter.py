"""Coarse-to-fine liver segmentation of one CT volume.

1. coarse: the whole scan resampled to a low-resolution, axis-aligned grid finds the liver;
2. fine: only a box around that liver is resampled to the fine grid and segmented;
3. the fine *probabilities* are resampled onto the matching sub-block of the input grid, thresholded,
   cleaned (largest component, holes filled) and pasted into an all-zero mask of the input's size.

Time and memory therefore follow the liver's size, not the scan's; no float copy of the whole input
is ever made. Resampling goes through ITK, which respects oblique and left-handed directions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LiverSegExtension.data.metrics import uncertainty_of, volume_ml
from LiverSegExtension.errors import CancelledError, LiverSegError
from LiverSegExtension.geometry import (
    Grid,
    canonical,
    image_from_array,
    index_box,
    physical_corners,
    resample_to_grid,
    to_original_order,
)
from LiverSegExtension.model.catalog import ModelInfo, default_model_dir
from LiverSegExtension.model.runtimes import load_runtime, sliding_window

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]

MAX_ROI = 160  # largest window edge, in voxels, the networks see at once
GROW_ROUNDS = 2  # times the fine box may grow where the liver touches it (never up: see _grow)
SMALL_SCAN_MM = 300.0  # scans no larger than this on every axis skip the coarse stage
GROW_MM = 40.0
NECK_MM = 5.0  # parts joined to the liver through a neck thinner than twice this are cut off
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


@dataclass
class SegmentationResult:
    """A binary mask on the input grid (``[k, j, i]``, uint8) and what it took to make it."""

    mask: np.ndarray
    liver_ml: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: of the fine-grid voxels with a liver probability above 0.1, the share below 0.9 (metrics.uncertainty_of)
    uncertainty: float = 0.0
    probability: np.ndarray | None = None  # uint8 0-255 on the input grid, when asked for


def check_ct(image: sitk.Image, source: str = "input") -> None:
    """Refuse volumes that cannot be a 3D CT of an abdomen, with the reason."""
    if image.GetDimension() != 3:
        raise LiverSegError(f"{source}: expected a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise LiverSegError(f"{source}: expected a scalar volume, got {n} components per voxel")
    size = image.GetSize()
    if min(size) < 2 or sorted(size)[1] < 16:
        raise LiverSegError(f"{source}: a {'x'.join(map(str, size))} image is not a 3D volume (too few voxels on an axis)")
    spacing = image.GetSpacing()
    if min(spacing) < 0.05 or max(spacing) > 20:
        raise LiverSegError(f"{source}: absurd voxel spacing {tuple(round(s, 4) for s in spacing)} mm (expected 0.05 to 20 mm)")
    view = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(view.dtype, np.floating):  # every voxel: one NaN would empty the mask without a word
        bad = int(view.size - np.count_nonzero(np.isfinite(view)))
        if bad:
            raise LiverSegError(f"{source}: {bad} voxel(s) are NaN or infinite; LiverSeg needs finite HU everywhere")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise LiverSegError(f"{source}: the image's axes are not perpendicular (a sheared grid); LiverSeg needs "
                            "an orthogonal grid (resample it first)")
    sample = view[:: max(1, size[2] // 32), ::4, ::4]
    # Padding outside the scanner's field of view (-32768, -3024...) is not tissue: judge the rest.
    sample = sample[sample > -5000]
    if sample.size == 0:
        raise LiverSegError(f"{source}: every voxel is below -5000 HU: no CT image in it")
    low, high = float(sample.min()), float(sample.max())
    if low >= 0 or high < -400 or low < -5000 or high > 40000:
        raise LiverSegError(
            f"{source}: intensities {low:.0f}..{high:.0f} cannot be CT in Hounsfield units "
            "(expected air or fat below 0 HU and soft tissue above -400 HU)"
        )


class LiverSegmenter:
    """Runs a LiverSeg model on CT volumes; build once, call many times.

    ``model`` is a model folder (the bundled one when None) or a loaded ``LiverModel`` (training validates
    its networks in place). ``runtime``: ``auto`` runs ONNX Runtime on the CPU and PyTorch on a GPU (see
    :mod:`LiverSegExtension.model.runtimes`); ``onnxruntime`` or ``torch`` insists on one.
    """

    def __init__(self, model: ModelInfo | str | Path | None = None, device: str = "auto", runtime: str = "auto") -> None:
        if model is None:
            model = default_model_dir()
            if model is None:
                raise LiverSegError("no trained LiverSeg model is installed; pass a model folder with --model")
        self.runtime = load_runtime(model, device, runtime)
        self.model: ModelInfo = self.runtime.model  # the card, read once (by the runtime)
        self._low, self._high = (float(v) for v in self.model.window)

    @property
    def device(self) -> str:
        """Where the networks run: ``cpu``, ``cuda:0``, ``mps``."""
        return self.runtime.device

    @property
    def runs_on(self) -> str:
        """The runtime and device, for people: ``onnxruntime 1.20 on cpu``."""
        return f"{self.runtime.name} {self.runtime.version} on {self.runtime.device}"

    # -- public API -----------------------------------------------------------------------------
    def segment_array(
        self,
        array: np.ndarray,
        ijk_to_ras: np.ndarray,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
    ) -> SegmentationResult:
        """Segment a ``[k, j, i]`` CT array with its IJK-to-RAS matrix; the mask has the array's shape."""
        return self.segment_image(image_from_array(array, ijk_to_ras), progress=progress, cancel=cancel)

    def segment_image(
        self,
        image: sitk.Image,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        source: str = "input",
        probabilities: bool = False,
    ) -> SegmentationResult:
        """Segment a SimpleITK CT image; the mask is ``[k, j, i]`` on exactly the image's grid (and with
        ``probabilities``, the liver probability as uint8 0-255 on it too).

        Running out of memory (host or device) is the user's to fix: it becomes a LiverSegError saying so,
        for every door alike.
        """
        from LiverSegExtension.io import is_allocation_failure, not_enough_memory

        try:
            return self._segment_image(image, progress, cancel, source, probabilities)
        except (MemoryError, RuntimeError) as exc:  # numpy's and ITK's, torch's on a GPU, ONNX Runtime's
            if not is_allocation_failure(exc):
                raise
            if self.device != "cpu":
                raise LiverSegError(f"{source}: the device ran out of memory; try the CPU") from None
            voxels = int(np.prod(image.GetSize(), dtype=np.int64))
            raise LiverSegError(f"{source}: {not_enough_memory(voxels=voxels)}; close other programs") from None

    def _segment_image(self, image: sitk.Image, progress: ProgressCallback | None, cancel: CancelCallback | None,
                       source: str, probabilities: bool = False) -> SegmentationResult:
        start = time.perf_counter()
        timings: dict[str, float] = {}

        def step(fraction: float, stage: str) -> None:
            if cancel is not None and cancel():
                raise CancelledError()
            if progress is not None:
                progress(fraction, stage)

        def lap(name: str, t0: float) -> float:
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - t0
            return now

        check_ct(image, source)
        # The same voxels in another index order (Slicer flips K of left-handed volumes) must give the same
        # mask: work in one canonical order, permuting and flipping axes exactly, and map the mask back.
        original, image = image, canonical(image)
        step(0.0, "locating the liver")
        t = time.perf_counter()
        box, orientation = self._locate(image, source)  # the side of the coarse liver, if wrong
        t = lap("coarse", t)
        mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        probability = np.zeros_like(mask) if probabilities else None
        uncertainty = 0.0
        if box is not None:
            step(0.3, "segmenting the liver")
            fine_grid, volume, prob = self._segment_box(image, *box)
            liver = self._body(prob)
            for _ in range(GROW_ROUNDS):  # the coarse box may cut the liver: grow the faces it touches
                grown = self._grow(image, box, liver)
                if grown is None:
                    break
                step(0.5, "segmenting the liver (larger box)")
                box = grown
                fine_grid, volume, prob = self._segment_box(image, *box)
                liver = self._body(prob)
            # The spine, where seen, judges the orientation better than the side does: crops too, and front-back.
            orientation = spine_warning(volume, liver, fine_grid.spacing, source) or orientation
            uncertainty = uncertainty_of(prob)
            t = lap("fine", t)
            step(0.8, "mapping back to the input grid")
            self._paste(image, fine_grid, self.clean(prob, liver), mask, probability)
            lap("resample_back", t)
        mask = to_original_order(mask, image, original)
        if probability is not None:
            probability = to_original_order(probability, image, original)
        step(1.0, "done")
        liver_ml = volume_ml(mask, image.GetSpacing())
        # Both are said: a header that turns the anatomy often also makes the mask small (lits_117_crop as
        # written: 133 mL), and the orientation is then the reason to give first.
        small = size_warning(liver_ml, source, body_extent(image)) if liver_ml < SMALL_LIVER_ML else None
        warnings = [w for w in (orientation, small) if w]
        seconds = time.perf_counter() - start
        return SegmentationResult(mask, liver_ml, seconds, timings, warnings, uncertainty, probability)

    # -- stages --------------------------------------------------------------------------------
    def predict(self, stage: str, volume: np.ndarray) -> np.ndarray:
        """Liver probability for a ``[z, y, x]`` HU volume already on the stage's grid."""
        # The intensity window to [0, 1], as MONAI's ScaleIntensityRange(clip=True) does.
        x = np.asarray(volume, dtype=np.float32)[None, None]
        x = np.clip((x - np.float32(self._low)) / np.float32(self._high - self._low), 0.0, 1.0, dtype=np.float32)
        roi = [min(MAX_ROI, max(16, int(np.ceil(s / 16) * 16))) for s in x.shape[2:]]
        logits = sliding_window(x, roi, lambda window: self.runtime.logits(stage, window))
        # softmax over two classes: the liver's is the logistic of the logits' difference
        with np.errstate(over="ignore"):  # exp(large) is inf, and 1 / inf the right 0
            return (1.0 / (1.0 + np.exp(logits[0, 0] - logits[0, 1]))).astype(np.float32)

    def _locate(self, image: sitk.Image, source: str = "input") -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
        """(LPS box around the liver found at coarse resolution, or None when there is none; the
        :func:`side_warning` of that liver, or None).

        A small scan (a crop around the liver, say) is cheap at fine resolution and too small for the
        coarse grid to see much: it is all box, and has no midline to judge the side by.
        """
        corners = physical_corners(image)
        if np.all(corners.max(axis=0) - corners.min(axis=0) <= SMALL_SCAN_MM):
            return (corners.min(axis=0), corners.max(axis=0)), None
        grid = Grid.covering(corners.min(axis=0), corners.max(axis=0), self.model.stage("coarse")["spacing_mm"])
        volume = sitk.GetArrayFromImage(resample_to_grid(image, grid, pixel_type=sitk.sitkFloat32))
        prob = self.predict("coarse", volume)
        labels, sizes = components(prob > 0.5)
        if len(sizes) <= 1:
            return None, None
        liver = labels == int(sizes.argmax())
        liver |= split_parts(labels, sizes, liver, min(grid.spacing))
        side = side_warning(volume, liver, grid.spacing[0], source)
        zyx = np.argwhere(liver)
        lo = grid.index_to_physical(zyx.min(axis=0)[::-1])
        hi = grid.index_to_physical(zyx.max(axis=0)[::-1])
        margin = float(self.model.stage("fine").get("margin_mm", 20.0)) + max(grid.spacing)
        return (lo - margin, hi + margin), side

    @staticmethod
    def _grow(image: sitk.Image, box: tuple[np.ndarray, np.ndarray], liver: np.ndarray):
        """A larger box when the liver found (largest component, fine grid) touches a face of the box
        that is not the scan's edge, nor its top."""
        if not liver.any():
            return None
        corners = physical_corners(image)
        scan_lo, scan_hi = corners.min(axis=0), corners.max(axis=0)
        lower, upper = box[0].copy(), box[1].copy()
        grew = False
        for axis in range(3):  # x, y, z; the array is [z, y, x]
            a = 2 - axis
            first = np.take(liver, [0, 1], axis=a).any()
            last = np.take(liver, [-2, -1], axis=a).any()
            if first and lower[axis] > scan_lo[axis]:
                lower[axis] -= GROW_MM
                grew = True
            # Never up (LPS z+): the coarse stage finds the dome, and what touches the top of the box is a
            # leak into the heart, which a taller box only lets grow (CORT: 100 -> 270 mL).
            if last and upper[axis] < scan_hi[axis] and axis != 2:
                upper[axis] += GROW_MM
                grew = True
        return (lower, upper) if grew else None

    def _segment_box(self, image: sitk.Image, lower: np.ndarray, upper: np.ndarray) -> tuple[Grid, np.ndarray, np.ndarray]:
        """(the fine grid over the box, the image (HU) on it, the liver probability on it)"""
        grid = Grid.covering(lower, upper, self.model.stage("fine")["spacing_mm"])
        lo, hi = index_box(image, lower, upper)
        crop = image[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])]
        volume = sitk.GetArrayFromImage(resample_to_grid(crop, grid, pixel_type=sitk.sitkFloat32))
        return grid, volume, self.predict("fine", volume)

    def _body(self, prob: np.ndarray) -> np.ndarray:
        """The liver on the fine grid: :func:`liver_body` of the thresholded probabilities."""
        spacing = min(self.model.stage("fine")["spacing_mm"])
        return liver_body(prob >= 0.5, int(round(NECK_MM / spacing)), spacing)

    @staticmethod
    def clean(prob: np.ndarray, liver: np.ndarray) -> np.ndarray:
        """The liver (:meth:`_body` of ``prob``) with its holes filled, folded into the fine probabilities
        (holes raised to 1, everything away from the kept liver lowered to 0), so that the cheap
        interpolation back to the input grid keeps the sub-voxel boundary and needs no cleaning of its own."""
        above = prob >= 0.5
        # MONAI's FillHoles: background not reachable from the border, with full (26-) connectivity.
        filled = ndimage.binary_fill_holes(liver, structure=np.ones((3, 3, 3), bool))
        out = prob.copy()
        out[filled & ~above] = 1.0
        out[~ndimage.binary_dilation(filled, iterations=1) | (above & ~filled)] = 0.0  # incl. a cut-off leak
        return out

    def _paste(self, image: sitk.Image, grid: Grid, prob: np.ndarray, mask: np.ndarray,
               probability: np.ndarray | None = None) -> None:
        """Resample (cleaned) fine probabilities onto the input sub-block they cover and threshold there;
        into ``probability`` too, as 0-255 (255 x p rounded: at least 128 exactly where p >= 0.5)."""
        prob_image = sitk.GetImageFromArray(prob.astype(np.float32, copy=False))
        prob_image.SetOrigin(grid.origin)
        prob_image.SetSpacing(grid.spacing)
        upper = grid.index_to_physical(np.array(grid.size) - 1)
        lo, hi = index_box(image, np.asarray(grid.origin), upper, margin_vox=1)
        if np.any(hi <= lo):
            return
        ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
        ref.SetSpacing(image.GetSpacing())
        ref.SetDirection(image.GetDirection())
        ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
        sub = sitk.Resample(prob_image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        # A copy, not a view: the thresholded image is a temporary that may be freed at once.
        block = sitk.GetArrayFromImage(sitk.BinaryThreshold(sub, 0.5, 2.0, 1, 0))
        mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = block
        if probability is not None:
            p = np.rint(np.clip(sitk.GetArrayViewFromImage(sub), 0.0, 1.0) * 255.0).astype(np.uint8)
            p[(block > 0) & (p < 128)] = 128  # keep "p >= 128" equal to the mask where rounding ties
            p[(block == 0) & (p >= 128)] = 127
            probability[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = p
