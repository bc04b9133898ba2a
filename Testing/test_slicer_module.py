"""The Slicer module's logic on slicer-core's real MRML: volumes read by Slicer's own readers,
the Liver segment checked for terminology, color, reference geometry and voxel placement in RAS; and the
batch script run inside (the stand-in of) Slicer, as ``Slicer --python-script`` runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, requires_bundled_model, requires_shared
from synthetic import make_affine, phantom, ras_grid, rotation

from LiverSegExtension.data.metrics import dice
from LiverSegExtension.errors import CancelledError, LiverSegError
from LiverSegExtension.geometry import image_from_array

slicer = pytest.importorskip("slicer")


def load_volume(path):
    import slicer

    return slicer.util.loadVolume(str(path))


@pytest.fixture()
def logic(scene, threshold_segmenter):
    """The module's real logic with the networks swapped for the threshold (exact expected mask)."""
    from LiverSeg import LiverSegLogic

    return LiverSegLogic(segmenterFactory=lambda model_path, device: threshold_segmenter)


def oblique_left_handed_ct(tmp_path):
    spacing, shape = (1.8, 2.4, 4.0), (60, 110, 120)
    m = make_affine(spacing, shape, rotation(0.25, -0.2, 0.35), left_handed=True)
    ct, truth = phantom(shape, m)
    path = tmp_path / "oblique_lh.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    return path, m, truth


def test_segment_lands_on_the_volume_in_ras(tmp_path, scene, logic):
    from LiverSegLib.mrml import segment_mask

    path, m, truth = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    # Slicer flips the K axis of a left-handed volume on load: compare in RAS, not index order.
    vm = slicer.util.arrayFromVTKMatrix(_ijk(volume))
    run = logic.process(volume, None, device="cpu")
    mask = segment_mask(run.segmentation_node, run.segment_id, volume)
    assert mask.shape == slicer.util.arrayFromVolume(volume).shape
    truth_ras = ras_grid(truth.shape, m)[truth > 0].mean(axis=0)
    mask_ras = ras_grid(mask.shape, vm)[mask > 0].mean(axis=0)
    assert np.linalg.norm(mask_ras - truth_ras) < 1.0
    assert abs(int(mask.sum()) - int(truth.sum())) / int(truth.sum()) < 0.05
    # Same voxels as the engine gives for the same file read by SimpleITK, mapped through RAS.
    engine = logic.segmenter(device="cpu").segment_image(sitk.ReadImage(str(path))).mask
    if not np.allclose(vm, m):
        engine = engine[::-1]  # the K flip
    assert dice(mask, engine) > 0.99


def _ijk(volume):
    import vtk

    mat = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(mat)
    return mat


def test_segment_terminology_color_geometry_and_hierarchy(tmp_path, scene, logic):
    from LiverSegLib.mrml import segment_terminology

    from LiverSegExtension.io import LIVER_SEGMENT

    path, _, _ = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    # As after a DICOM load: the CT under its study (slicer-core has no SH plugins to add the item itself).
    item = sh.GetItemByDataNode(volume)
    sh.SetItemParent(item, study) if item else sh.CreateItem(study, volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(volume)) == study
    run = logic.process(volume, None, device="cpu")
    seg = run.segmentation_node
    segment = seg.GetSegmentation().GetSegment(run.segment_id)
    assert segment.GetName() == "Liver"
    term = segment_terminology(segment)
    assert "SCT^123037004^Anatomical Structure" in term and "SCT^10200004^Liver" in term
    assert [round(c * 255) for c in segment.GetColor()] == list(LIVER_SEGMENT["color"])
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert seg.GetDisplayNode() is not None
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert run.liver_ml > 0


def test_saved_seg_nrrd_reads_back_with_terminology(tmp_path, scene, logic):
    import slicerio

    path, _, _ = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    run = logic.process(volume, None, device="cpu")
    out = tmp_path / "liver.seg.nrrd"
    storage = run.segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(out))
    assert storage.WriteData(run.segmentation_node)
    seg = slicerio.read_segmentation(str(out))
    assert seg["segments"][0]["name"] == "Liver"
    assert seg["segments"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]


