"""DICOM SEG (.dcm) as an output: LiverSeg writes it (:mod:`LiverSegExtension.io.dicom_seg`) and reads it onto a
CT's grid, but never takes it for a CT."""

from __future__ import annotations

from pathlib import Path

from LiverSegExtension.io.formats.base import VolumeFormat


class DicomSeg(VolumeFormat):
    """A DICOM Segmentation object in one file: masks only, read by pydicom and highdicom rather than ITK."""

    name = "DICOM SEG"
    suffixes = (".dcm",)
    output = "dicom-seg"
    volume = False

    def check_mask_target(self, path: Path) -> None:
        """A SEG references the source's slices, which a mask and its grid do not name."""
        from LiverSegExtension.errors import LiverSegError

        raise LiverSegError(f"{path}: a DICOM SEG is written from a DICOM series (--format dicom-seg); "
                            "write .nii.gz, .nrrd or .seg.nrrd here")

    def check_written(self, path: Path, check_stream: bool = True) -> None:
        """A whole SEG reads as DICOM and has its instance UID (pixel data are not read)."""
        import pydicom

        if not getattr(pydicom.dcmread(path, stop_before_pixels=True), "SOPInstanceUID", ""):
            raise ValueError(f"{path}: no SOP Instance UID")


DICOM_SEG = DicomSeg()
