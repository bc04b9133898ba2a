"""The module's self-test, as Slicer runs it: ``slicer.testing.runUnitTest`` (``slicer_add_python_unittest``)
loads the ``test_*`` methods with unittest; "Reload and Test" and the SelfTests module call ``runTest()``
(``ScriptedLoadableModule.runTest``: no unittest result, so an exception there is a failure). It segments a
CT through the engine process, as the panel does (never in Slicer's process), and checks segment,
terminology, colour and geometry. Without the packages it needs (an extension build machine) every test is
skipped, saying what to install: unittest records the skip; ``runTest()`` shows it and returns.
"""

from __future__ import annotations

import os
import unittest
from pathlib import Path

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from LiverSegLib import resource_path


def missing_for_self_test() -> list[str]:
    """What the engine process needs to segment on the CPU and is not installed."""
    from LiverSegLib.dependencies import missing_packages

    return missing_packages("cpu")


class LiverSegTest(ScriptedLoadableModuleTest):
    """Self-test: segment a CT through the engine process; check segment, terminology, colour and geometry."""

    def setUp(self) -> None:
        missing = missing_for_self_test()
        if missing:
            self.skipTest(f"LiverSeg self-test skipped: install {', '.join(missing)} (click 'Segment Liver' once and "
                          "accept the installation)")
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        """What "Reload and Test" calls: every test, each after its setUp. A skip is shown, not raised: Slicer
        would report it as an error and the SelfTests module count it as failed."""
        try:
            for name in sorted(n for n in dir(self) if n.startswith("test_")):
                self.setUp()
                getattr(self, name)()
        except unittest.SkipTest as skip:
            self.delayDisplay(str(skip))

    def _load_ct(self):
        """A real CT: the TotalSegmentator example when the shared data is there, else a synthetic one."""
        data = Path(os.environ.get("LIVERSEG_SHARED_DATA", resource_path().parent.parent / "shared" / "data"))
        path = data / "liver-train" / "imagesTr" / "ts_a.nii.gz"
        if path.is_file():
            return slicer.util.loadVolume(str(path))
        k, j, i = np.mgrid[0:60, 0:110, 0:120].astype(np.float32)
        ct = np.where(((i - 60) / 55) ** 2 + ((j - 55) / 45) ** 2 <= 1, 30, -1000).astype(np.int16)
        ct[(((i - 38) / 18) ** 2 + ((j - 50) / 15) ** 2 + ((k - 30) / 12) ** 2) <= 1] = 160
        return slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-3.0, -3.0, 5.0, 1.0]), name="synthetic CT")

    def test_LiverSeg_segments_a_ct(self) -> None:
        from LiverSegExtension.io import LIVER_SEGMENT
        from LiverSegLib.logic import LiverSegLogic
        from LiverSegLib.mrml import segment_mask, segment_terminology

        self.delayDisplay("Loading a CT")
        volume = self._load_ct()
        logic = LiverSegLogic()
        try:
            self.delayDisplay("Segmenting through the engine process")
            run = logic.start(volume, None, "cpu")
            self.assertTrue(run.wait(300), "the engine process did not finish in 5 minutes")
            result = logic.finish(run)
        finally:
            logic.shutdown()
        seg = result.segmentation_node
        segment = seg.GetSegmentation().GetSegment(result.segment_id)
        self.assertEqual(segment.GetName(), "Liver")
        term = segment_terminology(segment)
        self.assertIn("SCT^123037004^Anatomical Structure", term)
        self.assertIn("SCT^10200004^Liver", term)
        self.assertEqual([round(c * 255) for c in segment.GetColor()], list(LIVER_SEGMENT["color"]))
        self.assertEqual(seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID(), volume.GetID())
        mask = segment_mask(seg, result.segment_id, volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertAlmostEqual(result.liver_ml, float(mask.sum()) * np.prod(volume.GetSpacing()) / 1000, delta=1.0)
        self.assertIn("on cpu", result.runtime)
        self.delayDisplay(f"Liver: {result.liver_ml:.0f} mL ({result.runtime})")
