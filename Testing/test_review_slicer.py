"""Reviewing a batch's results in Slicer, on slicer-core's real MRML with the stand-ins: cases of every input
(volume files, a DICOM series) and every mask format (nii.gz, nrrd, seg.nrrd, DICOM SEG) loaded as the batch
loads them and landing on the CT in RAS; decisions, exports with the batch row in their provenance, resume after
a restart, two annotators in two processes on one folder, a constant node count over a cohort, the panel's
Review section, and a real cohort when present."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, SHARED, close_panel, open_panel, requires_bundled_model, requires_shared
from synthetic import make_affine, phantom, rotation, write_dicom_series

from LiverSegExtension import io
from LiverSegExtension.data.metrics import dice
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.review import ReviewState

slicer = pytest.importorskip("slicer")


def truth_on(volume) -> np.ndarray:
    """The phantom's liver on a volume node's own grid (it is defined in RAS: the same on any grid)."""
    from LiverSegLib.mrml import volume_array_and_matrix

    array, matrix = volume_array_and_matrix(volume)
    return phantom(array.shape, matrix)[1]


def liver_of(review) -> np.ndarray:
    from LiverSegLib.mrml import find_liver_segment, segment_mask

    return segment_mask(review.segmentation, find_liver_segment(review.segmentation), review.volume)


def write_seg_nrrd(ct_path: Path, path: Path) -> None:
    """A .seg.nrrd as the Slicer batch writes it: a "Liver" segment saved by Slicer's own storage node."""
    from LiverSegLib import mrml

    scene = slicer.vtkMRMLScene()
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    volume = volumes.AddArchetypeVolume(str(ct_path), "ct", 0)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    on_node = mrml.volume_array_and_matrix(volume)[1]
    mrml.write_liver_segment(node, volume, phantom(mrml.volume_array_and_matrix(volume)[0].shape, on_node)[1])
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)


def make_cohort(root: Path) -> Path:
    """A batch output of five cases, each in another form; rows written by the batch's summary writer."""
    from LiverSegExtension.io.dicom_seg import write_dicom_seg

    out, rows = root / "out", []
    shape = (24, 40, 44)
    lh = make_affine((4.0, 4.0, 6.0), shape, rotation(0.2, -0.1, 0.3), left_handed=True)  # Slicer flips its K
    plain = make_affine((4.0, 4.0, 6.0), shape)
    ct, liver = phantom(shape, lh)
    (root / "scans" / "lh").mkdir(parents=True)
    sitk.WriteImage(image_from_array(ct, lh), str(root / "scans" / "lh" / "ct.nii.gz"))
    (out / "lh").mkdir(parents=True)
    sitk.WriteImage(image_from_array(liver, lh), str(out / "lh" / "ct_liver.nii.gz"))
    probability = np.clip(liver * 230 + (np.roll(liver, 2, axis=2) ^ liver) * 128, 0, 255).astype(np.uint8)
    sitk.WriteImage(image_from_array(probability, lh), str(out / "lh" / "ct_liver_prob.nii.gz"))
    rows.append(("lh/ct.nii.gz", "lh/ct_liver.nii.gz", "warning", 0.08))
    ct, liver = phantom(shape, plain)
    for name, suffix in (("nrrd", ".nrrd"), ("seg", ".nii.gz")):
        (root / "scans" / name).mkdir()
        sitk.WriteImage(image_from_array(ct, plain), str(root / "scans" / name / f"ct{suffix}"))
    sitk.WriteImage(image_from_array(liver, plain), str(out / "ct_liver.nrrd"))
    rows.append(("nrrd/ct.nrrd", "ct_liver.nrrd", "ok", 0.01))
    write_seg_nrrd(root / "scans" / "seg" / "ct.nii.gz", out / "seg_liver.seg.nrrd")
    rows.append(("seg/ct.nii.gz", "seg_liver.seg.nrrd", "ok", 0.20))
    dicom = make_affine((4.0, 4.0, 6.0), (20, 40, 44), rotation(0.0, 0.0, 0.15))
    write_dicom_series(root / "scans" / "dicom", phantom((20, 40, 44), dicom)[0], dicom)
    (series,) = io.expand_inputs([root / "scans" / "dicom"])
    grid = io.input_grid(series)
    from LiverSegExtension.geometry import ijk_to_ras_of

    write_dicom_seg(phantom(grid.GetSize()[::-1], ijk_to_ras_of(grid))[1], series.files, out / "dicom_liver.dcm",
                    "liverseg", "1.1.0")
    rows.append(("dicom", "dicom_liver.dcm", "ok", 0.15))
    (root / "scans" / "bad").mkdir()
    (root / "scans" / "bad" / "ct.nii.gz").write_bytes(b"not a CT")
    rows.append(("bad/ct.nii.gz", "", "failed", None))
    io.write_summary(out / "summary.csv", [
        {**io.summary_row(str(root / "scans" / source), str(out / mask) if mask else ""), "status": status,
         "uncertainty": "" if u is None else f"{u:.3f}", "liver_ml": "" if u is None else "250.0",
         "runtime": "onnxruntime 1.20 on cpu"} for source, mask, status, u in rows])
    return out


