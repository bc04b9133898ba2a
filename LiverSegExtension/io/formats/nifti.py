"""NIfTI-1 (.nii, .nii.gz): everything LiverSeg reads from or writes into a NIfTI header itself.

ITK reads the file, but three things are checked here. Its claim: ITK fills a truncated NIfTI with zeros
without a word and allocates whatever the header claims before it reads a byte, so the header's length is
held against the file (and a .nii.gz's gzip trailer and CRC). Its two transforms: a NIfTI file may hold two
placements of its grid (qform and sform); ITK takes the sform when its code is 1 (scanner anatomy) and the
qform otherwise, without a word, so when the two disagree the user must hear which one placed the mask, and a
mask file carries the input's own pair, or viewers that prefer the other one would show image and mask apart.
And where its voxels lie, for the chunked reader of wide voxel types.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.formats.base import RawLayout, VolumeFormat
from LiverSegExtension.io.memory import check_fits_memory

XFORM_NAMES = {0: "unknown", 1: "scanner anatomy", 2: "aligned anatomy", 3: "Talairach", 4: "MNI 152",
               5: "template"}
TRANSFORM_FIELDS = slice(252, 328)  # qform_code, sform_code, quatern_b..d, qoffset_x..z, srow_x..z
_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def _gz(path: str | Path) -> bool:
    return str(path).lower().endswith(".gz")


def _open(path: Path):
    return gzip.open(path, "rb") if _gz(path) else open(path, "rb")


def read_header(path: str | Path) -> tuple[bytes, str] | None:
    """The 348-byte NIfTI-1 header and its byte order, or None for anything else."""
    path = Path(path)
    if not NIFTI.matches(path):
        return None
    try:
        with _open(path) as f:
            header = f.read(348)
    except (OSError, EOFError):
        return None
    for endian in ("<", ">"):
        if len(header) == 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            return header, endian
    return None


def transforms(header: bytes, endian: str) -> dict:
    """``qform`` and ``sform`` (IJK to RAS, 4x4, None where the code is 0) with their codes."""
    qcode, scode = struct.unpack(endian + "2h", header[252:256])
    b, c, d, qx, qy, qz = struct.unpack(endian + "6f", header[256:280])
    pixdim = struct.unpack(endian + "8f", header[76:108])
    qform = None
    if qcode > 0:
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                             [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                             [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        qform = np.eye(4)
        qform[:3, :3] = rotation @ np.diag([pixdim[1], pixdim[2], pixdim[3] * qfac])
        qform[:3, 3] = [qx, qy, qz]
    sform = None
    if scode > 0:
        sform = np.eye(4)
        sform[:3] = np.array(struct.unpack(endian + "12f", header[280:328])).reshape(3, 4)
    return {"qform_code": qcode, "sform_code": scode, "qform": qform, "sform": sform,
            "dims": struct.unpack(endian + "8h", header[40:56])}


def _far_apart(a: np.ndarray, b: np.ndarray, dims) -> float:
    """The largest distance (mm) between where two transforms put the grid's corners."""
    n = [max(1, int(v)) - 1 for v in dims[1:4]]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    return float(np.max(np.linalg.norm((corners @ a.T - corners @ b.T)[:, :3], axis=1)))


def disagreement(path: str | Path, ijk_to_ras: np.ndarray | None = None, tolerance_mm: float = 0.1) -> str | None:
    """A note when the header's qform and sform place the grid more than ``tolerance_mm`` apart, naming the
    one that was used (``ijk_to_ras``: the grid as read), else None."""
    found = read_header(path)
    if found is None:
        return None
    info = transforms(*found)
    if info["qform"] is None or info["sform"] is None:
        return None
    apart = _far_apart(info["qform"], info["sform"], info["dims"])
    if apart <= tolerance_mm:
        return None
    used = "sform" if info["sform_code"] == 1 else "qform"  # what ITK reads
    if ijk_to_ras is not None:
        used = min(("qform", "sform"), key=lambda n: _far_apart(info[n], ijk_to_ras, info["dims"]))
    code = info[f"{used}_code"]
    return (f"{path}: the header's qform and sform disagree (up to {apart:.1f} mm apart); the {used} (code {code}, "
            f"{XFORM_NAMES.get(code, 'other')}) placed the image and the mask, and the mask file keeps both, "
            "as the input has them: check the alignment in your viewer")


