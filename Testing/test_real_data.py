"""Real data from ../shared/data (skipped, with the reason, when it is absent)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, SHARED, bundled_model, requires_bundled_model, requires_shared

from LiverSegExtension.data.metrics import dice
from LiverSegExtension.geometry import ijk_to_ras_of
from LiverSegExtension.io import expand_inputs, read_case, read_image

pytestmark = [requires_shared, pytest.mark.slow]  # every real CT


def test_dicom_series_geometry_matches_the_dicom_tags():
    """chaos_ct3 read by the engine: size, spacing, and every slice where its ImagePositionPatient says."""
    import pydicom

    [case] = expand_inputs([SHARED / "dicom" / "chaos_ct3"])
    image = read_case(case)
    assert image.GetSize() == (512, 512, 78)
    datasets = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in case.files),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    m = ijk_to_ras_of(image)
    for k, ds in enumerate(datasets):
        ras = m @ [0, 0, k, 1]
        lps = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(lps, [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
    first = pydicom.dcmread(case.files[0])
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[list(case.files).index(case.files[0])], hu)


def test_folder_of_series_skips_the_dicom_seg_object():
    cases = expand_inputs([SHARED / "dicom"])
    assert sorted(c.source.name for c in cases) == ["chaos_ct3", "dcmqi_ct3slice"]


def test_cli_on_real_dicom_and_nifti(tmp_path, tiny_model_dir):
    model = [] if bundled_model() else ["--model", str(tiny_model_dir)]
    out = tmp_path / "out"
    # chaos_ct3's voxels mirrored left to right under its own header: a scan whose header swaps the sides.
    chaos = read_case(expand_inputs([SHARED / "dicom" / "chaos_ct3"])[0])
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(chaos)[:, :, ::-1].copy())
    mirrored.CopyInformation(chaos)
    sitk.WriteImage(mirrored, str(tmp_path / "chaos_mirrored.nrrd"))
    inputs = [SHARED / "dicom" / "chaos_ct3", SHARED / "liver-train" / "imagesTr" / "ts_a.nii.gz",
              SHARED / "unlabelled" / "cort_liver_trunk_3mm.nii.gz", tmp_path / "chaos_mirrored.nrrd"]
    r = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", *map(str, inputs), "-o", str(out), "-q",
                        *model], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    if bundled_model():
        assert [row["status"] for row in rows] == ["ok", "ok", "ok", "warning"]
        assert [bool(row["warning"]) for row in rows] == [False, False, False, True]
        assert "patient's left" in rows[3]["warning"] and "warning: " + rows[3]["warning"] in r.stderr
    for row, src in zip(rows, inputs):
        mask = sitk.ReadImage(row["output"])
        ref = read_case(expand_inputs([src])[0])
        assert mask.GetSize() == ref.GetSize()
        np.testing.assert_allclose(ijk_to_ras_of(mask), ijk_to_ras_of(ref), atol=1e-3)


@requires_bundled_model
@pytest.mark.parametrize("case,min_dice", [("ts_a", 0.90), ("ircad_e05", 0.90)])
def test_shipped_model_on_held_out_cases(case, min_dice):
    """Cases the shipped model was validated on, never trained on (see its card)."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    card = json.loads((bundled_model() / "card.json").read_text())
    assert case not in card["training"]["cases"]
    image = read_image(SHARED / "liver-train" / "imagesTr" / f"{case}.nii.gz")
    ref = sitk.GetArrayFromImage(read_image(SHARED / "liver-train" / "labelsTr" / f"{case}.nii.gz")) > 0
    result = LiverSegmenter(device="cpu").segment_image(image)
    assert dice(result.mask, ref) >= min_dice