@pytest.fixture()
def review(scene):
    from LiverSeg import LiverSegLogic
    from LiverSegLib.review import ReviewLogic

    return ReviewLogic(LiverSegLogic(), scene)


def test_a_cohort_of_every_input_and_mask_format_reviewed_end_to_end(tmp_path, scene, review):
    out = make_cohort(tmp_path)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # as Slicer's views have them
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    cases = review.open(out, "ann")
    assert [c.name for c in cases] == ["bad/ct", "lh/ct", "seg", "dicom", "ct"]  # failed, warned, then uncertainty
    with pytest.raises(LiverSegError, match="ct.nii.gz"):  # the failed case's CT cannot be read: said in one line
        review.next()
    assert review.current.name == "bad/ct" and review.volume is None
    assert review.skip("the CT file is damaged").name == "lh/ct"
    # Left-handed and oblique: Slicer flipped K on load; the mask lands on the same places in RAS.
    liver = liver_of(review)
    assert np.array_equal(liver, truth_on(review.volume)) and liver.any()
    band = review.logic.uncertainBand(review.segmentation, review.volume)
    assert band is not None and band.any()  # the probability map was there: the uncertain band too
    assert composite.GetBackgroundVolumeID() == review.volume.GetID()
    centre = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3]
    from LiverSegLib.mrml import volume_array_and_matrix

    k, j, i = (np.nonzero(liver)[a] for a in range(3))
    matrix = volume_array_and_matrix(review.volume)[1]
    box_centre = matrix @ np.array([(i.min() + i.max()) / 2, (j.min() + j.max()) / 2, (k.min() + k.max()) / 2, 1])
    assert np.allclose(centre, box_centre[:3], atol=1e-3)  # the views centred on the liver
    assert review.accept().name == "seg"
    # .seg.nrrd through Slicer's reader; the annotator cuts the top slices off, then exports.
    liver = liver_of(review)
    assert np.array_equal(liver, truth_on(review.volume))
    corrected = liver.copy()
    corrected[np.nonzero(liver.any(axis=(1, 2)))[0][-3:]] = 0
    from LiverSegLib.mrml import write_liver_segment

    write_liver_segment(review.segmentation, review.volume, corrected)
    seg_case = review.current
    with pytest.raises(LiverSegError, match="was changed"):
        review.accept()  # Accept is for a mask left as the model made it
    assert review.exportAndNext(tmp_path / "dataset", background=False).name == "dicom"
    record = ReviewState(out).records()[seg_case.key]
    assert record["decision"] == "exported" and record["who"] == "ann"
    assert float(record["dice_changed"]) == pytest.approx(dice(liver, corrected), abs=1e-4)
    assert float(record["dice_changed"]) < 0.99
    provenance = json.loads((tmp_path / "dataset" / "provenance" / f"{record['dataset_case']}.json").read_text())
    assert provenance["review"]["row"]["input"] == seg_case.row["input"]
    assert provenance["review"]["row"]["output"] == str(out / "seg_liver.seg.nrrd")
    assert provenance["review"]["summary"] == str(out / "summary.csv") and provenance["annotator"] == "ann"
    # DICOM series through Slicer's reader, DICOM SEG read onto it; the SEG names the model, and the export too.
    assert np.array_equal(liver_of(review), truth_on(review.volume)) and liver_of(review).any()
    assert review.exportAndNext(tmp_path / "dataset", background=False).name == "ct"
    record = ReviewState(out).records()[cases[3].key]
    assert record["model"] == "liverseg v1.1.0" and record["dice_changed"] == "1.0000"
    provenance = json.loads((tmp_path / "dataset" / "provenance" / f"{record['dataset_case']}.json").read_text())
    assert provenance["model"] == "liverseg v1.1.0" and provenance["review"]["row"]["output"].endswith(".dcm")
    assert np.array_equal(liver_of(review), truth_on(review.volume))
    assert review.skip("duplicate of another patient's scan") is None  # none left: the scene is cleared
    assert review.volume is None and review.progress() == (5, 5)
    assert [r["review"] for r in review.rows()] == [
        "skipped: the CT file is damaged", "accepted", f"exported (Dice {dice(liver, corrected):.3f})",
        "exported (Dice 1.000)", "skipped: duplicate of another patient's scan"]


