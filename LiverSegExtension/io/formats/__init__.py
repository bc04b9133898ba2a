"""The file formats LiverSeg reads and writes, one module each, and the one place where a name's suffix decides
its format: the longest registered suffix wins (``.seg.nrrd`` before ``.nrrd``, ``.nii.gz`` before ``.nii``),
in any case. Everything else asks :func:`format_of` instead of matching suffixes itself."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from LiverSegExtension.io.formats.base import RawLayout, VolumeFormat
from LiverSegExtension.io.formats.dicom_seg import DICOM_SEG
from LiverSegExtension.io.formats.metaimage import METAIMAGE
from LiverSegExtension.io.formats.nifti import NIFTI
from LiverSegExtension.io.formats.nrrd import NRRD, SEG_NRRD

#: every format, in the order ``--format`` lists the ones LiverSeg writes
FORMATS: tuple[VolumeFormat, ...] = (NIFTI, NRRD, SEG_NRRD, METAIMAGE, DICOM_SEG)

_BY_SUFFIX = sorted(((s, f) for f in FORMATS for s in f.suffixes), key=lambda pair: -len(pair[0]))

#: the suffixes of files a CT may be given in
VOLUME_SUFFIXES = tuple(s for f in FORMATS if f.volume for s in f.suffixes)

#: ``--format`` key: the suffix of a mask written in it
OUTPUT_FORMATS = {f.output: f.suffixes[0] for f in FORMATS if f.output}


def format_of(path: str | Path) -> VolumeFormat | None:
    """The format a file name says (its longest registered suffix, in any case); None for another name."""
    name = Path(path).name.lower()
    return next((f for s, f in _BY_SUFFIX if name.endswith(s)), None)


def split_suffix(name: str | Path) -> tuple[str, str]:
    """``(stem, suffix)`` of a name or relative path by its format's suffix, both as written (``a/CT``,
    ``.NII.GZ``); ``(name, "")`` for a name of no registered format."""
    text = str(name)
    found = format_of(text)
    suffix = found.suffix_of(text) if found is not None else ""
    return text[: len(text) - len(suffix)], suffix


def is_volume_name(path: str | Path) -> bool:
    """Whether the name is that of a volume file a CT may be given in (not a DICOM SEG)."""
    found = format_of(path)
    return found is not None and found.volume


def volume_stem(path: str | Path) -> str:
    """A file's name without its image format (``ct`` for ``ct.nii.gz`` or ``CT.NRRD``'s ``CT``, ``a_liver`` for
    ``a_liver.seg.nrrd``): the one place where those suffixes are taken off. ``.dcm`` stays: a DICOM file's name
    is a slice's or a SEG's, never a case's."""
    name = Path(path).name
    found = format_of(name)
    return split_suffix(name)[0] if found is not None and found is not DICOM_SEG else name


def raw_layout(path: Path) -> RawLayout | None:
    """Where the file's voxels lie, for the chunked reader; None when its format or layout is one ITK reads."""
    found = format_of(path)
    if found is None:
        return None
    try:
        return found.raw_layout(path)
    except (OSError, EOFError, ValueError, struct.error, zlib.error):
        return None  # let ITK read it and give its own reason


def check_file_length(path: Path, check_stream: bool = True) -> None:
    """Refuse a file whose header promises more data than it holds, where its format tells (NIfTI); ITK would
    fill the rest with zeros. ``check_stream`` also reads a compressed stream through (see the format's)."""
    found = format_of(path)
    if found is not None:
        found.check_length(Path(path), check_stream)


__all__ = [
    "FORMATS", "VOLUME_SUFFIXES", "OUTPUT_FORMATS", "VolumeFormat", "RawLayout", "NIFTI", "NRRD", "SEG_NRRD",
    "METAIMAGE", "DICOM_SEG", "format_of", "split_suffix", "is_volume_name", "volume_stem", "raw_layout",
    "check_file_length",
]
