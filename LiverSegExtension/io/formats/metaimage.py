"""MetaImage (.mha, and .mhd with its voxels in another file): where the voxels lie and the data files a header
names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from LiverSegExtension.io.formats.base import RawLayout, VolumeFormat, listed_files

_MET_TYPES = {"MET_FLOAT": "f4", "MET_DOUBLE": "f8", "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG_LONG": "i8",
              "MET_ULONG_LONG": "u8", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_LONG": "i4", "MET_ULONG": "u4"}


def meta_layout(path: Path) -> RawLayout | None:
    """Where a MetaImage's voxels lie: after its header (``LOCAL``) or in the one file it names, raw or zlib."""
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


def meta_data_files(path: Path) -> list[str]:
    """The files a MetaImage header's ``ElementDataFile =`` names (:func:`~.base.listed_files`); none for LOCAL."""
    with open(path, "rb") as f:
        head = f.read(1 << 20).decode("latin-1")
    lines = head.splitlines()
    found = [i for i, line in enumerate(lines) if line.partition("=")[0].strip() == "ElementDataFile"]
    if not found:
        return []
    value, rest = lines[found[0]].partition("=")[2].strip(), "\n".join(lines[found[0] + 1:])
    if value == "LOCAL":
        return []
    return listed_files(value, rest)


class MetaImage(VolumeFormat):
    """MetaImage: voxels after the header (.mha) or in files the header names (.mhd)."""

    name = "MetaImage"
    suffixes = (".mha", ".mhd")

    def raw_layout(self, path: Path) -> RawLayout | None:
        return meta_layout(path)

    def data_files(self, path: Path) -> list[str]:
        return meta_data_files(path)


METAIMAGE = MetaImage()
