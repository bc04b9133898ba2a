"""What every volume or mask file format answers: its name and suffixes, where its voxels lie, the data files its
header names, and the checks of its length that ITK does not make. A format overrides only what it has."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass
class RawLayout:
    """Where a file's voxels are: a byte offset into ``data``, plain or compressed, and their type."""

    data: Path
    offset: int
    compression: str  # "none", "gzip" (offset in the decompressed stream), "gzip-at" (stream starts there), "zlib"
    dtype: np.dtype
    slope: float = 1.0
    inter: float = 0.0


class VolumeFormat:
    """One file format. The base answers for a format LiverSeg knows nothing more of: ITK reads and writes it."""

    #: the format's name
    name = "volume"
    #: lower-case suffixes, the one written first
    suffixes: tuple[str, ...] = ()
    #: the ``--format`` key of a mask written in this format (None: LiverSeg does not write it)
    output: str | None = None
    #: a CT may be given in it (a DICOM SEG holds masks only)
    volume = True

    def matches(self, path: str | Path) -> bool:
        """Whether the name ends in one of the format's suffixes, in any case."""
        return str(path).lower().endswith(self.suffixes)

    def suffix_of(self, path: str | Path) -> str:
        """The name's suffix of this format as written (``.NII.GZ``), longest first; "" when none matches."""
        text = str(path)
        found = [s for s in self.suffixes if text.lower().endswith(s)]
        return text[-max(map(len, found)):] if found else ""

    def stem(self, name: str | Path) -> str:
        """The name without the format's suffix (``ct`` for ``ct.nii.gz``, ``CT`` for ``CT.NRRD``)."""
        text = str(name)
        return text[: len(text) - len(self.suffix_of(text))]

    def raw_layout(self, path: Path) -> RawLayout | None:
        """Where the voxels lie, for a layout the chunked reader knows; None: ITK reads the file whole."""
        return None

    def data_files(self, path: Path) -> list[str]:
        """The detached data files the header names, as written; empty when the voxels are in the file itself."""
        return []

    def claim(self, path: Path) -> Any:
        """What the header promises, checked against the file before ITK allocates a voxel (a LiverSegError when
        the file cannot hold it); None where the format promises nothing ITK does not check."""
        return None

    def check_read(self, path: Path, claim: Any, image: sitk.Image) -> None:
        """Check the voxels ITK read against ``claim`` (:meth:`claim`'s): ITK fills a short file without a word."""

    def check_length(self, path: Path, check_stream: bool = True) -> None:
        """Refuse a file whose header promises more data than the file holds; ``check_stream`` also reads a
        compressed stream through for its real length and checksum."""
        self.claim(path)

    def check_written(self, path: Path, check_stream: bool = True) -> None:
        """Raise unless ``path`` is a whole file of this format: its length is the header's, and the header reads."""
        self.check_length(path, check_stream)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()

    def mask_header(self, source: str | Path, shape_kji: tuple[int, ...]) -> bytes | None:
        """The header of a uint8 mask file on ``source``'s grid carrying ``source``'s own placement, where this
        format writes masks itself; None: ITK writes the mask (:meth:`write_image`)."""
        return None

    def write_with_header(self, mask: np.ndarray, header: bytes, target: str | Path) -> None:
        """Write a ``[k, j, i]`` uint8 mask after :meth:`mask_header`'s header."""
        raise NotImplementedError(f"{self.name} masks are written by ITK")

    def check_mask_target(self, path: Path) -> None:
        """Raise ``LiverSegError`` when ``write_mask`` cannot write a mask of this format to ``path``."""

    def write_image(self, image: sitk.Image, target: str, segment: dict | None = None) -> None:
        """Write a mask image (compressed); ``segment`` describes it where the format holds segments."""
        sitk.WriteImage(image, target, useCompression=True)


def listed_files(value: str, rest: str) -> list[str]:
    """The data files a header's data-file field names (``value``, as written): one file, a ``LIST`` of them on the
    lines that follow (``rest``), or the directory part of a ``%d`` pattern. Empty when it names none."""
    if not value:
        return []
    if value.split()[0].upper() == "LIST":
        return [line.strip() for line in rest.splitlines() if line.strip()]
    return [value.split()[0] if "%" in value else value]
