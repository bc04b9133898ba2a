"""Segment, correct as an annotator would, export as training data, fine-tune, segment again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom, ras_grid, rotation, write_dicom_series

from LiverSegExtension.data.dataset import add_case_images, check_dataset
from LiverSegExtension.data.metrics import dice
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import ijk_to_ras_of, image_from_array

slicer = pytest.importorskip("slicer")

PHI = ("Phantom", "PHANTOM-001")


@pytest.fixture()
def dicom_ct(tmp_path):
    """A CT as DICOM with a patient name and ID, the way clinical data arrives."""
    shape, spacing = (40, 80, 90), (3.5, 3.5, 5.0)
    m = make_affine(spacing, shape, rotation(0.1, 0.05, 0.2), left_handed=False)
    ct, truth = phantom(shape, m)
    files = write_dicom_series(tmp_path / "dicom", ct, m)
    return files, m, truth


def segment_dicom_ct(dicom_ct, segmenter):
    """Load the DICOM CT into the scene and segment it through the module's logic with ``segmenter``."""
    from LiverSeg import LiverSegLogic

    volume = slicer.util.loadVolume(str(dicom_ct[0][0]))
    logic = LiverSegLogic(segmenterFactory=lambda model_path, device: segmenter)
    return volume, logic, logic.process(volume, None, device="cpu")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.slow
def test_export_corrected_segment_then_fine_tune(tmp_path, scene, tiny_model_dir, threshold_segmenter, dicom_ct):
    from LiverSeg import LiverSegLogic
    from LiverSegLib.mrml import oriented_image_from_mask, segment_mask

    files, _, truth = dicom_ct
    volume = slicer.util.loadVolume(str(files[0]))
    logic = LiverSegLogic(segmenterFactory=lambda model_path, device: threshold_segmenter)
    run = logic.process(volume, None, device="cpu")
    seg = run.segmentation_node
    draft = segment_mask(seg, run.segment_id, volume)
    # The annotator erases a few slices of the draft in the Segment Editor.
    corrected = draft.copy()
    k = np.argwhere(draft).mean(axis=0).astype(int)[0]
    corrected[k - 2 : k + 2] = 0
    matrix = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented_image_from_mask(corrected, matrix), seg, run.segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    dataset = tmp_path / "corrections"
    # A fresh logic, as after a restart of Slicer: the draft comes from the node, not from memory.
    name = LiverSegLogic().exportForTraining(volume, seg, dataset, annotator="A. Reader")
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["training"][0]["image"] == f"./imagesTr/{name}.nii.gz"
    assert name.startswith("liverseg_") and not any(p.lower() in name.lower() for p in PHI)
    prov = json.loads((dataset / "provenance" / f"{name}.json").read_text())
    assert prov["model"] == "tiny-test v0.0.1" and prov["annotator"] == "A. Reader"
    expected_dice = dice(draft, corrected)
    assert prov["draft_final_dice"] == pytest.approx(expected_dice) and prov["draft_final_dice"] < 1.0
    assert prov["draft_changed_voxels"] == int((draft != corrected).sum())
    assert meta["cases"][name]["exported"] == prov["exported"]
    # Label on the CT's grid, holding the corrected voxels (compared in RAS).
    image = sitk.ReadImage(str(dataset / "imagesTr" / f"{name}.nii.gz"))
    label = sitk.ReadImage(str(dataset / "labelsTr" / f"{name}.nii.gz"))
    assert image.GetSize() == label.GetSize()
    np.testing.assert_allclose(ijk_to_ras_of(image), ijk_to_ras_of(label), atol=1e-4)
    np.testing.assert_allclose(ijk_to_ras_of(image), matrix, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), corrected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    # No patient name or ID anywhere in the dataset.
    for f in dataset.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            if f.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            assert not any(p.encode() in data for p in PHI), f
    assert cli("dataset", "check", dataset).returncode == 0

    # Fine-tune from the model that made the draft, on the exported case (2 iterations). With one correction
    # (nothing held back) and a parent whose card names no data, there is nothing to check the new model on:
    # it is rejected, kept for inspection, and not listed for the panel.
    models = tmp_path / "models"
    new_model = models / "tiny-test-v0.1.0"
    r = cli("train", "--init", tiny_model_dir, "--data", dataset, "--output", new_model, "--iterations", 2,
            "--device", "cpu", env={**os.environ, "LIVERSEG_DATA_DIR": str(tmp_path / "nowhere")})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"liverseg: {new_model}: rejected: no case to compare the models on (no held-back correction, parent's "
        "validation data not found): name --val cases or make the parent's data available")
    card = json.loads((new_model / "card.json").read_text())
    assert card["parent_model"] == "tiny-test v0.0.1" and card["version"] == "0.1.0"
    assert card["added_cases"] == [name] and card["verdict"]["accepted"] is False
    assert card["added_case_sources"][name]["annotator"] == "A. Reader"
    assert card["parent"]["weights_sha256"] == json.loads((tiny_model_dir / "card.json").read_text())["weights_sha256"]
    from LiverSegExtension.model.catalog import list_models

    os.environ["LIVERSEG_MODELS_DIR"] = str(models)
    try:
        assert new_model not in list_models() and new_model in list_models(include_rejected=True)
        assert str(new_model) not in [str(p) for p in LiverSegLogic().availableModels()]
    finally:
        del os.environ["LIVERSEG_MODELS_DIR"]
    rerun = LiverSegLogic().process(volume, seg, device="cpu", modelPath=str(new_model))
    assert rerun.model_name == "tiny-test v0.1.0" and rerun.segment_id == run.segment_id


