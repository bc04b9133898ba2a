"""What a new user trips over: labels that are not labels, DICOM SEG in the correction loop, pictures of a mask
that is not on the CT, the light install's commands that need PyTorch, misspelt flags, versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tomllib
from conftest import ROOT, SHARED, requires_shared
from synthetic import make_affine, phantom
from test_cli import run_cli

from LiverSegExtension.geometry import image_from_array

SHAPE, SPACING = (30, 48, 56), (4.0, 4.5, 6.0)


@pytest.fixture()
def ct_and_label(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    m = make_affine(SPACING, SHAPE)
    ct, liver = phantom(SHAPE, m)
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    return tmp_path / "ct.nii.gz", liver, m


def test_a_probability_map_or_a_label_of_several_values_is_not_taken_as_a_liver_label(ct_and_label, tmp_path):
    ct, liver, m = ct_and_label
    probability = (liver * 255).astype(np.uint8)
    probability[1:-1][np.roll(liver, 1, axis=1)[1:-1] > liver[1:-1]] = 40  # a soft rim, as a probability map has
    sitk.WriteImage(image_from_array(probability, m), str(tmp_path / "prob.nii.gz"))
    r = run_cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", ct, "--label", tmp_path / "prob.nii.gz")
    assert r.returncode == 1 and "values 0, 40, 255 found" in r.stderr and "--liver-values" in r.stderr, r.stderr
    assert not (tmp_path / "ds" / "dataset.json").exists()
    lits = liver.astype(np.uint8) + (liver & np.roll(liver, 3, axis=2)).astype(np.uint8)  # liver 1, tumour 2
    sitk.WriteImage(image_from_array(lits, m), str(tmp_path / "lits.nii.gz"))
    assert run_cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", ct, "--label", tmp_path / "lits.nii.gz"
                   ).returncode == 1
    r = run_cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", ct, "--label", tmp_path / "lits.nii.gz",
                "--liver-values", "1,2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    (case,) = meta["cases"].values()
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ds" / case["label"])))
    assert np.array_equal(stored, liver.astype(np.uint8))  # tumour counted as liver, nothing else
    assert case["label_values"] == [1, 2] and case["liverseg_version"] and case["bundled_model"]
    assert run_cli("dataset", "check", tmp_path / "ds").returncode == 0


@requires_shared
def test_dataset_add_and_evaluate_read_a_dicom_seg_onto_its_ct(tmp_path):
    from LiverSegExtension.io import expand_inputs, read_case
    from LiverSegExtension.io.dicom_seg import read_dicom_seg

    series, seg = SHARED / "dicom" / "dcmqi_ct3slice", SHARED / "dicom" / "dcmqi_ct3slice_liver_seg.dcm"
    ct = read_case(expand_inputs([series])[0])
    label = read_dicom_seg(seg, ct)
    frames = sitk.GetArrayFromImage(label)
    assert frames.shape == (3, 512, 512) and all(500 < n for n in frames.sum(axis=(1, 2)))  # every slice has liver
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    r = run_cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", tmp_path / "ct.nrrd", "--label", seg)
    assert r.returncode == 0, r.stderr
    # evaluate pairs <name>_liver.dcm with <name>.nii.gz: the SEG against itself as a volume is Dice 1
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "ct3_liver.dcm").write_bytes(seg.read_bytes())
    (tmp_path / "ref").mkdir()
    sitk.WriteImage(label, str(tmp_path / "ref" / "ct3.nii.gz"))
    r = run_cli("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref")
    assert r.returncode == 0 and "| ct3 | 1.000" in r.stdout, r.stdout + r.stderr
    other = sitk.Image(ct)  # the same SEG against a CT placed elsewhere: refused, not misplaced
    other.SetOrigin([o + 1000 for o in ct.GetOrigin()])
    with pytest.raises(Exception, match="do not lie on the CT's voxels"):
        read_dicom_seg(seg, other)


def test_view_says_when_the_mask_is_nowhere_on_the_ct(ct_and_label, tmp_path):
    ct, liver, m = ct_and_label
    far = m.copy()
    far[:3, 3] += 2000  # another patient's mask on a grid two metres away
    sitk.WriteImage(image_from_array(liver.astype(np.uint8), far), str(tmp_path / "far.nii.gz"))
    r = run_cli("view", ct, tmp_path / "far.nii.gz", "-o", tmp_path / "v.png")
    assert r.returncode == 1 and "none of the mask lies inside the CT" in r.stderr and "far.nii.gz" in r.stderr
    assert not (tmp_path / "v.png").exists()
    sitk.WriteImage(image_from_array(liver.astype(np.uint8), m), str(tmp_path / "here.nii.gz"))
    assert run_cli("view", ct, tmp_path / "here.nii.gz", "-o", tmp_path / "v.png").returncode == 0


def test_train_on_the_light_install_says_what_to_install(monkeypatch, tmp_path):
    from LiverSegExtension.model import environment

    real = environment.installed
    monkeypatch.setattr(environment, "installed", lambda m: False if m in ("torch", "monai") else real(m))
    r = run_cli("train", "--data", tmp_path, "--output", tmp_path / "m")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "needs torch, monai" in line and "pip install 'torch>=2.0' 'monai>=1.3'" in line
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    assert list(environment.TORCH_EXTRA) == extra  # the hint installs what the torch extra does


def test_small_things_a_newcomer_meets(tmp_path, capsys):
    r = run_cli("segment", tmp_path, "-o", tmp_path / "o", "--skip-exisiting")
    assert r.returncode == 2 and "did you mean --skip-existing?" in r.stderr
    r = run_cli("summary", "merge", tmp_path / "nosuch")
    assert r.returncode == 1 and "nosuch: no such folder" in r.stderr
    from LiverSegExtension import __version__
    from LiverSegExtension.model.catalog import bundled_model_name, default_model_dir

    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"liverseg {__version__}, bundled model {bundled_model_name()}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == version
    if default_model_dir() is not None:
        card = json.loads((default_model_dir() / "card.json").read_text())
        assert bundled_model_name() == f"{card['name']} v{card['version']}"


def test_liversegs_own_dicom_seg_reads_back_onto_its_ct_voxel_for_voxel(tmp_path):
    """A SEG of one segment keeps its segment number in the shared functional groups (highdicom writes it so)."""
    from synthetic import rotation, write_dicom_series

    from LiverSegExtension.io import expand_inputs, read_case
    from LiverSegExtension.io.dicom_seg import read_dicom_seg, write_dicom_seg

    m = make_affine(SPACING, SHAPE, rotation(0.1, 0.0, 0.2))
    ct, liver = phantom(SHAPE, m)
    write_dicom_series(tmp_path / "series", ct, m)
    (case,) = expand_inputs([tmp_path / "series"])
    image = read_case(case)
    mask = sitk.GetArrayFromImage(sitk.Resample(image_from_array(liver.astype(np.uint8), m), image,
                                                sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    mask[: SHAPE[0] // 3] = 0  # slices without liver: frames the SEG leaves out
    write_dicom_seg(mask, case.files, tmp_path / "seg.dcm", "liverseg", "1.1.0")
    back = sitk.GetArrayFromImage(read_dicom_seg(tmp_path / "seg.dcm", image))
    assert mask.any() and np.array_equal(back, mask)