def test_rerun_updates_in_place_and_keeps_other_segments(tmp_path, scene, logic):
    from LiverSegLib.mrml import segment_mask

    path, _, _ = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    tumor = seg.GetSegmentation().AddEmptySegment("Tumor", "Tumor")
    from LiverSegLib.mrml import oriented_image_from_mask

    tmask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    tmask[20:25, 40:50, 40:50] = 1
    mat = slicer.util.arrayFromVTKMatrix(_ijk(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented_image_from_mask(tmask, mat), seg, tumor, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    first = logic.process(volume, seg, device="cpu")
    second = logic.process(volume, seg, device="cpu")
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == ["Liver", "Tumor"]
    assert first.segment_id == second.segment_id
    assert first.segmentation_node is seg and second.segmentation_node is seg
    np.testing.assert_array_equal(segment_mask(seg, tumor, volume), tmask)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def test_cancel_and_errors_leave_the_scene_unchanged(tmp_path, scene, logic):
    path, m, _ = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    before = node_count(scene)
    with pytest.raises(CancelledError):
        logic.process(volume, None, device="cpu", cancel=lambda: True)
    assert node_count(scene) == before
    # Not a CT: an MR-like volume gives a short error and no new node.
    ct, _ = phantom((40, 80, 80), m)
    mr_path = tmp_path / "mr.nrrd"
    sitk.WriteImage(image_from_array((ct.astype(np.int32) + 1100).clip(0).astype(np.int16), m), str(mr_path))
    mr = load_volume(mr_path)
    before = node_count(scene)
    with pytest.raises(LiverSegError, match="cannot be CT"):
        logic.process(mr, None, device="cpu")
    with pytest.raises(LiverSegError, match="no input volume"):
        logic.process(None, None, device="cpu")
    assert node_count(scene) == before


@pytest.mark.process
@requires_bundled_model
def test_self_test_runs(scene, slicer_launcher):
    """LiverSegTest, as Slicer's self-test runs it, with the bundled model (real CT when available)."""
    from LiverSeg import LiverSegTest

    LiverSegTest().runTest()


@requires_shared
@requires_bundled_model
def test_real_dicom_and_nifti_through_slicer_readers(scene):
    from conftest import SHARED
    from LiverSeg import LiverSegLogic

    volume = load_volume(SHARED / "liver-train" / "imagesTr" / "ts_a.nii.gz")
    run = LiverSegLogic().process(volume, None, device="cpu")
    from LiverSegLib.mrml import segment_mask

    ref_node = slicer.util.loadVolume(str(SHARED / "liver-train" / "labelsTr" / "ts_a.nii.gz"), {"labelmap": True})
    ref = slicer.util.arrayFromVolume(ref_node) > 0
    assert dice(segment_mask(run.segmentation_node, run.segment_id, volume), ref) > 0.85


def test_in_slicer_s_process_the_logic_runs_onnx_runtime_only(tiny_model_dir, monkeypatch):
    """``process()`` runs in Slicer's process: ONNX Runtime on the CPU even where a torch that reaches a GPU is
    installed (device "auto"); a GPU device is refused, saying where it runs."""
    from LiverSeg import LiverSegLogic

    from LiverSegExtension.model import runtimes

    monkeypatch.setattr(runtimes, "torch_may_reach_gpu", lambda: True)
    monkeypatch.setattr(runtimes, "available_devices", lambda: ["cuda:0", "cpu"])
    logic = LiverSegLogic()
    assert logic.segmenter(tiny_model_dir, "auto").runs_on.startswith("onnxruntime ")
    with pytest.raises(LiverSegError, match="device 'cuda' runs in the LiverSeg engine process"):
        logic.segmenter(tiny_model_dir, "cuda")


def test_model_card_for_display(tmp_path, tiny_model_dir):
    """The model selector reads cards with the engine's reader; a broken card shows as no card, not a crash."""
    from LiverSeg import LiverSegLogic

    assert LiverSegLogic.modelCard(tiny_model_dir)["name"] == "tiny-test"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text('{"name": "x"}')  # valid JSON, but no stages: unusable
    assert LiverSegLogic.modelCard(broken) == {}
    assert LiverSegLogic.modelCard(tmp_path / "missing") == {}


def test_liver_on_the_left_reaches_the_run_as_a_warning(tmp_path, scene, logic):
    """A whole-body-width CT whose header swaps left and right: the run still works, and carries the
    engine's warning (shown in the panel, logged, and in the batch summary)."""
    spacing, shape = (1.2, 1.5, 5.0), (44, 174, 275)  # 330 x 260 x 220 mm
    m = make_affine(spacing, shape)
    ct, _ = phantom(shape, m)
    swapped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ m
    for name, matrix, warned in (("right.nrrd", m, False), ("swapped.nrrd", swapped, True)):
        sitk.WriteImage(image_from_array(ct, matrix), str(tmp_path / name))
        volume = load_volume(tmp_path / name)
        run = logic.process(volume, None, device="cpu")
        assert run.liver_ml > 0
        assert bool(run.warnings) == warned, run.warnings
    assert run.warnings[0].startswith(f"{volume.GetName()}: the liver found lies on the patient's left")


def test_a_scan_without_liver_gives_an_empty_segment_and_says_so(tmp_path, scene, logic):
    """A CT with no liver in it (a pelvis scan, say): an empty Liver segment, not an error, and a warning."""
    from LiverSegLib.mrml import segment_mask

    spacing, shape = (2.0, 2.0, 4.0), (40, 100, 120)
    m = make_affine(spacing, shape)
    ct, liver = phantom(shape, m)
    ct[liver > 0] = ct[liver == 0].max()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "pelvis.nrrd"))
    volume = load_volume(tmp_path / "pelvis.nrrd")
    run = logic.process(volume, None, device="cpu")
    assert run.liver_ml == 0 and run.warnings == [f"{volume.GetName()}: no liver found"]
    assert not segment_mask(run.segmentation_node, run.segment_id, volume).any()