@requires_bundled_model
def test_shipped_model_on_the_lits_crop_with_its_header_corrected():
    """lits_117_crop's header is turned 180 degrees in-plane (spine in front of the liver, liver on the left;
    see scripts/corrected_liver_train.py). With the rotation undone it is an ordinary held-out case."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    image = read_image(SHARED / "liver-train" / "imagesTr" / "lits_117_crop.nii.gz")
    ref = sitk.GetArrayFromImage(read_image(SHARED / "liver-train" / "labelsTr" / "lits_117_crop.nii.gz")) > 0
    assert np.allclose(image.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert dice(LiverSegmenter(device="cpu").segment_image(image).mask, ref) >= 0.85


@requires_bundled_model
def test_shipped_model_warns_of_a_header_that_turns_the_anatomy():
    """chaos_ct3 as it is: no warning. Under a header turned 180 degrees in-plane (as lits_117_crop's is), or
    one that mirrors front and back, the liver found lies in front of the spine, and a warning says so."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    [case] = expand_inputs([SHARED / "dicom" / "chaos_ct3"])
    image = read_case(case)
    seg = LiverSegmenter(device="cpu")
    assert seg.segment_image(image).warnings == []
    direction = np.array(image.GetDirection()).reshape(3, 3)
    for flip in ([-1, -1, 1], [1, -1, 1]):
        turned = sitk.Image(image)
        turned.SetDirection((np.diag(flip) @ direction).ravel().tolist())
        [warning] = seg.segment_image(turned, source="chaos_ct3").warnings
        assert warning.startswith("chaos_ct3: the spine lies in front of the liver found (")
    # lits_117_crop as written (turned 180 degrees): its mask is small, and the orientation is still said, first
    crop = seg.segment_image(read_image(SHARED / "liver-train" / "imagesTr" / "lits_117_crop.nii.gz"), source="lits")
    assert crop.liver_ml < 300 and len(crop.warnings) == 2
    assert crop.warnings[0].startswith("lits: the spine lies in front of the liver found (")
    assert crop.warnings[1].startswith("lits: only ")


@requires_bundled_model
@pytest.mark.xfail(strict=True, reason="known defect of liverseg v1.2.0: on CORT (native CT, other scanner, whole "
                   "trunk) the mask leaks from the liver dome into the heart (57 mL there); see the model card")
def test_shipped_model_finds_no_liver_in_the_chest():
    """CORT trunk scan (unlabelled, another scanner): no liver in the heart, and the liver on the right."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    image = read_image(SHARED / "unlabelled" / "cort_liver_trunk_3mm.nii.gz")
    result = LiverSegmenter(device="cpu").segment_image(image)
    assert 800 < result.liver_ml < 3500
    m = ijk_to_ras_of(image)
    kji = np.argwhere(result.mask)
    ras = (m @ np.c_[kji[:, ::-1], np.ones(len(kji))].T).T[:, :3]
    body_centre_x = (m @ [image.GetSize()[0] / 2, 0, 0, 1])[0]
    assert np.mean(ras[:, 0] > body_centre_x) > 0.85  # on the patient's right
    # The heart, located by eye on this scan (RAS mm): above S = 13, where the liver's left lobe has ended,
    # and less than 29.5 mm to the right, where the right lobe's dome (up to S = 30) has not begun.
    # liverseg v0.9.3 put 365 mL there, v1.0.0 97 mL (run 5) and 95 mL (run 6), v1.1.0 58 mL (shipped),
    # 72 mL since the networks' grids read the scan out to its edge, v1.2.0 57 mL (its coarse net trained on such grids).
    heart_ml = np.count_nonzero((ras[:, 2] > 13.0) & (ras[:, 0] < 29.5)) * np.prod(image.GetSpacing()) / 1000
    assert heart_ml < 10


@requires_bundled_model
def test_the_same_crop_on_a_finer_grid_gets_the_same_mask():
    """A 120 mm crop of chaos_ct3 (0.57 mm pixels, 2 mm slices) and the same crop on a 0.3 mm isotropic grid:
    the mask must not depend on the sampling (Dice 0.908 when grid points past the crop's outer voxel centres
    read air; 0.981 since they read the edge voxels)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from resolution import chaos_crop, on_spacing

    from LiverSegExtension.inference.segmenter import LiverSegmenter

    segmenter = LiverSegmenter(device="cpu", runtime="onnxruntime")
    crop = chaos_crop(segmenter, 120.0)
    finer = on_spacing(crop, (0.3, 0.3, 0.3))
    mask = sitk.GetImageFromArray(segmenter.segment_image(finer).mask)
    mask.CopyInformation(finer)
    back = sitk.GetArrayFromImage(sitk.Resample(mask, crop, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    base = segmenter.segment_image(crop).mask
    assert base.sum() > 0 and dice(back > 0, base > 0) >= 0.96