def test_a_mask_of_another_grid_is_refused_and_leaves_nothing(tmp_path, scene, review):
    out = make_cohort(tmp_path)
    other = make_affine((5.0, 5.0, 6.0), (20, 30, 30))
    sitk.WriteImage(image_from_array(phantom((20, 30, 30), other)[1], other), str(out / "ct_liver.nrrd"))
    review.open(out, "ann")
    count = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match="does not lie on this CT's grid"):
        review.openCase(next(c.key for c in review.cases if c.name == "ct"))
    assert scene.GetNumberOfNodes() == count and review.current.name == "ct"  # still open: to skip it


def small_cohort(root: Path, n: int, failed: tuple[int, ...] = ()) -> Path:
    """``n`` patients' CTs and their masks (none for the cases in ``failed``: the batch failed on them)."""
    m = make_affine((6.0, 6.0, 8.0), (16, 24, 24))
    rows = []
    for i in range(n):
        ct, liver = phantom((16, 24, 24), m, seed=i)  # each patient's own noise: exports are never duplicates
        source, mask = root / "scans" / f"p{i}" / "ct.nii.gz", root / "out" / f"p{i}" / "ct_liver.nii.gz"
        for path, array in ((source, ct), (mask, liver))[: 1 if i in failed else 2]:
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image_from_array(array, m), str(path))
        row = io.summary_row(str(source), "" if i in failed else str(mask))
        row.update(uncertainty=f"{i / 100:.3f}", **({"status": "failed", "error": "engine crashed"} if i in failed else {}))
        rows.append(row)
    io.write_summary(root / "out" / "summary.csv", rows)
    return root / "out"


def open_folder(panel, folder: Path) -> None:
    """Type a folder into the Review section's box, as a user does (each keystroke a currentPathChanged in CTK's
    path box), then press Return."""
    edit = panel.folderEdit.comboBox().lineEdit()
    edit.text = ""
    edit.keyClicks(str(folder))
    edit.pressReturn()


def test_no_node_is_left_behind_over_ten_cases(tmp_path, scene, review):
    out = small_cohort(tmp_path, 10)
    review.open(out, "ann")
    empty = scene.GetNumberOfNodes()
    counts, own = [], None
    case = review.next()
    while case is not None:
        counts.append(scene.GetNumberOfNodes() - (own is not None))
        if len(counts) == 3:  # a node of the annotator's own, made while a case was open, is theirs: it stays
            own = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "my notes")
        case = review.accept() if len(counts) % 2 else review.exportAndNext(tmp_path / "ds", background=False)
    assert len(counts) == 10 and len(set(counts)) == 1 and counts[0] > empty
    assert scene.GetNumberOfNodes() == empty + 1 and scene.IsNodePresent(own)
    assert review.progress() == (10, 10)


def test_resume_after_a_restart_and_a_second_annotator_elsewhere(tmp_path, scene):
    import slicer_app
    from LiverSeg import LiverSegLogic
    from LiverSegLib.review import ReviewLogic

    out = small_cohort(tmp_path, 4)
    first = ReviewLogic(LiverSegLogic(), scene)
    first.open(out, "ann")
    assert first.next().name == "p3/ct"
    first.accept()
    left_open = first.current.name  # Slicer is closed here, the case undecided
    again = ReviewLogic(LiverSegLogic(), slicer_app.install(testing=True))
    again.open(out, "ann")
    assert again.progress() == (1, 4) and again.next().name == left_open == "p2/ct"
    other = ReviewLogic(LiverSegLogic(), slicer_app.install(testing=True))
    other.open(out, "bob")
    assert other.next().name == "p1/ct"  # not ann's case
    assert [r["review"] for r in other.rows()] == ["accepted", "in review by ann", "open", "not reviewed"]
    assert [r["name"] for r in other.rows(onlyPending=True)] == ["p2/ct", "p1/ct", "p0/ct"]


def edit(review) -> np.ndarray:
    """The annotator cuts the liver's top slices off the open case's Liver segment; the corrected mask."""
    from LiverSegLib.mrml import write_liver_segment

    corrected = liver_of(review).copy()
    corrected[np.nonzero(corrected.any(axis=(1, 2)))[0][-2:]] = 0
    write_liver_segment(review.segmentation, review.volume, corrected)
    return corrected


def test_next_case_with_a_case_open_gives_another_and_never_loses_edits(tmp_path, scene, review):
    out = small_cohort(tmp_path, 3)
    review.open(out, "ann")
    assert review.next().name == "p2/ct"
    assert review.next().name == "p1/ct"  # another case, not the same one read again
    records = ReviewState(out).records()
    assert records[review.cases[1].key]["claimed_by"] == "ann" and review.cases[0].key not in records  # p2 given back
    corrected = edit(review)
    count = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match="p1/ct: its Liver segment was changed, and Next case would lose that"):
        review.next()
    with pytest.raises(LiverSegError, match="opening another case would lose that"):
        review.openCase(review.cases[0].key)
    with pytest.raises(LiverSegError, match="opening another folder would lose that"):
        review.open(small_cohort(tmp_path / "other", 1), "ann")
    assert review.current.name == "p1/ct" and np.array_equal(liver_of(review), corrected)  # the edits are there
    assert scene.GetNumberOfNodes() == count and review.folder == out
    assert review.openCase(review.cases[1].key) is review.current  # the open case clicked: nothing read again
    assert np.array_equal(liver_of(review), corrected)
    assert review.skip("too hard").name == "p2/ct"


