"""DICOM Segmentation objects (SEG) for PACS, written with highdicom.

The SEG belongs to the source series' study (patient and study attributes are copied by highdicom from the
source), references the source series and every source instance, and holds one binary segment "Liver"
(SNOMED CT 123037004 / 10200004, algorithm AUTOMATIC with the model's name and version, recommended
display colour 221,130,101) whose frames map onto the source slices one to one. No other personal data
is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from LiverSegExtension import __version__
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import LIVER_SEGMENT, atomic_write

#: the image storage class of a source whose SOPClassUID is empty, from its Modality (what it must be)
STORAGE_BY_MODALITY = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def write_dicom_seg(mask: np.ndarray, files: Sequence[str], path: Path, model_name: str, model_version: str,
                    overwrite: bool = False) -> list[str]:
    """Write ``mask`` (``[k, j, i]`` on the grid SimpleITK reads from ``files``, slice k from ``files[k]``);
    returns notes on what had to be supplied (a SOP class taken from the Modality)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if not np.any(mask):
        raise LiverSegError(f"{path}: no liver found: no DICOM SEG written (a SEG without segment frames is of "
                            "no use in PACS)")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    notes = _complete_references(sources, path)
    for ds in sources:  # type 2 attributes the SEG copies: present, if empty (nothing is invented)
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    if "FrameOfReferenceUID" not in sources[0]:
        raise LiverSegError(f"{path}: the source series has no FrameOfReferenceUID; a SEG cannot be placed on it")
    if len(sources) != mask.shape[0]:
        raise LiverSegError(f"{path}: {mask.shape[0]} mask slices for {len(sources)} source images")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if (rows, cols) != tuple(mask.shape[1:]):
        raise LiverSegError(f"{path}: the mask's slices ({mask.shape[2]}x{mask.shape[1]}) are not the source's ({cols}x{rows})")
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    r, g, b = LIVER_SEGMENT["color"]
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=LIVER_SEGMENT["name"],
        segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
        segmented_property_type=Code("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(r, g, b),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=(np.asarray(mask) > 0).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=9001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="LiverSeg",
            manufacturer_model_name=model_name,
            software_versions=f"LiverSeg {__version__}, model {model_name} {model_version}",
            device_serial_number="0",
            series_description="LiverSeg liver",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise LiverSegError(f"{path}: the DICOM SEG could not be made from this series ({exc})") from None
    atomic_write(path, lambda tmp: seg.save_as(tmp), overwrite)
    return notes


def _complete_references(sources: list, path: Path) -> list[str]:
    """What a SEG references of each source image must be there: the series and instance UIDs (they cannot
    be made up: PACS would find nothing), and the SOP class, which the Modality gives when it is empty."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if any(not str(getattr(ds, keyword, "") or "").strip() for ds in sources):
            raise LiverSegError(f"{path}: the source series has no {keyword}; a DICOM SEG could not reference it "
                                "(write nii.gz or seg.nrrd instead)")
    notes = []
    empty = [ds for ds in sources if not str(getattr(ds, "SOPClassUID", "") or "").strip()]
    if empty:
        modality = str(getattr(empty[0], "Modality", "") or "").upper()
        if modality not in STORAGE_BY_MODALITY:
            raise LiverSegError(f"{path}: the source images have no SOPClassUID, and their Modality "
                                f"({modality or 'none'}) does not give it; a DICOM SEG could not reference them")
        for ds in empty:
            ds.SOPClassUID = STORAGE_BY_MODALITY[modality]
        notes.append(f"{len(empty)} source image(s) have an empty SOPClassUID: the SEG references them as "
                     f"{modality} Image Storage, from their Modality")
    return notes

