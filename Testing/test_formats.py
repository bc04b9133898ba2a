"""The format registry: which format a name is (the longest suffix, any case), the stems it gives, and what each
format says of a file SimpleITK wrote: where its voxels lie, its data files, and a NIfTI cut short."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_affine

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.io import complete_output, is_liverseg_output, output_stem, write_mask
from LiverSegExtension.io.formats import (
    DICOM_SEG,
    METAIMAGE,
    NIFTI,
    NRRD,
    OUTPUT_FORMATS,
    SEG_NRRD,
    VOLUME_SUFFIXES,
    check_file_length,
    format_of,
    raw_layout,
    split_suffix,
    volume_stem,
)


@pytest.mark.parametrize(("name", "expected"), [
    ("ct.nii.gz", NIFTI), ("CT.NII.GZ", NIFTI), ("ct.Nii", NIFTI), ("a/b/ct.nii", NIFTI),
    ("ct.nrrd", NRRD), ("ct.NHDR", NRRD), ("ct_liver.seg.nrrd", SEG_NRRD), ("CT_LIVER.Seg.NRRD", SEG_NRRD),
    ("ct.mha", METAIMAGE), ("ct.MHD", METAIMAGE), ("ct_liver.DCM", DICOM_SEG),
    ("ct.gz", None), ("ct.nii.gz.bak", None), ("notes.txt", None), ("seg.nrrd.txt", None), ("ct", None),
])
def test_the_longest_suffix_in_any_case_decides_the_format(name, expected):
    assert format_of(name) is expected


def test_stems_take_the_whole_suffix_off_as_written():
    assert volume_stem("a/b/CT.NII.GZ") == "CT"
    assert volume_stem("ct.nii") == "ct" and volume_stem("Ct.Nhdr") == "Ct"
    assert volume_stem("case_liver.seg.nrrd") == "case_liver"  # not "case_liver.seg"
    assert volume_stem("ct.v2.nrrd") == "ct.v2"
    assert volume_stem("ct_liver.dcm") == "ct_liver.dcm"  # a SEG holds masks, not a CT: no volume suffix
    assert volume_stem("archive.tar.gz") == "archive.tar.gz"
    assert split_suffix("a/ct_liver.NII.GZ") == ("a/ct_liver", ".NII.GZ")
    assert split_suffix("ct.txt") == ("ct.txt", "")
    assert NIFTI.stem("x.NII.gz") == "x" and NRRD.suffix_of("x.seg.nrrd") == ".nrrd"


def test_volume_and_output_suffixes_come_from_the_registry():
    assert set(VOLUME_SUFFIXES) >= {".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"}
    assert ".dcm" not in VOLUME_SUFFIXES
    assert OUTPUT_FORMATS == {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm"}
    assert output_stem("a/ct_liver.Seg.Nrrd") == "a/ct" and output_stem("ct_LIVER.dcm") == "ct"
    assert output_stem("ct_liver.nii") is None and output_stem("ct.nii.gz") is None  # .nii is never written
    assert is_liverseg_output(Path("x/ct_liver_prob.nrrd")) and not is_liverseg_output(Path("x/ct_liver.mha"))


def _nifti(tmp_path, name: str = "ct.nii.gz"):
    values = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    path = tmp_path / name
    sitk.WriteImage(image_from_array(values, make_affine((0.8, 0.9, 2.0), values.shape)), str(path), True)
    return path


def test_a_truncated_nii_gz_is_refused_by_its_length_check(tmp_path):
    whole = _nifti(tmp_path)
    check_file_length(whole)  # a whole file passes, its stream read through
    assert complete_output(whole)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[:-200])  # the end of the stream and the gzip trailer are gone
    with pytest.raises(LiverSegError, match="cut.nii.gz: (truncated|corrupt)"):
        check_file_length(cut)
    assert not complete_output(cut)
    short = tmp_path / "short.nii"  # uncompressed: the file's size against the header's claim
    short.write_bytes(gzip.decompress(whole.read_bytes())[:-10])
    with pytest.raises(LiverSegError, match="header promises 1024 bytes, file holds 1014"):
        check_file_length(short)
    check_file_length(tmp_path / "no-such.nrrd")  # NRRD: no claim of its own (ITK's reader says)


def _voxels(layout, nbytes: int) -> bytes:
    """The bytes at the layout's place, decoded independently of the chunked reader."""
    raw = layout.data.read_bytes()
    if layout.compression == "none":
        return raw[layout.offset : layout.offset + nbytes]
    if layout.compression == "gzip":
        return gzip.decompress(raw)[layout.offset : layout.offset + nbytes]
    if layout.compression == "gzip-at":
        return gzip.decompress(raw[layout.offset :])[:nbytes]
    return zlib.decompress(raw[layout.offset :])[:nbytes]


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz", "ct.nrrd", "ct_gz.nrrd", "ct.mha", "ct_z.mha", "ct.mhd"])
def test_the_raw_layout_of_what_simpleitk_wrote_is_its_array(tmp_path, name):
    values = np.random.default_rng(1).normal(0, 500, size=(5, 6, 7))
    image = image_from_array(values, make_affine((0.7, 0.8, 2.5), values.shape))
    path = tmp_path / name
    sitk.WriteImage(image, str(path), "_" in name or name.endswith(".gz"))
    layout = raw_layout(path)
    assert layout is not None and layout.dtype.itemsize == 8
    got = np.frombuffer(_voxels(layout, values.size * 8), layout.dtype) * layout.slope + layout.inter
    np.testing.assert_array_equal(got.reshape(values.shape), sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_detached_headers_name_their_data_files(tmp_path):
    image = image_from_array(np.zeros((3, 4, 5), np.float32), np.eye(4))
    sitk.WriteImage(image, str(tmp_path / "ct.mhd"))
    sitk.WriteImage(image, str(tmp_path / "ct.nhdr"))
    assert METAIMAGE.data_files(tmp_path / "ct.mhd") == ["ct.raw"]
    assert [name.lower() for name in NRRD.data_files(tmp_path / "ct.nhdr")] == ["ct.raw"]
    sitk.WriteImage(image, str(tmp_path / "one.mha"))
    assert METAIMAGE.data_files(tmp_path / "one.mha") == [] and NIFTI.data_files(tmp_path / "one.mha") == []


def test_a_mask_image_built_once_is_written_as_the_array_is(tmp_path):
    values = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3 == 0).astype(np.uint8)
    reference = image_from_array(values.astype(np.int16), make_affine((1.0, 1.2, 3.0), values.shape))
    built = sitk.GetImageFromArray(values)
    built.CopyInformation(reference)
    for name in ("a.nii.gz", "a.seg.nrrd"):
        write_mask(values, reference, tmp_path / f"array_{name}")
        write_mask(built, None, tmp_path / f"image_{name}")
        a, b = (sitk.ReadImage(str(tmp_path / f"{kind}_{name}")) for kind in ("array", "image"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetOrigin(), a.GetSpacing()) == (b.GetOrigin(), b.GetSpacing())
    assert sitk.ReadImage(str(tmp_path / "image_a.seg.nrrd")).GetMetaData("Segment0_Name") == "Liver"
    assert not built.GetMetaDataKeys()  # the segment's fields were set on the image for the write only
    with pytest.raises(ValueError):
        write_mask(values, None, tmp_path / "b.nii.gz")


def test_a_slicer_segmentation_beside_its_ct_is_not_taken_for_a_second_ct(tmp_path):
    """`CT.seg.nrrd` holds masks: a folder holding it beside `CT.nrrd` is one case, named `CT`."""
    from LiverSegExtension.io import expand_inputs, output_names

    image = image_from_array(np.zeros((6, 7, 8), np.int16), make_affine((1.0, 1.0, 2.0), (6, 7, 8)))
    sitk.WriteImage(image, str(tmp_path / "CT.nrrd"))
    write_mask(np.ones((6, 7, 8), np.uint8), image, tmp_path / "CT.seg.nrrd")
    cases = expand_inputs([tmp_path])
    assert [c.source.name for c in cases] == ["CT.nrrd"]
    assert output_names(cases) == ["CT"]


def test_a_mask_is_not_written_as_dicom_seg_by_the_volume_writer(tmp_path):
    """A DICOM SEG needs the series it references: `write_mask` says so instead of writing a plain DICOM image."""
    image = image_from_array(np.zeros((6, 7, 8), np.int16), make_affine((1.0, 1.0, 2.0), (6, 7, 8)))
    with pytest.raises(LiverSegError, match="DICOM SEG is written from a DICOM series"):
        write_mask(np.ones((6, 7, 8), np.uint8), image, tmp_path / "mask.dcm")
    assert not any(tmp_path.iterdir())
