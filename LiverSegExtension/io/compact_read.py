"""Reading the voxels of a float or 32/64-bit volume file chunk by chunk into a compact array.

ITK reads such a file whole in its own type and then casts: a 512 x 512 x 1500 float64 CT needs 3.1 GB for
the file's buffer plus the copy. CT values are almost always whole HU, so the voxels are decoded here in
chunks straight into int16 (float32 where a value is not a whole number in int16's range) and the file's
type is never held whole. Only the voxel stream is read here; the grid (origin, spacing, direction) is
ITK's, from the same file's header, so both readers agree on geometry. Each format says where its voxels lie
(:func:`LiverSegExtension.io.formats.raw_layout`); layouts it does not know (detached NRRD data, byte skips,
NIfTI-2, several data files) are None and ITK reads the file.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.formats.base import RawLayout

#: voxel types read here: ITK would hold the file's whole buffer in them before any cast
WIDE_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64}
CHUNK_BYTES = 1 << 26  # 64 MB of the file's type at a time


def _chunks(layout: RawLayout, nbytes: int, source: Path) -> Iterator[bytes]:
    """The voxel stream in pieces of CHUNK_BYTES (a whole number of voxels), checked to be complete."""
    step = CHUNK_BYTES - CHUNK_BYTES % layout.dtype.itemsize
    left = nbytes
    with open(layout.data, "rb") as raw:
        if layout.compression == "zlib":
            raw.seek(layout.offset)
            inflate, tail = zlib.decompressobj(), b""
            while left > 0:
                if not tail:
                    tail = raw.read(1 << 20)
                    if not tail:
                        break
                data = inflate.decompress(tail, min(step, left))  # bounded: a stream of zeros inflates 1000-fold
                tail = inflate.unconsumed_tail
                if data:
                    yield data
                    left -= len(data)
                elif inflate.eof:
                    break
        else:
            if layout.compression == "gzip-at":
                raw.seek(layout.offset)
            stream = gzip.GzipFile(fileobj=raw) if layout.compression.startswith("gzip") else raw
            if layout.compression == "none":
                raw.seek(layout.offset)
            elif layout.compression == "gzip":
                stream.read(layout.offset)
            while left > 0:
                piece = stream.read(min(step, left))
                if not piece:
                    break
                yield piece
                left -= len(piece)
            if left == 0 and layout.compression.startswith("gzip"):
                while stream.read(1 << 20):  # to the end: gzip checks the CRC there (ITK never does)
                    pass
    if left > 0:
        raise LiverSegError(f"{source}: truncated file (the voxel data end {left} bytes early)")


def read_compact(path: Path, reader: sitk.ImageFileReader, layout: RawLayout) -> sitk.Image:
    """The file's voxels as int16 where every value is a whole number within int16's range, else float32,
    on ITK's grid for the file (``reader`` has read its header)."""
    size = [int(v) for v in reader.GetSize()]
    count = int(np.prod(size, dtype=np.int64))
    out = np.empty(count, np.int16)
    position = 0
    pending = b""
    try:
        for piece in _chunks(layout, count * layout.dtype.itemsize, path):
            if pending:  # a compressed stream can split a voxel between pieces
                piece, pending = pending + piece, b""
            cut = len(piece) - len(piece) % layout.dtype.itemsize
            piece, pending = piece[:cut], piece[cut:]
            values = np.frombuffer(piece, layout.dtype)
            if layout.slope != 1.0 or layout.inter != 0.0:
                values = values * np.float64(layout.slope) + np.float64(layout.inter)
            n = values.size
            if out.dtype == np.int16 and not fits_int16(values):
                wider = np.empty(count, np.float32)  # this file is not whole HU: keep its fractions
                wider[:position] = out[:position]
                out = wider
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf: refused as such
                out[position : position + n] = values
            position += n
    except (OSError, EOFError, zlib.error) as exc:
        raise LiverSegError(f"{path}: corrupt compressed data ({exc})") from None
    if position != count:
        raise LiverSegError(f"{path}: truncated file (the voxel data end early)")
    image = sitk.GetImageFromArray(out.reshape(size[::-1]))
    del out
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def fits_int16(values: np.ndarray) -> bool:
    """Whether every value is a whole number in int16's range; judged in blocks, so that no temporary is
    as large as the volume."""
    flat = values.reshape(-1)
    if flat.dtype.kind in "iu":
        return bool(flat.size == 0 or (flat.min() >= -32768 and flat.max() <= 32767))
    if flat.dtype.kind != "f":
        return False
    step = 1 << 22
    with np.errstate(invalid="ignore"):
        for start in range(0, flat.size, step):
            block = flat[start : start + step]
            if not np.all((block >= -32768) & (block <= 32767) & (np.floor(block) == block)):
                return False
    return True
