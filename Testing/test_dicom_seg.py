"""Outputs for the clinic and for annotators: DICOM SEG read back by highdicom and, independently, by
dcmqi's segimage2itkimage; the probability map and the per-case uncertainty."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, SHARED, requires_bundled_model, requires_shared
from synthetic import make_affine, phantom, rotation, write_dicom_series

from LiverSegExtension.data.evaluation import on_grid_of
from LiverSegExtension.data.metrics import dice
from LiverSegExtension.geometry import image_from_array, same_grid


def segment(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", *map(str, args), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def series(tmp_path: Path, kind: str) -> Path:
    if kind == "chaos_ct3":
        if not (SHARED / "dicom" / "chaos_ct3").is_dir():
            pytest.skip(f"real data not found at {SHARED}")
        return SHARED / "dicom" / "chaos_ct3"
    from pydicom.uid import RLELossless

    shape = (40, 96, 104)
    m = make_affine((2.0, 2.6, 4.0), shape, rotation(0.2, -0.15, 0.3), left_handed=True)
    ct, _ = phantom(shape, m)
    write_dicom_series(tmp_path / kind, ct, m, RLELossless if kind == "rle" else None)
    return tmp_path / kind


@pytest.mark.process
@requires_bundled_model
@pytest.mark.parametrize("kind", ["oblique_left_handed", "rle", "chaos_ct3"])
def test_dicom_seg_round_trips_onto_the_source_series(tmp_path, kind):
    import highdicom as hd
    import pydicom

    from LiverSegExtension.io import expand_inputs

    src = series(tmp_path, kind)
    assert segment(src, "-o", tmp_path / "nii").returncode == 0
    r = segment(src, "-o", tmp_path / "seg", "--format", "dicom-seg", "--probabilities")
    assert r.returncode == 0, r.stderr
    [row] = list(csv.DictReader(open(tmp_path / "seg" / "summary.csv")))
    seg_path = Path(row["output"])
    assert seg_path.name == f"{src.name}_liver.dcm" and "copy attributes" not in r.stderr  # highdicom kept quiet
    nii = sitk.ReadImage(str(tmp_path / "nii" / f"{src.name}_liver.nii.gz"))
    reference = sitk.GetArrayFromImage(nii) > 0

    [case] = expand_inputs([src])
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {d.SOPInstanceUID for d in sources}
    [segment_] = seg.SegmentSequence
    assert segment_.SegmentLabel == "Liver" and segment_.SegmentAlgorithmType == "AUTOMATIC"
    assert segment_.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert segment_.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    algorithm = segment_.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "liverseg" and algorithm.AlgorithmVersion
    assert hd.color.CIELabColor.from_dicom_value(segment_.RecommendedDisplayCIELabValue).to_rgb() == (221, 130, 101)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
                                               segment_numbers=[1], assert_missing_frames_are_empty=True)[..., 0] > 0
    assert dice(frames, reference) >= 0.999  # frame k is source slice k

    tool = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    out = tmp_path / "dcmqi"
    out.mkdir()
    done = subprocess.run([tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(out), "--outputType", "nifti"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [volume] = out.glob("*.nii.gz")
    by_dcmqi = sitk.GetArrayFromImage(on_grid_of(sitk.ReadImage(str(volume)), nii, "dcmqi")) > 0
    assert dice(by_dcmqi, reference) >= 0.999

    probability = sitk.ReadImage(str(tmp_path / "seg" / f"{src.name}_liver_prob.nii.gz"))
    assert same_grid(probability, nii) and probability.GetPixelID() == sitk.sitkUInt8
    assert dice(sitk.GetArrayFromImage(probability) >= 128, reference) >= 0.99
    assert 0.0 <= float(row["uncertainty"]) <= 1.0


@pytest.mark.process
def test_dicom_seg_is_refused_for_a_volume_file_and_skipped_when_empty(tmp_path, tiny_model_dir, threshold_segmenter,
                                                                          monkeypatch):
    from LiverSegExtension import cli

    m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
    ct, liver = phantom((30, 48, 56), m)
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nrrd"))
    r = segment(tmp_path / "ct.nrrd", "-o", tmp_path / "out", "--format", "dicom-seg", "--model", tiny_model_dir)
    assert r.returncode == 2 and "needs a DICOM series" in r.stderr and "Traceback" not in r.stderr
    none = ct.copy()
    none[liver > 0] = ct[liver == 0].max()
    write_dicom_series(tmp_path / "no_liver", none, m)
    from LiverSegExtension.cli import segment as segment_command

    monkeypatch.setattr(segment_command, "_segmenter", lambda args: threshold_segmenter)
    assert cli.main(["segment", str(tmp_path / "no_liver"), "-o", str(tmp_path / "o"), "--format", "dicom-seg", "-q"]) == 0
    [row] = list(csv.DictReader(open(tmp_path / "o" / "summary.csv")))
    assert row["status"] == "empty" and row["output"] == "" and not list((tmp_path / "o").glob("*.dcm"))


@requires_bundled_model
def test_probabilities_are_the_mask_thresholded_and_uncertainty_a_fraction(tmp_path):
    """The probability map thresholded at 128 (p = 0.5) is the mask; uncertainty is in 0..1."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    shape = (44, 96, 104)
    m = make_affine((2.0, 2.6, 4.0), shape, rotation(0.1, 0.2, -0.1), left_handed=True)
    ct, _ = phantom(shape, m)
    result = LiverSegmenter(device="cpu").segment_image(image_from_array(ct, m), probabilities=True)
    assert result.probability.shape == result.mask.shape and result.probability.dtype == np.uint8
    assert np.array_equal(result.probability >= 128, result.mask > 0)
    assert 0.0 <= result.uncertainty <= 1.0


@requires_bundled_model
@requires_shared
def test_uncertainty_rises_as_a_real_ct_is_degraded():
    """On a real CT (ts_a), noise of 50 and then 150 HU raises the uncertainty step by step (a phantom is no
    yardstick: the model is unsure of its unreal anatomy however clean it is)."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter
    from LiverSegExtension.io import read_image

    image = read_image(SHARED / "liver-train" / "imagesTr" / "ts_a.nii.gz")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    seg = LiverSegmenter(device="cpu")
    uncertainty = [seg.segment_image(image).uncertainty]
    for sd in (50, 150):
        noisy = sitk.GetImageFromArray(hu + np.random.default_rng(0).normal(0, sd, hu.shape).astype(np.float32))
        noisy.CopyInformation(image)
        uncertainty.append(seg.segment_image(noisy).uncertainty)
    assert 0.0 <= uncertainty[0] < uncertainty[1] < uncertainty[2] <= 1.0, uncertainty
