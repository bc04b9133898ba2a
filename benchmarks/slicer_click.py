"""Time from a click on "Segment Liver" to the Liver segment in the scene, through the panel's real path.

    python benchmarks/slicer_click.py [--clicks 4] [--device cpu]

The panel is built on slicer-core's real MRML with the Qt stand-in of Testing/StandIns (its QProcess runs
the real engine process, as qt.QProcess does in Slicer); its 100 ms timer is fired every 100 ms, as
Slicer's event loop would. The first click starts the engine process (ONNX Runtime and the model loaded
there; with --device cuda, torch); later clicks reuse it. The CT is chaos_ct3 from ../shared/data
resampled to 512 x 512 x 129 (real HU),
or a synthetic CT of that size when the data is absent. Prints one JSON line per click.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
for path in (ROOT / "Testing", ROOT / "Testing" / "StandIns", ROOT / "LiverSegModule", ROOT):
    sys.path.insert(0, str(path))


def ct_512x512(slices: int = 129):
    """(CT, its true liver or None, what it is): chaos_ct3 from ../shared/data resampled to 512 x 512 x ``slices``
    (real HU), or a synthetic CT of that size when the data is absent. ``review_next.py`` uses it too."""
    import SimpleITK as sitk

    from LiverSegExtension.io import read_image

    series = SHARED / "dicom" / "chaos_ct3"
    if series.is_dir():
        image = read_image(series)
        size, spacing = image.GetSize(), image.GetSpacing()
        ref = sitk.Image([size[0], size[1], slices], image.GetPixelID())
        ref.SetSpacing([spacing[0], spacing[1], spacing[2] * (size[2] - 1) / (slices - 1)])
        ref.SetOrigin(image.GetOrigin())
        ref.SetDirection(image.GetDirection())
        return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024), None, "chaos_ct3 resampled"
    from synthetic import phantom_image

    image, liver = phantom_image(shape_kji=(slices, 512, 512), spacing=(0.75, 0.75, 2.0))
    return image, liver, "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import tempfile

    import python_launcher
    import slicer_app

    scene = slicer_app.install(testing=True)
    python_launcher.put_on_path(Path(tempfile.mkdtemp(prefix="LiverSeg-launcher-")))  # PythonSlicer, as in Slicer
    import LiverSeg
    import slicer

    from LiverSegExtension.geometry import ijk_to_ras_of

    image, _, what = ct_512x512(129)
    import SimpleITK as sitk

    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=ijk_to_ras_of(image), name="CT")
    from slicer.ScriptedLoadableModule import ModulePanel

    module = ModulePanel(LiverSeg.LiverSegWidget)
    widget = module.setup()
    module.enter()
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    widget.ui.deviceComboBox.setCurrentIndex(widget.ui.deviceComboBox.findData(args.device))
    try:
        for click in range(1, args.clicks + 1):
            t0 = time.perf_counter()
            widget.ui.applyButton.click()
            first_progress = shown = None
            while widget._timer.isActive():
                time.sleep(0.1)  # the timer's interval
                widget._timer.timeout()
                if first_progress is None and widget.ui.progressBar.value > 0:
                    first_progress = time.perf_counter() - t0
                if shown is None and widget._run is None:  # the segment is in the scene; its 3D surface comes next
                    shown = time.perf_counter() - t0
            seconds = time.perf_counter() - t0
            seg = widget._parameterNode.outputSegmentation
            print(json.dumps({"click": click, "ct": what, "size": list(image.GetSize()), "shown_s": round(shown or seconds, 2),
                              "with_surface_s": round(seconds, 2),
                              "first_progress_s": round(first_progress or seconds, 2),
                              "status": widget.ui.statusLabel.text,
                              "segment": bool(seg and seg.GetSegmentation().GetSegmentIdBySegmentName("Liver")),
                              "nodes": scene.GetNumberOfNodes()}), flush=True)
    finally:
        widget.cleanup()


if __name__ == "__main__":
    main()
