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
from typing import TYPE_CHECKING

import numpy as np

from LiverSegExtension import __version__
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import LIVER_SEGMENT, atomic_write

if TYPE_CHECKING:
    import SimpleITK as sitk

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



def read_dicom_seg(path: Path, image: sitk.Image) -> sitk.Image:
    """The liver segment of a DICOM SEG (the one named Liver, or its only segment) as a uint8 label on
    ``image``'s grid: each frame placed by its own position, so frames may come in any order and cover only
    the slices with liver. A frame that does not lie on the grid's voxels is an error."""
    import highdicom as hd
    import SimpleITK as sitk

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - pydicom's and highdicom's many errors: not a readable SEG
        raise LiverSegError(f"{path}: not a readable DICOM SEG ({exc})") from None
    if str(getattr(seg, "SegmentationType", "")) != "BINARY":
        raise LiverSegError(f"{path}: a {str(seg.SegmentationType).lower()} SEG holds probabilities, not a label")
    numbers = list(seg.segment_numbers)
    liver = [n for n in numbers if str(seg.get_segment_description(n).segment_label).strip().lower() == "liver"]
    if len(liver) != 1 and len(numbers) != 1:
        raise LiverSegError(f"{path}: {len(numbers)} segments and none (or several) named Liver: which is the liver?")
    number = (liver or numbers)[0]
    shared = (getattr(seg, "SharedFunctionalGroupsSequence", None) or [None])[0]

    def item(groups, keyword: str):  # noqa: ANN001, ANN202 - a functional group, per frame or shared by all frames
        found = getattr(groups, keyword, None) or getattr(shared, keyword, None)
        if not found:
            raise LiverSegError(f"{path}: a frame has no {keyword}; it cannot be placed on the CT")
        return found[0]

    frames = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    direction = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    to_index = np.linalg.inv(direction)
    out = np.zeros(image.GetSize()[::-1], np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        if int(item(group, "SegmentIdentificationSequence").ReferencedSegmentNumber) != number or not frame.any():
            continue
        orientation = np.asarray(item(group, "PlaneOrientationSequence").ImageOrientationPatient, float)
        row_dir, col_dir = orientation.reshape(2, 3)
        dr, dc = (float(v) for v in item(group, "PixelMeasuresSequence").PixelSpacing)  # between rows, columns
        r, c = np.nonzero(frame)
        position = np.asarray(item(group, "PlanePositionSequence").ImagePositionPatient, float)
        points = position + np.outer(c * dc, row_dir) + np.outer(r * dr, col_dir)  # LPS, as ITK's
        index = (points - np.asarray(image.GetOrigin())) @ to_index.T
        whole = np.round(index)
        if not np.allclose(index, whole, atol=0.05) or (whole < 0).any() or (whole >= image.GetSize()).any():
            raise LiverSegError(f"{path}: its frames do not lie on the CT's voxels (another series, or another grid)")
        i, j, k = whole.astype(int).T
        out[k, j, i] = 1
    label = sitk.GetImageFromArray(out)
    label.CopyInformation(image)
    return label