def test_draft_is_saved_with_the_scene(tmp_path, scene, threshold_segmenter, dicom_ct):
    """The model's draft travels in the MRML scene file, and a draft from another grid is not used."""
    from LiverSegLib.mrml import DRAFT_ATTRIBUTE, segment_mask

    from LiverSegExtension.inference.masktext import decode_mask

    volume, _, run = segment_dicom_ct(dicom_ct, threshold_segmenter)
    draft = segment_mask(run.segmentation_node, run.segment_id, volume)
    assert draft.any()
    scene_file = tmp_path / "scene.mrml"
    scene.SetURL(str(scene_file))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(scene_file))
    reloaded.Import()
    node = reloaded.GetFirstNodeByName(run.segmentation_node.GetName())
    text = node.GetAttribute(DRAFT_ATTRIBUTE)
    np.testing.assert_array_equal(decode_mask(text, draft.shape), draft)
    assert len(text) < draft.size / 20  # compact: the scene file stays small
    assert decode_mask(text, (draft.shape[0] + 1, *draft.shape[1:])) is None
    assert decode_mask(text[: len(text) // 2], draft.shape) is None


def _ijk_to_ras(volume):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def test_empty_segment_is_refused_and_nothing_written(tmp_path, scene, threshold_segmenter, dicom_ct):
    from LiverSegLib.mrml import oriented_image_from_mask

    volume, logic, run = segment_dicom_ct(dicom_ct, threshold_segmenter)
    empty = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    matrix = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented_image_from_mask(empty, matrix), run.segmentation_node, run.segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    with pytest.raises(LiverSegError, match="empty"):
        logic.exportForTraining(volume, run.segmentation_node, tmp_path / "ds")
    assert not (tmp_path / "ds" / "dataset.json").exists()
    assert not list((tmp_path / "ds").rglob("*.nii.gz"))


def small_case():
    m = make_affine((5.0, 5.0, 6.0), (20, 64, 64))
    ct, liver = phantom((20, 64, 64), m)
    return image_from_array(ct, m), image_from_array(liver, m)


def test_no_overwrite_and_crash_mid_export_leaves_a_valid_dataset(tmp_path):
    from LiverSegExtension.io import atomic_write

    ds = tmp_path / "ds"
    image, label = small_case()
    first = add_case_images(ds, image, label)
    before = (ds / "imagesTr" / f"{first}.nii.gz").read_bytes()
    other = sitk.BinaryErode(sitk.Cast(label, sitk.sitkUInt8), [1, 1, 1])  # another correction of the same CT
    for stage in ("image", "label"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            add_case_images(ds, image, other, _crash_after=stage)
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and [e["image"] for e in meta["training"]] == [f"./imagesTr/{first}.nii.gz"]
    assert check_dataset(ds) == []  # what the failed exports had written is gone
    with pytest.raises(LiverSegError, match=f"already case {first}; nothing added"):
        add_case_images(ds, image, label)
    second = add_case_images(ds, image, other)
    assert second != first
    assert (ds / "imagesTr" / f"{first}.nii.gz").read_bytes() == before
    with pytest.raises(LiverSegError, match="already exists"):
        atomic_write(ds / "imagesTr" / f"{first}.nii.gz", lambda tmp: open(tmp, "w").write("x"))
    assert (ds / "imagesTr" / f"{first}.nii.gz").read_bytes() == before
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2


def test_bad_labels_are_refused(tmp_path):
    image, label = small_case()
    two = sitk.Cast(label, sitk.sitkUInt8) * 2
    with pytest.raises(LiverSegError, match="not binary"):
        add_case_images(tmp_path, image, two)
    shifted = sitk.Image(label)
    shifted.SetOrigin([o + 1 for o in label.GetOrigin()])
    with pytest.raises(LiverSegError, match="grid"):
        add_case_images(tmp_path, image, shifted)


@pytest.mark.process
def test_concurrent_exports_from_two_processes(tmp_path):
    image, label = small_case()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "mask.nii.gz"))
    ds = tmp_path / "shared_ds"
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import SimpleITK as sitk
        from LiverSegExtension.data.dataset import add_case_images
        image, label = sitk.ReadImage({str(tmp_path / 'ct.nii.gz')!r}), sitk.ReadImage({str(tmp_path / 'mask.nii.gz')!r})
        for i in range(4):  # eight different corrections of one CT (the same one twice would be refused)
            edited = sitk.Image(label)
            edited[1 + int(sys.argv[1]) * 4 + i, 0, 0] = 1
            add_case_images({str(ds)!r}, image, edited)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 8 and len({e["image"] for e in meta["training"]}) == 8
    assert check_dataset(ds) == []


@pytest.mark.process
def test_dataset_cli_add_and_check(tmp_path):
    image, label = small_case()
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "mask.nrrd"))
    r = cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", tmp_path / "ct.nrrd", "--label", tmp_path / "mask.nrrd")
    assert r.returncode == 0, r.stderr
    assert cli("dataset", "check", tmp_path / "ds").returncode == 0
    # A label that is not binary, written behind the tool's back, is reported.
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    bad = tmp_path / "ds" / meta["training"][0]["label"]
    sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8) * 3, str(bad))
    r = cli("dataset", "check", tmp_path / "ds")
    assert r.returncode == 1 and "not binary" in r.stdout
    r = cli("dataset", "add", "--dataset", tmp_path / "ds", "--image", tmp_path / "ct.nrrd", "--label", tmp_path / "nope.nrrd")
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_truth_is_where_the_ct_says(dicom_ct):
    """Sanity of the fixture: the DICOM geometry reproduces the phantom in RAS."""
    files, m, truth = dicom_ct
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    img = reader.Execute()
    ct = sitk.GetArrayFromImage(img)
    ras = ras_grid(ct.shape, ijk_to_ras_of(img))
    liver_ras = ras[ct > 95].mean(axis=0)
    assert np.linalg.norm(liver_ras - ras_grid(truth.shape, m)[truth > 0].mean(axis=0)) < 1.0
