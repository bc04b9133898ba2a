"""Reading a CT: volume files (NIfTI, NRRD, MHA/MHD, compressed or not) and DICOM series, with the checks that
refuse bad input in one line naming the file and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import InputCase, check_name_encoding, dicom_series, search_folder
from LiverSegExtension.io.compact_read import WIDE_TYPES, fits_int16, read_compact
from LiverSegExtension.io.dicom import _frames, _slice_headers, _slice_positions, check_slice_positions, check_slice_sizes
from LiverSegExtension.io.formats import VolumeFormat, format_of, raw_layout
from LiverSegExtension.io.memory import check_fits_memory, is_allocation_failure, not_enough_memory

#: bytes a voxel of each type takes as read
_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
          sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8}


def read_case(case: InputCase) -> sitk.Image:
    for name in case.files or (case.source,):
        check_name_encoding(name)
    if case.files:
        return _read_dicom(case)
    return read_image(case.source)


def _read_dicom(case: InputCase) -> sitk.Image:
    first = sitk.ImageFileReader()
    first.SetFileName(case.files[0])
    try:
        first.ReadImageInformation()
    except RuntimeError:
        pass  # the series reader says why
    else:
        check_fits_memory(case.label, (*first.GetSize()[:2], len(case.files)), _BYTES.get(first.GetPixelID(), 2))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(case.files))
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check below
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        check_slice_sizes(case, _slice_headers(case.files)[0])  # the usual cause, named with its file
        raise LiverSegError(f"{case.label}: unreadable DICOM series ({_first_line(exc)})") from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        frames = _frames(case.files[0])
        if frames > 1:
            raise LiverSegError(f"{case.label}: an enhanced (multi-frame) DICOM image, {frames} frames in one file: "
                                "LiverSeg reads classic series of one slice per file; convert it first (dcm2niix, "
                                "or load it in Slicer's DICOM module)")
        raise LiverSegError(f"{case.label}: a single-slice DICOM series is not a 3D volume")
    positions = _slice_positions(case, reader)
    del reader  # it holds the image too: a view of it would copy it first (ITK's copy on write)
    if positions is not None:
        check_slice_positions(case, positions, np.array(image.GetDirection()).reshape(3, 3)[:, 2])
    return _to_compact_type(image)


def input_grid(case: InputCase) -> sitk.Image:
    """An empty uint8 image on the grid the engine reads for ``case``: from the header alone for a
    volume file (the voxels are not read again), from the series for DICOM (ITK computes its grid)."""
    if case.files:
        image = read_case(case)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.source))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise LiverSegError(f"{case.label}: {_first_line(exc)}") from None
        check_directions(case.source, reader.GetDirection())
        image = sitk.Image([int(v) for v in reader.GetSize()], sitk.sitkUInt8)
        image.SetOrigin(reader.GetOrigin())
        image.SetSpacing(reader.GetSpacing())
        image.SetDirection(reader.GetDirection())
        return image
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return grid


def read_image(path: str | Path) -> sitk.Image:
    """Read a volume file or a DICOM folder (its only series), with a one-line error for bad input."""
    path = Path(path)
    check_name_encoding(path)
    if not path.exists():
        raise LiverSegError(f"{path}: no such file or folder")
    if path.is_dir():
        series = dicom_series(path)
        if not series:
            volumes = search_folder(path)[1]
            if volumes:
                raise LiverSegError(f"{path}: folder holds {len(volumes)} volume file(s) and no DICOM series; "
                                    "give the files, or the folder to segment each")
            raise LiverSegError(f"{path}: folder holds no volume file or DICOM image series")
        if len(series) > 1:
            raise LiverSegError(f"{path}: folder holds {len(series)} DICOM series; pick one")
        return read_case(series[0])
    if path.stat().st_size == 0:
        raise LiverSegError(f"{path}: file is empty")
    check_data_files_beside(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    checks = format_of(path) or VolumeFormat()  # what ITK does not check of the file, by its format
    try:
        reader.ReadImageInformation()
        if reader.GetDimension() == 4 or reader.GetNumberOfComponents() > 1:
            raise LiverSegError(f"{path}: 4D or multi-component image; LiverSeg needs one 3D CT volume")
        if reader.GetDimension() != 3:
            raise LiverSegError(f"{path}: {reader.GetDimension()}D image; LiverSeg needs a 3D CT volume")
        check_directions(path, reader.GetDirection())
        check_fits_memory(path, reader.GetSize(), _BYTES.get(reader.GetPixelID(), 2))  # before any voxel is read
        layout = raw_layout(path) if reader.GetPixelID() in WIDE_TYPES else None
        claim = checks.claim(path)  # the header's length against the file, before ITK allocates
        if layout is not None:  # float64 and the like: never held whole in the file's type
            return read_compact(path, reader, layout)  # it checks the stream as it reads it
        image = reader.Execute()
        checks.check_read(path, claim, image)  # what ITK read is the whole stream (one pass, no second read)
    except MemoryError:
        raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
    except RuntimeError as exc:
        if is_allocation_failure(exc):
            raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
        checks.check_length(path)  # a damaged stream also defeats ITK's header read: say that, if so
        reason = _first_line(exc)
        if "Unable to determine ImageIO" in reason or "Could not create IO" in reason:
            reason = "not an image file LiverSeg can read (NIfTI, NRRD, MHA/MHD or a DICOM folder)"
        elif "fread got only" in reason or "% of expected" in reason:  # NRRD's reader: the data stops short
            reason = f"truncated file: its voxel data stops short of what the header says ({reason})"
        raise LiverSegError(f"{path}: {reason}") from None
    return _to_compact_type(image)


def check_data_files_beside(path: Path) -> None:
    """A header (NRRD, MetaImage) may read its voxels from any file on the machine; LiverSeg reads only data
    files in the header's own folder (or below it), so that a file handed over never leads elsewhere (and
    ``dataset add`` never copies another file's bytes into a dataset)."""
    home = os.path.realpath(path.parent)
    found = format_of(path)
    for name in found.data_files(path) if found is not None else ():
        target = os.path.realpath(os.path.join(path.parent, os.path.expanduser(name)))
        if os.path.commonpath([home, target]) != home:
            raise LiverSegError(f"{path}: its header reads the voxels from {name}, outside the header's folder; "
                                "LiverSeg reads data files only beside their header (move the data next to it)")