def test_the_folder_opens_when_its_path_is_finished_not_on_each_keystroke(tmp_path, scene, monkeypatch):
    """CTK's path box says currentPathChanged on every keystroke: typing another folder's path leaves the open
    case alone until Return (or the focus leaving the box); a path that does not exist is said quietly; the
    "..." button opens the folder picked."""
    import qt

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append(text))
    first, second = small_cohort(tmp_path / "a", 2), small_cohort(tmp_path / "b", 3)
    module, widget = open_panel()
    try:
        panel = widget.review
        widget._parameterNode.annotator = "ann"
        open_folder(panel, first)
        panel.nextButton.click()
        case, count = panel.review.current, scene.GetNumberOfNodes()
        edit(panel.review)
        box = panel.folderEdit.comboBox().lineEdit()
        changes = []
        panel.folderEdit.connect("currentPathChanged(QString)", changes.append)
        box.text = ""
        box.keyClicks(str(second))
        assert len(changes) == len(str(second)) + 1  # one per keystroke, as CTK's box says it
        assert panel.review.folder == first and panel.review.current is case and scene.GetNumberOfNodes() == count
        box.focusOut()  # finished: the other folder would lose the edits, so it is not opened
        assert panel.review.folder == first and panel.review.current is case
        assert "would lose that" in panel.statusLabel.text and len(shown) == 1
        panel.reasonEdit.text = "not this phase"
        panel.skipButton.click()  # the case decided, the other folder can open
        box.text = str(tmp_path / "no-such")
        box.pressReturn()
        assert panel.statusLabel.text.endswith("no-such: no such folder") and len(shown) == 1  # quiet
        assert panel.review.folder == first
        box.text = str(second)
        box.pressReturn()
        assert panel.review.folder == second and panel.table.rowCount == 3
        assert qt.QSettings().value("LiverSeg/ReviewFolder") == str(second)
        box.focusOut()  # the same folder again: nothing happens
        assert panel.review.folder == second
        qt.QFileDialog.answers[:] = [str(first)]
        panel.browseButton.click()
        assert panel.review.folder == first and panel.folderEdit.currentPath == str(first)
        assert panel.progressLabel.text == "1 of 2 reviewed"
    finally:
        close_panel(module)


class FailingExport:
    """The engine process's answer to an export, without a process: it failed (``error``)."""

    def __init__(self, error: Exception) -> None:
        self.error, self.done = error, True

    def poll(self) -> bool:
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        return True


class NoEngine:
    """The module's export, where starting an engine process is an error of the test."""

    def __init__(self) -> None:
        from LiverSeg import LiverSegLogic

        self.logic = LiverSegLogic(engineFactory=lambda: pytest.fail("an engine process was started"))
        self.failWith: Exception | None = None

    def startExport(self, *args, **kwargs):
        self.logic._exportInputs(*args[:2])  # what the export checks before it writes anything
        return FailingExport(self.failWith)

    def finishExport(self, run):
        raise run.error

    def exportForTraining(self, *args, **kwargs) -> str:
        return self.logic.exportForTraining(*args, **kwargs)

    def shutdown(self) -> None:
        pass


def test_a_failed_background_export_keeps_the_correction_to_retry(tmp_path, scene):
    """A full disk: the export fails in the engine process after the next case was shown. The corrected case stays
    claimed and its segmentation stays (hidden): Next case opens the correction again, and the retry records
    it; an empty segment is refused before anything moves."""
    from LiverSeg import LiverSegLogic
    from LiverSegLib.review import ReviewLogic

    out = small_cohort(tmp_path, 3)
    exporter = NoEngine()
    review = ReviewLogic(LiverSegLogic(), scene, exporter=exporter)
    review.open(out, "ann")
    first = review.next()
    corrected = edit(review)
    exporter.failWith = LiverSegError(f"{tmp_path / 'dataset'}: could not be written (No space left on device)")
    assert review.exportAndNext(tmp_path / "dataset").name == "p1/ct"
    with pytest.raises(LiverSegError, match="p2/ct: its export is under way"):
        review.openCase(first.key)
    (message,) = review.pollExports()
    assert message.startswith("p2/ct: export failed: ") and "No space left on device" in message
    assert "your correction is kept" in message
    assert [r["review"] for r in review.rows()][0] == "export failed: open it to retry"
    assert ReviewState(out).records()[first.key]["claimed_by"] == "ann"
    assert review.renew() == []  # the failed case is kept claimed too
    assert review.next().name == "p2/ct"  # this annotator's own case first: the correction, not the model's mask
    assert np.array_equal(liver_of(review), corrected) and review.edited()
    assert review.exportAndNext(tmp_path / "dataset", background=False).name == "p1/ct"  # the retry
    record = ReviewState(out).records()[first.key]
    assert record["decision"] == "exported" and float(record["dice_changed"]) < 0.99
    nodes = scene.GetNumberOfNodes()
    from LiverSegLib.mrml import write_liver_segment

    write_liver_segment(review.segmentation, review.volume, np.zeros_like(liver_of(review)))
    with pytest.raises(LiverSegError, match="the Liver segment is empty: nothing to export"):
        review.exportAndNext(tmp_path / "dataset")
    assert review.current.name == "p1/ct" and scene.GetNumberOfNodes() == nodes and not review.exporting


