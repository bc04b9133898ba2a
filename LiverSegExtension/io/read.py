"""Reading a CT: volume files (NIfTI, NRRD, MHA/MHD, compressed or not) and DICOM series, with the checks that
refuse bad input in one line naming the file and the reason."""

from __future__ import annotations

import gzip
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import InputCase, check_name_encoding, dicom_series, search_folder
from LiverSegExtension.io.compact_read import WIDE_TYPES, data_files, fits_int16, layout_of, read_compact
from LiverSegExtension.io.dicom import _frames, _slice_headers, _slice_positions, check_slice_positions, check_slice_sizes


def quiet_native_logs(debug: bool) -> None:
    """ITK's and VTK's own warnings (\"No Series were found\" for every folder without DICOM, MRML's
    display-node notes) go to the terminal only with --debug; LiverSeg says what matters in one line."""
    sitk.ProcessObject.SetGlobalWarningDisplay(debug)
    vtk = sys.modules.get("vtkmodules.vtkCommonCore")  # only where VTK is in use (the batch): importing it costs 0.7 s
    if vtk is not None:
        vtk.vtkObject.SetGlobalWarningDisplay(int(debug))


def read_case(case: InputCase) -> sitk.Image:
    for name in case.files or (case.source,):
        check_name_encoding(name)
    if case.files:
        return _read_dicom(case)
    return read_image(case.source)


def _read_dicom(case: InputCase) -> sitk.Image:
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
    try:
        reader.ReadImageInformation()
        if reader.GetDimension() == 4 or reader.GetNumberOfComponents() > 1:
            raise LiverSegError(f"{path}: 4D or multi-component image; LiverSeg needs one 3D CT volume")
        if reader.GetDimension() != 3:
            raise LiverSegError(f"{path}: {reader.GetDimension()}D image; LiverSeg needs a 3D CT volume")
        check_directions(path, reader.GetDirection())
        layout = layout_of(path) if reader.GetPixelID() in WIDE_TYPES else None
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(path, check_stream=layout is None)  # the chunked reader checks the stream itself
        if layout is not None:  # float64 and the like: never held whole in the file's type
            return read_compact(path, reader, layout)
        image = reader.Execute()
    except MemoryError:
        raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
    except RuntimeError as exc:
        if is_allocation_failure(exc):
            raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(path)  # a damaged stream also defeats ITK's header read: say that, if so
        reason = _first_line(exc)
        if "Unable to determine ImageIO" in reason or "Could not create IO" in reason:
            reason = "not an image file LiverSeg can read (NIfTI, NRRD, MHA/MHD or a DICOM folder)"
        raise LiverSegError(f"{path}: {reason}") from None
    return _to_compact_type(image)


def check_data_files_beside(path: Path) -> None:
    """A header (NRRD, MetaImage) may read its voxels from any file on the machine; LiverSeg reads only data
    files in the header's own folder (or below it), so that a file handed over never leads elsewhere (and
    ``dataset add`` never copies another file's bytes into a dataset)."""
    home = os.path.realpath(path.parent)
    for name in data_files(path):
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


def memory_bytes() -> int:
    """This machine's physical memory (0 where it cannot be told)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


#: deflate cannot compress more than about 1032:1; a header that claims more is lying about its size
MAX_GZIP_RATIO = 1032


def check_nifti_length(path: Path, check_stream: bool = True) -> None:
    """ITK fills a truncated NIfTI with zeros without a word, and allocates whatever the header claims
    before it reads a byte: check the claim first, against this machine's memory and (for .nii.gz) against
    what the compressed stream can hold, then the data's real length.

    For .nii.gz the gzip trailer holds the uncompressed length (mod 2**32); with ``check_stream`` the
    stream is also decompressed once, without keeping it, for its real length and its CRC (ITK checks
    neither).
    """
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(352)
    except (OSError, EOFError) as exc:
        raise LiverSegError(f"{path}: truncated or corrupt file ({exc})") from None
    if len(header) < 348:
        raise LiverSegError(f"{path}: truncated file (incomplete NIfTI header)")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return  # not NIfTI-1; let ITK decide
    dims = struct.unpack(endian + "8h", header[40:56])
    pixdim = struct.unpack(endian + "8f", header[76:108])[1 : 1 + max(0, min(dims[0], 3))]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        # ITK would take 1 mm for a zero or NaN spacing, and a negative one as a flip, without a word.
        raise LiverSegError(f"{path}: the header's voxel spacing (pixdim {', '.join(f'{v:g}' for v in pixdim)}) "
                            "is not a positive size in mm")
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    offset = int(struct.unpack(endian + "f", header[108:112])[0])
    shape = [max(1, d) for d in dims[1 : 1 + max(0, min(dims[0], 7))]]
    expected = offset + int(np.prod(shape, dtype=np.int64)) * max(bitpix, 8) // 8
    size = path.stat().st_size
    claimed = f"{expected / 1e9:.1f} GB of voxels ({'x'.join(map(str, shape))})"
    memory = memory_bytes()
    if memory and expected > memory // 2:
        raise LiverSegError(f"{path}: the header claims {claimed}, more than half of this machine's memory "
                            f"({memory / 1e9:.0f} GB): not enough memory to read it (needed about "
                            f"{3 * expected / 1e9:.0f} GB)")
    if gz and expected > MAX_GZIP_RATIO * size:
        raise LiverSegError(f"{path}: the header claims {claimed} from {size / 1e6:.2f} MB of compressed data, more "
                            "than gzip can hold: a damaged or forged file")
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            actual = struct.unpack("<I", f.read(4))[0]
        ok = actual == expected % (1 << 32)
        if ok and check_stream:  # the real length (the trailer's is mod 2**32) and the CRC, ITK checks neither
            actual = 0
            try:
                with gzip.open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        actual += len(block)
                        if actual > expected:
                            break
            except (OSError, EOFError, zlib.error) as exc:
                raise LiverSegError(f"{path}: corrupt compressed data ({exc})") from None
            ok = actual == expected
    else:
        actual = size
        ok = actual >= expected
    if not ok:
        held = f"the compressed stream holds {actual}" if gz else f"file holds {actual}"
        raise LiverSegError(f"{path}: truncated or damaged file (header promises {expected} bytes, {held})")


def is_allocation_failure(exc: BaseException) -> bool:
    """ITK's, NIfTI's and ONNX Runtime's words for an allocation that failed."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        words in text for words in ("bad_alloc", "failed to allocate", "out of memory", "nifti_image_load failed",
                                    "memory allocation", "cannot allocate memory"))


def not_enough_memory(reader: sitk.ImageFileReader | None = None, voxels: int = 0) -> str:
    """"not enough memory (needed about N GB)", N from the image's size: LiverSeg's peak is about three times
    the CT's int16 voxels plus the runtime (benchmarks/peak_memory.py)."""
    try:
        if reader is not None:
            voxels = int(np.prod(reader.GetSize(), dtype=np.int64))
    except RuntimeError:
        voxels = 0
    if not voxels:
        return "not enough memory"
    return f"not enough memory (needed about {max(1.0, (6 * voxels + 0.4e9) / 1e9):.0f} GB)"


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
