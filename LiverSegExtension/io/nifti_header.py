"""A NIfTI-1 header's two transforms (qform and sform): what each says, which one ITK used, and a mask written
on the same grid with both carried over.

A NIfTI file may hold two placements of its grid. ITK takes the sform when its code is 1 (scanner anatomy)
and the qform otherwise, without a word; when the two disagree, the user must hear which one placed the
mask, and the mask file must carry the input's own pair, or viewers that prefer the other one would show
image and mask apart.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

XFORM_NAMES = {0: "unknown", 1: "scanner anatomy", 2: "aligned anatomy", 3: "Talairach", 4: "MNI 152",
               5: "template"}
TRANSFORM_FIELDS = slice(252, 328)  # qform_code, sform_code, quatern_b..d, qoffset_x..z, srow_x..z


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_header(path: str | Path) -> tuple[bytes, str] | None:
    """The 348-byte NIfTI-1 header and its byte order, or None for anything else."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
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
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31, 9, zlib.Z_RLE) if str(target).lower().endswith(".gz") else None
    pieces = [header, *(flat[i : i + (1 << 24)] for i in range(0, flat.size, 1 << 24))]
    written = 0
    with open(target, "wb") as f:
        for piece in pieces:
            written += f.write(deflate.compress(piece) if deflate else piece)
        if deflate:
            written += f.write(deflate.flush())
    if os.stat(target).st_size != written:
        raise OSError(errno.EIO, "the file on disk is shorter than what was written", str(target))