def mask_header(source: str | Path, shape_kji: tuple[int, ...]) -> bytes | None:
    """The 352-byte header (little-endian, no extension) of a uint8 NIfTI-1 mask on ``source``'s grid, carrying
    exactly ``source``'s qform and sform, voxel sizes, qfac and spatial unit; the other fields as ITK writes
    them. None unless ``source`` is a NIfTI-1 file whose grid has the mask's shape (``[k, j, i]``)."""
    found = read_header(source)
    if found is None:
        return None
    src, endian = found
    if tuple(struct.unpack(endian + "8h", src[40:56])[1:4]) != tuple(int(v) for v in shape_kji[::-1]):
        return None
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    header[38:39] = b"r"
    struct.pack_into("<8h", header, 40, 3, *shape_kji[::-1], 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 2, 8)  # datatype uint8, 8 bits
    struct.pack_into("<4f", header, 76, *struct.unpack(endian + "4f", src[76:92]))  # qfac and voxel sizes
    struct.pack_into("<3f", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    unit = src[123] & 0x07  # ITK reads metres and microns as such: keep the unit the sizes are in
    header[123] = (unit if unit in (1, 3) else 2) | 8  # else mm (what ITK takes an unknown unit for); seconds
    struct.pack_into("<2h6f12f", header, 252, *struct.unpack(endian + "2h6f12f", src[TRANSFORM_FIELDS]))
    header[344:348] = b"n+1\0"
    return bytes(header)


def write_mask_nifti(mask: np.ndarray, header: bytes, target: str | Path) -> None:
    """Write a uint8 ``[k, j, i]`` mask after ``header`` (:func:`mask_header`) as one NIfTI file, compressed
    once as it is written when ``target`` ends in .gz. Run-length deflate: masks and probability maps are
    long runs, which it packs as small as ITK's writer in a fraction of zlib's default time. Raises OSError
    when the file cannot be written whole (a full disk, a file size limit)."""
    flat = np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1)
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31, 9, zlib.Z_RLE) if _gz(target) else None
    pieces = [header, *(flat[i : i + (1 << 24)] for i in range(0, flat.size, 1 << 24))]
    written = 0
    with open(target, "wb") as f:
        for piece in pieces:
            written += f.write(deflate.compress(piece) if deflate else piece)
        if deflate:
            written += f.write(deflate.flush())
    if os.stat(target).st_size != written:
        raise OSError(errno.EIO, "the file on disk is shorter than what was written", str(target))


#: deflate cannot compress more than about 1032:1; a header that claims more is lying about its size
MAX_GZIP_RATIO = 1032


@dataclass
class NiftiClaim:
    """What a NIfTI-1 header promises: the stream's length up to the end of the voxels, where they start,
    and for .nii.gz the gzip trailer's CRC-32 and length (mod 2**32)."""

    expected: int
    offset: int
    gz: bool
    crc: int = 0
    swapped: bool = False  # the voxels are stored in the other byte order than this machine's (ITK swaps them)


