"""Reading the voxels of a float or 32/64-bit volume file chunk by chunk into a compact array.

ITK reads such a file whole in its own type and then casts: a 512 x 512 x 1500 float64 CT needs 3.1 GB for
the file's buffer plus the copy. CT values are almost always whole HU, so the voxels are decoded here in
chunks straight into int16 (float32 where a value is not a whole number in int16's range) and the file's
type is never held whole. Only the voxel stream is read here; the grid (origin, spacing, direction) is
ITK's, from the same file's header, so both readers agree on geometry. Layouts this reader does not know
(detached NRRD data, byte skips, NIfTI-2, several data files) return None and ITK reads the file.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError

#: voxel types read here: ITK would hold the file's whole buffer in them before any cast
WIDE_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64}
CHUNK_BYTES = 1 << 26  # 64 MB of the file's type at a time

_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
_NRRD_TYPES = {
    "float": "f4", "double": "f8", "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4", "longlong": "i8", "long long": "i8",
    "long long int": "i8", "signed long long": "i8", "signed long long int": "i8", "int64": "i8", "int64_t": "i8",
    "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8", "uint64": "u8", "uint64_t": "u8",
    "short": "i2", "int16": "i2", "ushort": "u2", "unsigned short": "u2", "uint16": "u2",
}
_MET_TYPES = {"MET_FLOAT": "f4", "MET_DOUBLE": "f8", "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG_LONG": "i8",
              "MET_ULONG_LONG": "u8", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_LONG": "i4", "MET_ULONG": "u4"}


@dataclass
class RawLayout:
    """Where a file's voxels are: a byte offset into ``data``, plain or compressed, and their type."""

    data: Path
    offset: int
    compression: str  # "none", "gzip" (offset in the decompressed stream), "gzip-at" (stream starts there), "zlib"
    dtype: np.dtype
    slope: float = 1.0
    inter: float = 0.0


def layout_of(path: Path) -> RawLayout | None:
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_layout(path)
        if name.endswith(".nrrd"):
            return _nrrd_layout(path)
        if name.endswith((".mha", ".mhd")):
            return _meta_layout(path)
    except (OSError, EOFError, ValueError, struct.error, zlib.error):
        return None  # let ITK read it and give its own reason
    return None


def _nifti_layout(path: Path) -> RawLayout | None:
    gz = path.name.lower().endswith(".gz")
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        header = f.read(348)
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None  # NIfTI-2 or not NIfTI: ITK's
    code = struct.unpack(endian + "h", header[70:72])[0]
    if code not in _NIFTI_TYPES:
        return None
    vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
    slope, inter = struct.unpack(endian + "2f", header[112:120])
    if header[344:348] != b"n+1\0":
        return None  # a .hdr/.img pair: ITK's
    # ITK's rule: the data are scaled unless the slope is 0 or the pair is the identity (or not finite)
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0 or (slope == 1 and inter == 0):
        slope, inter = 1.0, 0.0
    return RawLayout(path, vox_offset, "gzip" if gz else "none", np.dtype(endian + _NIFTI_TYPES[code]), slope, inter)


def _nrrd_layout(path: Path) -> RawLayout | None:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.startswith(b"NRRD000"):
        return None
    end = head.find(b"\n\n")
    if end < 0:
        return None
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line.split(":", 1)[0] or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    if {"data file", "datafile", "byte skip", "byteskip", "line skip", "lineskip"} & fields.keys():
        return None
    kind = _NRRD_TYPES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "").lower()
    if kind is None or encoding not in ("raw", "gzip", "gz"):
        return None
    endian = ">" if fields.get("endian", "little").lower() == "big" else "<"
    return RawLayout(path, end + 2, "none" if encoding == "raw" else "gzip-at", np.dtype(endian + kind))


def _meta_layout(path: Path) -> RawLayout | None:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    fields: dict[str, str] = {}
    offset = 0
    for match in re.finditer(rb"([^\n]*)\n", head):
        key, _, value = match.group(1).decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            offset = match.end()
            break
    else:
        return None
    if "HeaderSize" in fields or fields.get("ElementNumberOfChannels", "1") != "1":
        return None
    kind = _MET_TYPES.get(fields.get("ElementType", ""))
    data_file = fields["ElementDataFile"]
    if kind is None or data_file.startswith(("LIST", "list")) or "%" in data_file:
        return None
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() == "true"
    compressed = fields.get("CompressedData", "False").lower() == "true"
    data, start = (path, offset) if data_file == "LOCAL" else (path.parent / data_file, 0)
    return RawLayout(data, start, "zlib" if compressed else "none", np.dtype((">" if msb else "<") + kind))


def data_files(path: Path) -> list[str]:
    """The detached data files a NRRD (``data file:``) or MetaImage (``ElementDataFile =``) header names, as
    written: one file, a ``LIST`` of them, or the directory part of a ``%d`` pattern. Empty when the voxels
    are in the header's own file."""
    name = path.name.lower()
    if not name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return []
    with open(path, "rb") as f:
        head = f.read(1 << 20).decode("latin-1")
    if name.endswith((".nrrd", ".nhdr")):
        header, _, rest = head.partition("\n\n")
        value = next((line.partition(":")[2].strip() for line in header.splitlines()[1:]
                      if line.partition(":")[0].strip().lower() in ("data file", "datafile")), "")
    else:
        lines = head.splitlines()
        found = [i for i, line in enumerate(lines) if line.partition("=")[0].strip() == "ElementDataFile"]
        if not found:
            return []
        value, rest = lines[found[0]].partition("=")[2].strip(), "\n".join(lines[found[0] + 1:])
        if value == "LOCAL":
            return []
    if not value:
        return []
    if value.split()[0].upper() == "LIST":
        return [line.strip() for line in rest.splitlines() if line.strip()]
    return [value.split()[0] if "%" in value else value]


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
