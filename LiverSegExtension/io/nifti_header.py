"""A NIfTI-1 header's two transforms (qform and sform): what each says, which one ITK used, and carrying both
over to a mask written on the same grid.

A NIfTI file may hold two placements of its grid. ITK takes the sform when its code is 1 (scanner anatomy)
and the qform otherwise, without a word; when the two disagree, the user must hear which one placed the
mask, and the mask file must carry the input's own pair, or viewers that prefer the other one would show
image and mask apart.
"""

from __future__ import annotations

import gzip
import struct
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


def copy_transforms(source: str | Path, target: str | Path) -> bool:
    """Give the NIfTI file ``target`` (written on ``source``'s grid) exactly ``source``'s qform and sform, and
    its qfac; False (nothing changed) unless both are NIfTI-1 of the same dimensions and byte order."""
    found, written = read_header(source), read_header(target)
    if found is None or written is None or found[1] != written[1]:
        return False
    (src, endian), (dst, _) = found, written
    if struct.unpack(endian + "8h", src[40:56])[:4] != struct.unpack(endian + "8h", dst[40:56])[:4]:
        return False
    target = Path(target)
    with _open(target) as f:
        data = bytearray(f.read())
    data[TRANSFORM_FIELDS] = src[TRANSFORM_FIELDS]
    data[76:92] = src[76:92]  # pixdim[0:4]: the qform's handedness (qfac) and voxel sizes
    if target.name.lower().endswith(".gz"):
        with gzip.open(target, "wb") as f:
            f.write(data)
    else:
        target.write_bytes(data)
    return True