def nifti_claim(path: Path, judge_memory: bool = True) -> NiftiClaim | None:
    """The header's checks, without reading the voxels: ITK fills a truncated NIfTI with zeros without a
    word, and allocates whatever the header claims before it reads a byte. The claim is checked against
    this machine's memory, against what the compressed stream can hold, and against the gzip trailer's
    length (or the file's size). None for a file that is not NIfTI-1 (ITK decides). ``judge_memory``: also
    refuse a claim this machine could not segment (not for a mask already written)."""
    gz = _gz(path)
    try:
        with _open(path) as f:
            header = f.read(352)
    except (OSError, EOFError, zlib.error) as exc:
        raise LiverSegError(f"{path}: truncated or corrupt file ({exc})") from None
    if len(header) < 348:
        raise LiverSegError(f"{path}: truncated file (incomplete NIfTI header)")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None  # not NIfTI-1; let ITK decide
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
    if judge_memory:
        check_fits_memory(path, shape, max(bitpix, 8) // 8)
    if gz and expected > MAX_GZIP_RATIO * size:
        raise LiverSegError(f"{path}: the header claims {claimed} from {size / 1e6:.2f} MB of compressed data, more "
                            "than gzip can hold: a damaged or forged file")
    if not gz:
        if size < expected:
            raise LiverSegError(f"{path}: truncated or damaged file (header promises {expected} bytes, file holds "
                                f"{size})")
        return NiftiClaim(expected, offset, False)
    with open(path, "rb") as f:
        f.seek(max(0, size - 8))
        crc, length = struct.unpack("<II", f.read(8).rjust(8, b"\0"))
    if length != expected % (1 << 32):
        raise LiverSegError(f"{path}: truncated or damaged file (header promises {expected} bytes, the compressed "
                            f"stream holds {length})")
    return NiftiClaim(expected, offset, True, crc, bitpix > 8 and (endian == ">") == (sys.byteorder == "little"))


def check_nifti_length(path: Path, check_stream: bool = True, judge_memory: bool = True) -> None:
    """Refuse a NIfTI file whose header's claim the data cannot honour (:func:`nifti_claim`). With
    ``check_stream`` a .nii.gz is also decompressed once, without keeping it, for its real length (the
    trailer's is mod 2**32) and its CRC, which ITK checks neither of. A read of the voxels checks the
    same on what ITK read instead (:func:`read_whole_stream`), without decompressing twice."""
    claim = nifti_claim(path, judge_memory)
    if claim is None or not claim.gz or not check_stream:
        return
    actual = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 24):
                actual += len(block)
                if actual > claim.expected:
                    break
    except (OSError, EOFError, zlib.error) as exc:
        raise LiverSegError(f"{path}: corrupt compressed data ({exc})") from None
    if actual != claim.expected:
        raise LiverSegError(f"{path}: truncated or damaged file (header promises {claim.expected} bytes, the "
                            f"compressed stream holds {actual})")


def read_whole_stream(path: Path, claim: NiftiClaim, image: sitk.Image) -> bool:
    """Whether ITK's voxels, after the header's bytes, are the whole decompressed stream: their CRC-32
    equals the gzip trailer's (ITK checks neither the CRC nor the length). A stream cut short, damaged, or
    longer than the header says by a multiple of 4 GiB (the trailer's length wraps) fails; so does a file
    ITK converted while reading (other types than the file's), which the caller then checks by
    decompressing it."""
    view = sitk.GetArrayViewFromImage(image)
    if view.nbytes != claim.expected - claim.offset or not view.flags.c_contiguous:
        return False
    try:
        with gzip.open(path, "rb") as f:
            crc = zlib.crc32(f.read(claim.offset))
    except (OSError, EOFError, zlib.error):
        return False
    flat = view.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.size, step):
        block = flat[start : start + step]
        crc = zlib.crc32(block.byteswap() if claim.swapped else block, crc)
    return crc == claim.crc


def nifti_layout(path: Path) -> RawLayout | None:
    """Where a single-file NIfTI-1's voxels lie in its (decompressed) stream, with ITK's scaling."""
    gz = _gz(path)
    with _open(path) as f:
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


class Nifti(VolumeFormat):
    """NIfTI-1, compressed or not: masks written here with the input's own header."""

    name = "NIfTI"
    suffixes = (".nii.gz", ".nii")
    output = "nii.gz"

    def raw_layout(self, path: Path) -> RawLayout | None:
        return nifti_layout(path)

    def claim(self, path: Path) -> NiftiClaim | None:
        return nifti_claim(path, judge_memory=False)  # read_image judged memory on ITK's header just before

    def check_read(self, path: Path, claim: NiftiClaim | None, image: sitk.Image) -> None:
        if claim is not None and claim.gz and not read_whole_stream(path, claim, image):
            check_nifti_length(path)  # says how the stream is damaged (one more pass, on this path only)

    def check_length(self, path: Path, check_stream: bool = True) -> None:
        check_nifti_length(path, check_stream)

    def check_written(self, path: Path, check_stream: bool = True) -> None:
        check_nifti_length(path, check_stream, judge_memory=False)  # a file written, not one to be read whole
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()

    def mask_header(self, source: str | Path, shape_kji: tuple[int, ...]) -> bytes | None:
        return mask_header(source, shape_kji)

    def write_with_header(self, mask: np.ndarray, header: bytes, target: str | Path) -> None:
        write_mask_nifti(mask, header, target)


NIFTI = Nifti()