def test_uncertain_regions_are_shown_jumped_to_and_never_exported(tmp_path, scene, logic):
    import json

    from LiverSegLib.mrml import UNCERTAIN_SEGMENT, find_liver_segment, segment_mask

    path, m, truth = oblique_left_handed_ct(tmp_path)
    volume = load_volume(path)
    run = logic.process(volume, None, device="cpu")
    segmentation = run.segmentation_node
    band = logic.uncertainBand(segmentation, volume)
    assert band is not None and band.any() and 0.0 <= run.uncertainty <= 1.0
    liver = segment_mask(segmentation, run.segment_id, volume) > 0
    assert (band & ~liver).any() and (band & liver).any()  # the band straddles the boundary
    assert logic.showUncertainRegions(segmentation, volume, True)
    uncertain_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(UNCERTAIN_SEGMENT)
    assert uncertain_id and np.array_equal(segment_mask(segmentation, uncertain_id, volume) > 0, band)
    assert find_liver_segment(segmentation) == run.segment_id  # "Liver" is still the Liver segment

    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    ras = logic.jumpToUncertainRegion(segmentation, volume)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())
    assert np.allclose(slice_to_ras[:3, 3], ras, atol=1e-3)

    name = logic.exportForTraining(volume, segmentation, tmp_path / "ds")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ds" / meta["cases"][name]["label"])))
    assert int(label.sum()) == int(liver.sum())  # the export holds the Liver segment, not the band
    assert logic.showUncertainRegions(segmentation, volume, False)
    assert not segmentation.GetSegmentation().GetSegmentIdBySegmentName(UNCERTAIN_SEGMENT)


# -- the batch inside Slicer (``Slicer --no-main-window --python-script LiverSegBatch.py -- ...``) ------------
STAND_IN_SLICER = ROOT / "Testing" / "StandIns" / "slicer_app.py"
BATCH = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"

BROKEN_IMPORT = r"""
import importlib.abc, importlib.util, os, sys
NAME, _, ERROR = os.environ["LIVERSEG_BROKEN"].partition("=")
KIND, _, MESSAGE = ERROR.partition(": ")


class Broken(importlib.abc.Loader):  # found, but fails when loaded: a broken install
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise {"ImportError": ImportError, "OSError": OSError}[KIND](MESSAGE)


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, Broken()) if fullname == NAME else None


sys.meta_path.insert(0, Finder())
"""

FAKE_TORCH = r"""
import os
with open(os.environ["LIVERSEG_TORCH_IMPORTS"], "a") as log:  # who imported torch
    log.write(f"{os.getpid()}\n")
__version__ = "2.5.1+cu121"


class cuda:  # a CUDA build on a machine whose GPU is not there
    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0


class backends:
    pass
"""