def check_directions(path: Path, direction: tuple[float, ...]) -> None:
    """ITK refuses a degenerate direction matrix only when it reads the voxels, and names it by its last
    row ("0 0 1"): say which axes coincide before any voxel is read."""
    axes = np.array(direction, dtype=float).reshape(3, 3).T  # one row per image axis (i, j, k)
    lengths = np.linalg.norm(axes, axis=1)
    if not np.all(np.isfinite(axes)) or lengths.min() < 1e-6:
        raise LiverSegError(f"{path}: the header gives an image axis no direction; not a 3D grid")
    unit = axes / lengths[:, None]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(float(unit[a] @ unit[b])) > 1 - 1e-6:
            raise LiverSegError(f"{path}: the header's directions for axes {'ijk'[a]} and {'ijk'[b]} are the same "
                                "line (collinear space directions); not a 3D grid")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with file/line noise; the last line usually holds the reason.
    msg = lines[-1] if lines else type(exc).__name__
    return msg.split(": ", 1)[-1] if msg.startswith(("itk::", "/")) else msg


def _to_compact_type(image: sitk.Image) -> sitk.Image:
    """Whole-numbered CTs in int16's range become int16 (half the memory, the same HU), other floats
    float32: the same rule as the chunked reader's, so a volume's type never changes what it gives."""
    if image.GetPixelID() in (sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkInt8) or image.GetNumberOfComponentsPerPixel() > 1:
        return image
    view = sitk.GetArrayViewFromImage(image)
    if view.size and fits_int16(view):
        return sitk.Cast(image, sitk.sitkInt16)
    if np.issubdtype(view.dtype, np.floating) and view.dtype != np.float32:
        return sitk.Cast(image, sitk.sitkFloat32)
    return image
