"""LiverSeg from Python: one call, the engine the CLI runs.

    from LiverSegExtension import segment

    result = segment("ct.nii.gz", output="ct_liver.nii.gz")   # or a DICOM folder, a SimpleITK or nibabel image
    print(result.liver_ml, result.uncertainty, result.warnings)
    mask = result.mask_image                                   # SimpleITK uint8, exactly on the input's grid
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError


@dataclass
class LiverMask:
    """What :func:`segment` gives: the mask on the input's grid, and what the CLI's summary row says of it."""

    mask_image: sitk.Image
    liver_ml: float
    uncertainty: float
    warnings: list[str] = field(default_factory=list)
    probability_image: sitk.Image | None = None  # liver probability x 255 (uint8), with ``probabilities=True``
    runtime: str = ""

    @property
    def mask(self) -> np.ndarray:
        """The mask as a ``[k, j, i]`` uint8 array."""
        return sitk.GetArrayFromImage(self.mask_image)


@functools.lru_cache(maxsize=4)
def _segmenter(model: str | None, device: str, runtime: str):  # noqa: ANN202 - LiverSegmenter, imported lazily
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    return LiverSegmenter(model, device=device, runtime=runtime)


def _image(source: Any) -> tuple[sitk.Image, str, Path | None]:
    """(the CT as SimpleITK, a name for messages, the NIfTI file whose header a written mask copies)."""
    from LiverSegExtension import io

    if isinstance(source, sitk.Image):
        return source, "image", None
    if hasattr(source, "affine") and hasattr(source, "get_fdata"):  # a nibabel image: its array is [i, j, k]
        from LiverSegExtension.geometry import image_from_array

        array = np.asarray(source.dataobj)
        if array.ndim != 3:
            raise LiverSegError(f"a {array.ndim}D nibabel image: a CT volume is 3D")
        return image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)), np.asarray(source.affine)), "image", None
    cases = io.expand_inputs([Path(source)])
    if len(cases) != 1:
        raise LiverSegError(f"{source}: {len(cases)} CTs found; give one (the CLI segments folders of them)")
    (case,) = cases
    return io.read_case(case), case.label, None if case.files else case.source


def segment(source: str | Path | Any, output: str | Path | None = None, *, model: str | Path | None = None,
            device: str = "auto", runtime: str = "auto", probabilities: bool = False,
            overwrite: bool = False) -> LiverMask:
    """Segment the liver of one CT: a file, a DICOM series folder, a SimpleITK image or a nibabel image.

    ``output`` writes the mask (``.nii.gz``, ``.nrrd`` or ``.seg.nrrd``) as ``liverseg segment`` does, never over
    an existing file unless ``overwrite``. ``model``, ``device`` and ``runtime`` are the CLI's options; the
    model is loaded once and kept for later calls. Errors a user can fix are :class:`LiverSegError`."""
    from LiverSegExtension import io

    image, label, header = _image(source)
    segmenter = _segmenter(None if model is None else str(model), device, runtime)
    result = segmenter.segment_image(image, source=label, probabilities=probabilities)
    mask = io.mask_image(result.mask, image)
    probability = io.mask_image(result.probability, image) if result.probability is not None else None
    if output is not None:
        io.write_mask(mask, None, Path(output), overwrite=overwrite, header_source=header)  # the image made above
    return LiverMask(mask, result.liver_ml, result.uncertainty, list(result.warnings), probability, segmenter.runs_on)