def run_in_slicer(tmp_path, script, *args, pythonpath=(), **env):
    """The stand-in Slicer running ``script`` with ``--python-script``: it does not quit when the script ends."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), **env}
    proc = subprocess.Popen([sys.executable, str(STAND_IN_SLICER), "--no-main-window", "--python-script", str(script),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.pid, proc.returncode, stdout, stderr


def small_ct(tmp_path):
    m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
    ct, _ = phantom((30, 48, 56), m)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    return path


@pytest.mark.process
def test_the_batch_in_slicer_ends_slicer_on_every_way_out(tmp_path, tiny_model_dir):
    """``Slicer --python-script`` keeps running after the script: the stand-in says so (exit STILL_RUNNING)
    where the real one would wait for ever. The batch ends Slicer on every way out: a broken import (before
    anything runs), an unexpected error (an ONNX Runtime that cannot load) with its traceback and exit 3,
    a usage error with exit 2."""
    import slicer_app

    idle = tmp_path / "idle.py"
    idle.write_text("print('the script ran')\n")
    _, code, stdout, stderr = run_in_slicer(tmp_path, idle)
    assert code == slicer_app.STILL_RUNNING and "the script ran" in stdout, stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sitecustomize.py").write_text(BROKEN_IMPORT)
    ct, out = small_ct(tmp_path), tmp_path / "out"
    for broken, error in (("LiverSegExtension.batch", "ImportError: cannot import run_batch"),
                          ("onnxruntime", "OSError: libonnxruntime.so.1: cannot open shared object file")):
        _, code, stdout, stderr = run_in_slicer(tmp_path, BATCH, "--", "--input", ct, "--output-dir", out, "--model",
                                                tiny_model_dir, "--device", "cpu", pythonpath=[tmp_path / "broken"],
                                                LIVERSEG_BROKEN=f"{broken}={error}")
        assert code == 3, (broken, code, stderr[-2000:])
        assert "Traceback" in stderr and error in stderr and "LiverSegBatch: unexpected error" in stderr
    _, code, _, stderr = run_in_slicer(tmp_path, BATCH, "--", "--input", ct)  # no --output-dir
    assert code == 2 and "the following arguments are required: --output-dir" in stderr, stderr[-2000:]


@pytest.mark.process
def test_the_batch_in_slicer_never_imports_torch_and_logs_at_the_level_asked(tmp_path, tiny_model_dir,
                                                                           slicer_launcher):
    """Where a torch that can reach a GPU is installed, ``--device auto`` sends the cases through the engine
    process: Slicer's own process never imports torch. slicerqt's root handler logs everything (DEBUG), so
    the batch sets the level itself: its notes show with --debug only."""
    ct = small_ct(tmp_path)
    imports = tmp_path / "torch-imports.txt"
    for build, cuda in (("gpu-torch", "'12.1'"), ("cpu-torch", "None")):
        (tmp_path / build / "torch").mkdir(parents=True)
        (tmp_path / build / "torch" / "__init__.py").write_text(FAKE_TORCH)
        (tmp_path / build / "torch" / "version.py").write_text(f"__version__ = '2.5.1'\ncuda = {cuda}\n")
    note = "LiverSegBatch: the networks run in"
    pid, code, stdout, stderr = run_in_slicer(
        tmp_path, BATCH, "--", "--input", ct, "--output-dir", tmp_path / "gpu", "--model", tiny_model_dir, "--debug",
        pythonpath=[tmp_path / "gpu-torch"], LIVERSEG_TORCH_IMPORTS=str(imports))
    assert code == 0, stdout + stderr[-3000:]
    importers = {int(line) for line in imports.read_text().split()} if imports.exists() else set()
    assert importers and pid not in importers  # the engine process imported torch, Slicer's did not
    assert f"{note} the LiverSeg engine process (device auto)" in stderr
    assert len(list((tmp_path / "gpu").rglob("*_liver.seg.nrrd"))) == 1
    imports.unlink()
    pid, code, stdout, stderr = run_in_slicer(
        tmp_path, BATCH, "--", "--input", ct, "--output-dir", tmp_path / "cpu", "--model", tiny_model_dir,
        pythonpath=[tmp_path / "cpu-torch"], LIVERSEG_TORCH_IMPORTS=str(imports))
    assert code == 0, stdout + stderr[-3000:]
    assert not imports.exists()  # a CPU build of torch: ONNX Runtime here, torch imported nowhere
    assert note not in stderr and "LiverSeg" not in stderr, stderr[-3000:]  # no --debug: the notes are not shown
    assert len(list((tmp_path / "cpu").rglob("*_liver.seg.nrrd"))) == 1