def test_an_image_and_label_in_the_dataset_already_are_recorded_as_exported_there(tmp_path, scene, review):
    out = small_cohort(tmp_path, 2)
    review.open(out, "ann")
    first = review.next()
    review.exportAndNext(tmp_path / "dataset", background=False)
    name = ReviewState(out).records()[first.key]["dataset_case"]
    review.skip("next annotator's turn")
    review.openCase(first.key, again=True)  # a re-review that changes nothing: the same image and label
    assert review.exportAndNext(tmp_path / "dataset", background=False) is None
    record = ReviewState(out).records()[first.key]
    assert record["decision"] == "exported" and record["dataset_case"] == name
    assert record["previous"].startswith("exported by ann at ")
    assert len(json.loads((tmp_path / "dataset" / "dataset.json").read_text())["training"]) == 1


def test_another_patient_s_mask_is_never_shown(tmp_path, scene, review):
    """p1's mask is gone; a mask of p0 lies where a shorter tail of p1's path points. The batch's record beside it
    names p0's CT: p1 is refused in one line and nothing of it enters the scene."""
    from LiverSegExtension.io import InputCase
    from LiverSegExtension.io.records import identity, write_record
    from LiverSegExtension.review.worklist import record_of

    out = small_cohort(tmp_path, 2)
    for i in range(2):
        mask = out / f"p{i}" / "ct_liver.nii.gz"
        write_record(record_of(mask), {"identity": identity(InputCase(tmp_path / "scans" / f"p{i}" / "ct.nii.gz")),
                                       "state": "done", "outputs": [mask.name], "row": {}})
    import csv

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the outputs as a run from tmp_path recorded them: relative, "out/p1/ct_liver.nii.gz"
        row["output"] = str(Path(row["output"]).relative_to(tmp_path))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "p1" / "ct_liver.nii.gz").unlink()
    (out / "p1" / "ct_liver.json").unlink()
    for name in ("ct_liver.nii.gz", "ct_liver.json"):  # p0's mask and record, where the shorter tail points
        (out / name).write_bytes((out / "p0" / name).read_bytes())
    review.open(out, "ann")
    p0, p1 = (next(c for c in review.cases if f"p{i}" in c.key) for i in range(2))
    count = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match=r"the record beside its mask \(.*ct_liver.json\) names another input "
                                            r"\(.*p0.*\), not this CT \(.*p1"):
        review.openCase(p1.key)
    assert scene.GetNumberOfNodes() == count and review.volume is None
    with pytest.raises(LiverSegError, match="p0/ct: more than one mask fits this row"):  # its own, and the copy
        review.openCase(p0.key)
    (out / "ct_liver.nii.gz").unlink()
    assert review.openCase(p0.key).name == "p0/ct" and liver_of(review).any()


def test_accept_is_refused_where_the_model_made_no_mask(tmp_path, scene):
    """The batch failed on p1 (its CT reads): there is nothing to accept. Accept is disabled and refused; drawing
    the liver and Export and next, or Skip, remain."""
    out = small_cohort(tmp_path, 2, failed=(1,))
    module, widget = open_panel()
    try:
        panel = widget.review
        open_folder(panel, out)
        panel.nextButton.click()
        assert panel.review.current.name == "p1/ct" and panel.review.volume is not None
        assert not liver_of(panel.review).any() and not panel.acceptButton.enabled
        with pytest.raises(LiverSegError, match="p1/ct: no model's mask to accept"):
            panel.review.accept()
        assert not ReviewState(out).records()[panel.review.current.key]["decision"]
    finally:
        close_panel(module)


