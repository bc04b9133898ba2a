"""Coarse-to-fine liver segmentation of one CT volume.

1. coarse: the whole scan resampled to a low-resolution, axis-aligned grid finds the liver;
2. fine: only a box around that liver is resampled to the fine grid and segmented;
3. the fine *probabilities*, cleaned (largest component, holes filled: :mod:`.postprocess`), are resampled
   onto the input grid only where they can be non-zero, thresholded, and pasted into an all-zero mask of
   the input's size.

Time and memory therefore follow the liver's size, not the scan's; no float copy of the whole input
is ever made. Resampling goes through ITK, which respects oblique and left-handed directions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
from LiverSegExtension.inference.postprocess import (
    SMALL_LIVER_ML,
    body_extent,
    components,
    liver_body,
    ndimage,
    prefetch_ndimage,
    side_warning,
    size_warning,
    spine_warning,
    split_parts,
)
from LiverSegExtension.model.catalog import ModelInfo, default_model_dir
from LiverSegExtension.model.runtimes import load_runtime, sliding_window

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]

MAX_ROI = 160  # largest window edge, in voxels, the networks see at once
GROW_ROUNDS = 2  # times the fine box may grow where the liver touches it (never up: see _grow)
SMALL_SCAN_MM = 300.0  # scans no larger than this on every axis skip the coarse stage
GROW_MM = 40.0
PASTE_SLAB = 16  # input slices resampled back at a time (see _paste), and at least PASTE_VOXELS voxels
PASTE_VOXELS = 1 << 21
NECK_MM = 5.0  # parts joined to the liver through a neck thinner than twice this are cut off


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
        prefetch_ndimage()  # while the runtime loads and the first CT is read
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
        from LiverSegExtension.io.memory import address_space_left

        try:
            return self._segment_image(image, progress, cancel, source, probabilities)
        except LiverSegError:
            raise
        except Exception as exc:  # numpy's and ITK's, torch's on a GPU, ONNX Runtime's (a type of its own)
            if not is_allocation_failure(exc):
                raise
            if self.device != "cpu":
                raise LiverSegError(f"{source}: the device ran out of memory; try the CPU") from None
            voxels = int(np.prod(image.GetSize(), dtype=np.int64))
            hint = "raise the virtual-memory limit (ulimit -v)" if address_space_left() is not None else "close other programs"
            raise LiverSegError(f"{source}: {not_enough_memory(voxels=voxels)}; {hint}") from None

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
        from LiverSegExtension.data.metrics import uncertainty_of, volume_ml  # scipy: imported by now (prefetch)

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
        whole = not np.any(lo) and tuple(hi) == image.GetSize()  # a small scan: used as it is, not cropped into a copy
        crop = image if whole else image[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])]
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
        interpolation back to the input grid keeps the sub-voxel boundary and needs no cleaning of its own.

        Done in the liver's box widened by two voxels: the grid outside it is background joined to the border
        (no hole), and one voxel of dilation stays inside it; everything outside is 0."""
        out = np.zeros_like(prob)
        found = ndimage.find_objects(np.asarray(liver, dtype=bool).view(np.uint8))
        if not found:
            return out
        box = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in found[0])
        sub, part = prob[box], liver[box]
        above = sub >= 0.5
        # MONAI's FillHoles: background not reachable from the border, with full (26-) connectivity.
        filled = ndimage.binary_fill_holes(part, structure=np.ones((3, 3, 3), bool))
        kept = sub.copy()
        kept[filled & ~above] = 1.0
        kept[~ndimage.binary_dilation(filled, iterations=1) | (above & ~filled)] = 0.0  # incl. a cut-off leak
        out[box] = kept
        return out

    def _paste(self, image: sitk.Image, grid: Grid, prob: np.ndarray, mask: np.ndarray,
               probability: np.ndarray | None = None) -> None:
        """Resample (cleaned) fine probabilities onto the input voxels they can reach and threshold there;
        into ``probability`` too, as 0-255 (255 x p rounded: at least 128 exactly where p >= 0.5).

        Linear interpolation gives exactly 0 more than one fine voxel away from the non-zero probabilities,
        so only the box around them is resampled, a slab of :data:`PASTE_SLAB` input slices at a time (more
        on small grids), each slab in the box of the probabilities it can reach (a liver fills half of its
        own box); the rest of the input grid stays the zeros it was made of."""
        lo, hi = self._reach(image, grid, prob, np.zeros(3, int), np.array(grid.size))
        if lo is None:
            return
        prob_image = sitk.GetImageFromArray(prob.astype(np.float32, copy=False))
        prob_image.SetOrigin(grid.origin)
        prob_image.SetSpacing(grid.spacing)
        step = max(PASTE_SLAB, PASTE_VOXELS // int((hi[0] - lo[0]) * (hi[1] - lo[1])))  # small CTs: one box
        for z0 in range(int(lo[2]), int(hi[2]), step):
            slab = np.array([[lo[0], lo[1], z0], [hi[0] - 1, hi[1] - 1, min(z0 + step, hi[2]) - 1]])
            corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in
                                np.array(np.meshgrid(*slab.T)).reshape(3, -1).T])
            # the fine voxels these input voxels interpolate from: floor(c) and floor(c) + 1 of each position c
            reach = (corners - np.asarray(grid.origin)) / np.asarray(grid.spacing)
            first = np.clip(np.floor(reach.min(axis=0)).astype(int), 0, np.array(grid.size))
            last = np.clip(np.floor(reach.max(axis=0)).astype(int) + 2, 0, np.array(grid.size))
            box_lo, box_hi = self._reach(image, grid, prob, first, last)
            if box_lo is None:
                continue
            box_lo, box_hi = np.maximum(box_lo, slab[0]), np.minimum(box_hi, slab[1] + 1)
            if np.all(box_hi > box_lo):
                self._paste_box(image, prob_image, box_lo, box_hi, mask, probability)

    @staticmethod
    def _reach(image: sitk.Image, grid: Grid, prob: np.ndarray, first: np.ndarray, last: np.ndarray):
        """The input index box [lo, hi) (x, y, z) that the non-zero probabilities in the fine index box
        [first, last) can reach by interpolation, or (None, None) when there are none."""
        part = prob[first[2] : last[2], first[1] : last[1], first[0] : last[0]]
        support = np.nonzero(part)
        if support[0].size == 0:
            return None, None
        low = first + np.array([int(a.min()) for a in support][::-1]) - 1  # x, y, z: one voxel of interpolation
        high = first + np.array([int(a.max()) for a in support][::-1]) + 1
        lo, hi = index_box(image, grid.index_to_physical(low), grid.index_to_physical(high), margin_vox=1)
        return (None, None) if np.any(hi <= lo) else (lo, hi)

    @staticmethod
    def _paste_box(image: sitk.Image, prob_image: sitk.Image, lo: np.ndarray, hi: np.ndarray, mask: np.ndarray,
                   probability: np.ndarray | None) -> None:
        ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
        ref.SetSpacing(image.GetSpacing())
        ref.SetDirection(image.GetDirection())
        ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
        sub_image = sitk.Resample(prob_image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        sub = sitk.GetArrayViewFromImage(sub_image)  # a view: sub_image must live as long as it
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
        block = sub >= 0.5  # the values lie in [0, 1]
        mask[box] = block
        if probability is not None:
            p = np.rint(np.clip(sub, 0.0, 1.0) * 255.0).astype(np.uint8)
            p[block & (p < 128)] = 128  # keep "p >= 128" equal to the mask where rounding ties
            p[~block & (p >= 128)] = 127
            probability[box] = p
