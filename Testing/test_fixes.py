"""One-click fixes: the engine's functions on synthetic masks, and the panel's buttons on slicer-core's real
MRML (a leak through a neck removed by one click, a lobe the threshold cut restored by one click, undo,
other segments untouched, the fixes recorded for the export and kept with a saved scene)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.inference.fixes import add_here, remove_here

slicer = pytest.importorskip("slicer")

Z, Y, X = np.mgrid[:60, :70, :110]
LIVER = ((Z - 30) ** 2 + (Y - 35) ** 2 + (X - 35) ** 2) <= 18**2
NECK = ((Z - 30) ** 2 + (Y - 35) ** 2 <= 2**2) & (X >= 50) & (X <= 72)
LEAK = ((Z - 30) ** 2 + (Y - 35) ** 2 + (X - 82) ** 2) <= 10**2
LOBE = (((Z - 30) ** 2 + (Y - 35) ** 2 + (X - 58) ** 2) <= 9**2) & ~LIVER


def test_remove_here_cuts_a_leak_at_its_neck_and_nothing_else():
    mask = (LIVER | NECK | LEAK).astype(np.uint8)
    fixed, removed = remove_here(mask, (30, 35, 85))
    kept = fixed.astype(bool)
    assert (kept & LIVER).sum() == LIVER.sum() and not (kept & LEAK).any()
    assert removed == mask.sum() - fixed.sum() and (kept & ~LIVER).sum() <= NECK.sum()
    with pytest.raises(LiverSegError, match="not in the mask"):
        remove_here(mask, (0, 0, 0))
    with pytest.raises(LiverSegError, match="no neck found"):
        remove_here(LIVER.astype(np.uint8), (30, 35, 35))


def test_add_here_restores_the_region_the_threshold_cut():
    probability = np.zeros(LIVER.shape, np.uint8)
    probability[LIVER] = 250
    probability[LOBE] = 90  # p = 0.35: below the 0.5 threshold, above 0.1
    fixed, added = add_here(LIVER.astype(np.uint8), probability, (30, 35, 62))
    assert np.array_equal(fixed.astype(bool), LIVER | LOBE) and added == LOBE.sum()
    with pytest.raises(LiverSegError, match="below 0.1: nothing to add here"):
        add_here(LIVER.astype(np.uint8), probability, (30, 35, 100))


def test_the_panel_fixes_undoes_records_and_keeps_them(scene, tmp_path):
    from conftest import close_panel, open_panel
    from LiverSegLib import mrml

    from LiverSegExtension.inference import masktext

    matrix = np.diag([-1.5, -1.5, 2.0, 1.0])
    ct = np.where(LIVER | NECK | LEAK | LOBE, 60, -900).astype(np.int16)
    volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=matrix, name="ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct liver")
    mrml.write_liver_segment(segmentation, volume, (LIVER | NECK | LEAK).astype(np.uint8))
    other = np.zeros(LIVER.shape, np.uint8)
    other[5:10, 5:10, 5:10] = 1
    mrml.write_segment(segmentation, volume, other, "Kidney", (10, 200, 10))
    # What a run leaves on the node: its draft and the band where it hesitated (the lobe)
    segmentation.SetAttribute(mrml.DRAFT_ATTRIBUTE, masktext.encode_mask((LIVER | NECK | LEAK).astype(np.uint8)))
    segmentation.SetAttribute(mrml.UNCERTAIN_ATTRIBUTE, masktext.encode_mask(LOBE.astype(np.uint8)))
    crosshair = scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    module, widget = open_panel()
    try:
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        widget.ui.outputSegmentationSelector.setCurrentNode(segmentation)
        widget._updateButtons()
        assert widget.ui.addHereButton.enabled and widget.ui.removeHereButton.enabled
        assert not widget.ui.undoFixButton.enabled

        def liver():
            return mrml.segment_mask(segmentation, mrml.find_liver_segment(segmentation), volume).astype(bool)

        def at(k, j, i):
            crosshair.SetCrosshairRAS(*(matrix @ [i, j, k, 1.0])[:3])

        at(30, 35, 85)  # in the leak
        widget.ui.removeHereButton.click()
        assert not (liver() & LEAK).any() and (liver() & LIVER).sum() == LIVER.sum()
        assert widget.ui.statusLabel.text.startswith("Removed ") and "mL at the crosshair" in widget.ui.statusLabel.text
        kidney = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Kidney")
        assert np.array_equal(mrml.segment_mask(segmentation, kidney, volume), other)  # left alone
        after_remove = liver()
        at(30, 35, 58)  # in the lobe
        widget.ui.addHereButton.click()
        assert (liver() & LOBE).sum() == LOBE.sum()
        fixes = json.loads(segmentation.GetAttribute("LiverSeg.Fixes"))
        assert [f["fix"] for f in fixes] == ["remove", "add"] and fixes[0]["ml"] < 0 < fixes[1]["ml"]
        assert widget.ui.undoFixButton.enabled
        widget.ui.undoFixButton.click()
        assert np.array_equal(liver(), after_remove) and widget.ui.statusLabel.text == "The last fix was undone."
        assert [f["fix"] for f in json.loads(segmentation.GetAttribute("LiverSeg.Fixes"))] == ["remove"]
        # The export lists the fixes as the annotator's corrections.
        name = widget.logic.exportForTraining(volume, segmentation, tmp_path / "dataset")
        card = json.loads((tmp_path / "dataset" / "dataset.json").read_text())["cases"][name]
        assert [f["fix"] for f in card["one_click_fixes"]] == ["remove"]
        # Saved and reloaded, the node still carries what Add here needs, and the record of fixes.
        scene.SetURL(str(tmp_path / "scene.mrml"))
        assert scene.Commit()
        reloaded = slicer.vtkMRMLScene()
        reloaded.SetURL(str(tmp_path / "scene.mrml"))
        reloaded.Import()
        node = reloaded.GetFirstNodeByName("ct liver")
        assert masktext.decode_mask(node.GetAttribute(mrml.UNCERTAIN_ATTRIBUTE), LIVER.shape).sum() == LOBE.sum()
        assert json.loads(node.GetAttribute("LiverSeg.Fixes"))[0]["fix"] == "remove"
    finally:
        close_panel(module)