def test_review_errors_are_one_line_and_never_leave_a_slot(tmp_path, scene, monkeypatch):
    """In a Slicer outside testing mode: a case that cannot be read, and a folder where review.csv cannot be
    written (Next case, and the minute's renewal), are told in one line, without a traceback as details, and
    nothing leaves the slot (PythonQt would print the traceback each time)."""
    import qt
    from LiverSegLib.reviewpanel import RENEW_TICKS
    from test_review import unwritable

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    monkeypatch.setattr(slicer.app, "_testing", False)  # tryWithErrorDisplay shows what it catches
    out = small_cohort(tmp_path, 2)
    (tmp_path / "scans" / "p1" / "ct.nii.gz").write_bytes(b"not a CT")
    module, widget = open_panel()
    try:
        panel = widget.review
        open_folder(panel, out)
        panel.nextButton.click()
        assert qt.take_slot_errors() == []
        assert len(shown) == 1 and "ct.nii.gz" in shown[0][0] and shown[0][1] == {}
        assert panel.statusLabel.text == shown[0][0] and "\n" not in shown[0][0]
        assert panel.review.current.name == "p1/ct" and panel.progressLabel.text == "0 of 2 reviewed"
        unwritable(out)
        try:
            panel.reasonEdit.text = "the CT is damaged"
            panel.skipButton.click()
            assert qt.take_slot_errors() == []
            assert shown[-1][0].startswith(f"{out}: cannot lock it for writing") and shown[-1][1] == {}
            panel._ticks = RENEW_TICKS - 1
            panel.timer.timeout()  # the minute's renewal: said on the status line, not a dialog every minute
            assert qt.take_slot_errors() == [] and len(shown) == 2
            assert panel.statusLabel.text.startswith(f"{out}: cannot lock it for writing")
        finally:
            out.chmod(0o755)
    finally:
        close_panel(module)


def test_a_claim_taken_by_another_is_told_and_a_decided_case_reopens_only_as_a_re_review(tmp_path, scene, monkeypatch):
    from LiverSegLib.reviewpanel import RENEW_TICKS

    warned = []
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kwargs: warned.append(text))
    out = small_cohort(tmp_path, 3)
    module, widget = open_panel()
    try:
        panel = widget.review
        widget._parameterNode.annotator = "ann"
        panel.review.claim_minutes = -1.0  # every claim of this Slicer runs out at once: it never renewed in time
        open_folder(panel, out)
        panel.nextButton.click()
        taken = panel.review.current
        bob = ReviewState(out)
        assert bob.claim_next("bob", [taken.key]) == taken.key
        panel._ticks = RENEW_TICKS - 1
        panel.timer.timeout()
        assert len(warned) == 1 and warned[0].startswith("p2/ct: another annotator holds it now")
        assert panel.statusLabel.text == warned[0]
        panel.timer.timeout()
        panel._ticks = RENEW_TICKS - 1
        panel.timer.timeout()
        assert len(warned) == 1  # told once
        bob.decide(taken.key, "bob", "skipped", reason="wrong phase")
        panel.acceptButton.click()
        assert panel.statusLabel.text.startswith("p2/ct: not recorded: already skipped by bob")
        assert ReviewState(out).records()[taken.key]["who"] == "bob"  # bob's decision stays
        asked = []
        monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kwargs: asked.append(text) or False)
        panel.table.emit("cellDoubleClicked", 0, 0)  # the decided case: reopened only if the annotator says so
        assert len(asked) == 1 and "skipped: wrong phase by bob. Review it again?" in asked[0]
        assert not panel.review.again
        monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kwargs: True)
        panel.table.emit("cellDoubleClicked", 0, 0)
        assert panel.review.current.key == taken.key and panel.review.again
        panel.acceptButton.click()
        record = ReviewState(out).records()[taken.key]
        assert (record["decision"], record["who"]) == ("accepted", "ann")
        assert record["previous"].startswith("skipped by bob at ")
    finally:
        close_panel(module)


def test_a_damaged_seg_nrrd_is_one_line_naming_it(tmp_path, scene, review):
    out = make_cohort(tmp_path)
    (out / "seg_liver.seg.nrrd").write_bytes(b"\x00\x01 damaged: not a segmentation any more")
    review.open(out, "ann")
    count = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match=r"seg_liver\.seg\.nrrd: Slicer could not read this segmentation file"):
        review.openCase(next(c.key for c in review.cases if c.name == "seg"))
    assert scene.GetNumberOfNodes() == count


def test_the_review_s_nodes_leave_with_the_panel_and_with_a_closed_scene(tmp_path, scene):
    """The panel cleaned up (Slicer closing, Reload): the open case's nodes leave the scene and it stays claimed;
    the rebuilt panel resumes it with one copy in the scene. A closed scene takes the nodes, and the panel
    notices: Next case loads the case again."""
    out = small_cohort(tmp_path, 2)
    module, widget = open_panel()
    base = scene.GetNumberOfNodes()
    open_folder(widget.review, out)
    widget.review.nextButton.click()
    case, loaded = widget.review.review.current, scene.GetNumberOfNodes()
    assert loaded > base
    close_panel(module)
    assert scene.GetNumberOfNodes() == base
    module, widget = open_panel()
    try:
        panel = widget.review
        assert panel.review.folder == out  # the last folder, opened again
        panel.nextButton.click()
        assert panel.review.current.key == case.key and scene.GetNumberOfNodes() == loaded  # one copy
        scene.Clear(0)
        assert panel.review.current is None and panel.caseLabel.text == ""
        panel.nextButton.click()
        assert panel.review.current.key == case.key and liver_of(panel.review).any()
    finally:
        close_panel(module)


