"""Masks written on their input's grid: NIfTI, NRRD, or a Slicer .seg.nrrd with its segment's terminology."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import LIVER_SEGMENT
from LiverSegExtension.io.files import atomic_write
from LiverSegExtension.io.formats import VolumeFormat, format_of
from LiverSegExtension.io.read import _first_line


def mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 mask image with exactly the geometry of ``reference``."""
    out = sitk.GetImageFromArray(mask.astype(np.uint8, copy=False))
    out.CopyInformation(reference)
    return out


def write_mask(mask: np.ndarray | sitk.Image, reference: sitk.Image | None, path: Path, overwrite: bool = False,
               header_source: Path | None = None) -> None:
    """Write a binary liver mask as .nii.gz, .nrrd or a Slicer .seg.nrrd, atomically; a file that was not
    written whole (a full disk, a file size limit: ITK does not always say) never takes its final name.
    ``mask`` is a ``[k, j, i]`` array on ``reference``'s grid, or the image :func:`mask_image` made of it
    already (``reference`` is then not needed: it is not built twice). A NIfTI mask of a NIfTI
    ``header_source`` is written here, compressed once, with that file's own qform and sform in its header
    (:func:`~LiverSegExtension.io.formats.nifti.mask_header`)."""
    path = Path(path)
    target = format_of(path) or VolumeFormat()
    target.check_mask_target(path)
    built = mask if isinstance(mask, sitk.Image) else None
    if built is None and reference is None:
        raise ValueError("write_mask needs the reference image for a mask given as an array")
    shape = tuple(built.GetSize())[::-1] if built is not None else mask.shape
    header = target.mask_header(header_source, shape) if header_source is not None else None

    def write(tmp: str) -> None:
        if header is not None:
            array = sitk.GetArrayViewFromImage(built) if built is not None else mask
            try:
                target.write_with_header(array, header, tmp)
            except OSError as exc:
                raise LiverSegError(f"{path}: could not be written ({exc.strerror or exc})") from None
            return  # the writer checked the length it wrote; the header is the one made above
        image = built if built is not None else mask_image(mask, reference)
        try:
            target.write_image(image, tmp, LIVER_SEGMENT)
        except RuntimeError as exc:
            raise LiverSegError(f"{path}: could not be written ({_first_line(exc)})") from None
        if not _written_whole(target, Path(tmp)):
            raise LiverSegError(f"{path}: could not be written whole (is the disk full, or a file size limit set?)")

    atomic_write(path, write, overwrite)


def _written_whole(target: VolumeFormat, path: Path) -> bool:
    """Whether a file ITK wrote is whole (its writer does not always report a short write): its header reads,
    and a NIfTI's length is the header's (for .nii.gz, the gzip trailer's: nothing is decompressed again)."""
    try:
        target.check_written(path, check_stream=False)
    except Exception:  # noqa: BLE001 - whatever a format's reader raises, the file is not whole
        return False
    return True