ANNOTATOR = r"""
import json, sys, time
from pathlib import Path
sys.path[:0] = PATHS
import barrier
import slicer_app
scene = slicer_app.install(testing=True)
from LiverSeg import LiverSegLogic
from LiverSegLib.review import ReviewLogic
out, who, other, dataset, sync = sys.argv[1:6]
sync = Path(sync)


def wait_for(name):
    barrier.wait_for(sync, name)


review = ReviewLogic(LiverSegLogic(), scene)
review.open(out, who)
(sync / f"ready-{who}").touch()
wait_for("go")  # both start together
seen, nodes = [], set()
case = review.next()
while case is not None:
    seen.append(case.key)
    nodes.add(scene.GetNumberOfNodes())
    if len(seen) <= 2:  # the first cases paced: each is decided only once the other holds a case of its own
        (sync / f"holds-{who}-{len(seen)}").touch()
        wait_for(f"holds-{other}-{len(seen)}")
    case = review.exportAndNext(dataset, background=False) if len(seen) % 3 == 0 else review.accept()
print("RESULT " + json.dumps({"seen": seen, "nodes": sorted(nodes)}))
"""


def start_together(script: Path, args: dict[str, list[str]], sync: Path) -> dict[str, subprocess.Popen]:
    """The annotators' processes, started, then let go at once when both are ready (a start barrier)."""
    procs = {who: subprocess.Popen([sys.executable, str(script), *extra], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for who, extra in args.items()}
    end = time.monotonic() + 600  # only against a hang
    while not all((sync / f"ready-{who}").exists() for who in procs) and time.monotonic() < end:
        assert all(p.poll() is None for p in procs.values()), [p.stderr.read()[-2000:] for p in procs.values()]
        time.sleep(0.02)
    (sync / "go").touch()
    return procs


@pytest.mark.process
def test_two_annotators_in_two_slicers_on_one_folder(tmp_path):
    """Two processes review one folder through the logic, exporting into one dataset, started together and each
    holding a case while the other does: no case is given to both, no record and no exported case is lost."""
    out = small_cohort(tmp_path, 12)
    paths = [str(ROOT / "Testing" / "StandIns"), str(ROOT / "LiverSegModule"), str(ROOT), str(ROOT / "Testing")]
    script = tmp_path / "annotator.py"
    script.write_text(ANNOTATOR.replace("PATHS", repr(paths), 1))
    sync = tmp_path / "sync"
    sync.mkdir()
    dataset = str(tmp_path / "dataset")
    procs = start_together(script, {"ann": [str(out), "ann", "bob", dataset, str(sync)],
                                    "bob": [str(out), "bob", "ann", dataset, str(sync)]}, sync)
    seen = {}
    for who, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)  # only against a hang
        assert proc.returncode == 0, stderr[-2000:]
        result = json.loads(stdout.split("RESULT ", 1)[1])
        seen[who] = result["seen"]
        assert len(result["nodes"]) == 1  # the same node count on every case
    assert len(seen["ann"]) >= 2 and len(seen["bob"]) >= 2 and not set(seen["ann"]) & set(seen["bob"])
    records = ReviewState(out).records()
    assert len(records) == 12 and all(r["decision"] in ("accepted", "exported") for r in records.values())
    assert all(records[k]["who"] == who for who in seen for k in seen[who])
    exported = [r["dataset_case"] for r in records.values() if r["decision"] == "exported"]
    meta = json.loads((tmp_path / "dataset" / "dataset.json").read_text())
    assert exported and sorted(exported) == sorted(meta["cases"])  # every export in the dataset, once


def test_the_review_section_of_the_panel(tmp_path, scene, monkeypatch):
    import qt

    out = small_cohort(tmp_path, 3)
    qt.QSettings().setValue("LiverSeg/ReviewFolder", "")  # no folder of an earlier session to open again
    module, widget = open_panel()
    try:
        panel = widget.review
        assert panel.section.text == "Review"
        assert not panel.nextButton.enabled
        widget._parameterNode.annotator = "ann"
        open_folder(panel, out)
        assert panel.table.rowCount == 3 and panel.table.item(0, 0).text() == "p2/ct"
        assert [panel.table.item(r, 3).text() for r in range(3)] == ["0.020", "0.010", "0.000"]
        assert panel.progressLabel.text == "0 of 3 reviewed" and panel.nextButton.enabled
        panel.table.emit("cellDoubleClicked", 1, 0)  # one click to a case
        assert panel.review.current.name == "p1/ct"
        assert widget._parameterNode.inputVolume.GetID() == panel.review.volume.GetID()
        assert widget._parameterNode.outputSegmentation.GetID() == panel.review.segmentation.GetID()
        assert panel.table.item(1, 5).text() == "open" and panel.acceptButton.enabled
        assert not panel.skipButton.enabled  # a skip needs its reason
        panel.acceptButton.click()
        assert panel.progressLabel.text == "1 of 3 reviewed" and panel.review.current.name == "p2/ct"
        panel.reasonEdit.text = "contrast phase not wanted"
        panel.skipButton.click()
        assert panel.progressLabel.text == "2 of 3 reviewed" and panel.reasonEdit.text == ""
        panel.pendingCheckBox.click()
        assert panel.table.rowCount == 1 and panel.table.item(0, 0).text() == "p0/ct"
        assert ReviewState(out).records()[panel.review.cases[0].key]["reason"] == "contrast phase not wanted"
    finally:
        close_panel(module)


@pytest.mark.process
def test_export_and_next_in_the_engine_process_records_its_provenance(tmp_path, scene, slicer_launcher):
    """The panel's path: the export's compression runs in the engine process while the next case loads."""
    out = small_cohort(tmp_path, 3)
    module, widget = open_panel()
    try:
        panel = widget.review
        widget._parameterNode.annotator = "ann"
        widget.ui.exportFolderPathLineEdit.currentPath = str(tmp_path / "dataset")
        open_folder(panel, out)
        panel.nextButton.click()
        first = panel.review.current
        panel.exportButton.click()
        assert panel.review.current.name == "p1/ct" and panel.review.exporting
        assert panel.table.item(0, 5).text() == "exporting"
        second = panel.review.current
        panel.exportButton.click()  # again at once: the first export is finished before the second starts
        assert panel.review.current.name == "p0/ct"
        end = time.monotonic() + 600  # only against a hang: an export takes seconds
        while panel.review.exporting and time.monotonic() < end:
            panel.timer.timeout()
            time.sleep(0.05)
        assert not panel.review.exporting, "the export never finished"
        records = ReviewState(out).records()
        record = records[first.key]
        assert record["decision"] == "exported" and float(record["dice_changed"]) == 1.0
        assert records[second.key]["decision"] == "exported"
        provenance = json.loads((tmp_path / "dataset" / "provenance" / f"{record['dataset_case']}.json").read_text())
        assert provenance["review"]["row"]["output"] == str(out / "p2" / "ct_liver.nii.gz")
        assert provenance["annotator"] == "ann" and provenance["draft_final_dice"] == 1.0
        assert "exported as" in panel.statusLabel.text and panel.progressLabel.text == "2 of 3 reviewed"
        assert widget.ui.fineTuneDatasetInfoLabel.text.startswith("2 case(s)")  # Fine-tune sees the dataset
        assert panel.review.exporter is not widget.logic and panel.review.exporter._engine is not None
        assert widget.logic._engine is None  # the panel's own engine was never used by the review
    finally:
        close_panel(module)


@pytest.mark.slow
@requires_shared
@requires_bundled_model
def test_a_real_cohort_segmented_by_the_cli_is_reviewed(tmp_path, scene, review):
    """chaos_ct3 (a DICOM series, its mask a DICOM SEG) and ts_a (a NIfTI file, with its probability map),
    segmented by the real engine into one folder, then reviewed: each mask lands exactly where the file has it."""
    from LiverSegExtension.cli import main

    out = tmp_path / "out"
    assert main(["segment", str(SHARED / "dicom" / "chaos_ct3"), "-o", str(out), "--format", "dicom-seg", "-q"]) == 0
    ts_a = SHARED / "liver-train" / "imagesTr" / "ts_a.nii.gz"
    assert main(["segment", str(ts_a), "-o", str(out), "--probabilities", "-q"]) == 0
    review.open(out, "ann")
    seen = {}
    case = review.next()
    while case is not None:
        liver = liver_of(review)
        if case.mask.name.endswith(".dcm"):
            import highdicom as hd

            assert int(liver.sum()) == int(np.asarray(hd.seg.segread(case.mask).pixel_array).sum())
        else:
            assert int(liver.sum()) == int(sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))).sum())
            assert review.logic.uncertainBand(review.segmentation, review.volume).any()
        assert abs(int(liver.sum()) * float(np.prod(review.volume.GetSpacing())) / 1000 - case.liver_ml) < 1.0
        seen[case.name] = liver.sum()
        case = review.exportAndNext(tmp_path / "dataset", background=False)
    assert sorted(seen) == ["chaos_ct3", "ts_a"] and all(v > 0 for v in seen.values())
    assert review.progress() == (2, 2)
