"""Time from "Export and next" to the next case loaded, in the Review section's real path.

    python benchmarks/review_next.py [--cases 6] [--probabilities]

A batch output folder of CTs of 512 x 512 x 130 (chaos_ct3 from ../shared/data resampled, real HU, each case
shifted a few HU so that no two exports are the same case; a synthetic CT of that size when the data is absent),
each with its mask as ``liverseg segment`` writes it (``.nii.gz``; the bundled model's mask when it is installed,
else the phantom's liver) and, with --probabilities, its probability map. The review runs on slicer-core's real
MRML with the stand-ins: each "Export and next" writes the raw export files and hands them to the warm engine
process (which compresses them meanwhile), removes the case's nodes and loads the next case: CT through
Slicer's volume reader, mask as the Liver segment with its 3D surface, views centred. The time until that
returns is what the annotator waits; the export's own time in the engine process is printed beside it. The
export is waited for before the next click, as an annotator looks at a case for longer than it takes. Prints one
JSON line per click, then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
for path in (ROOT / "Testing", ROOT / "Testing" / "StandIns", ROOT / "LiverSegModule", ROOT):
    sys.path.insert(0, str(path))


def make_folder(folder: Path, cases: int, probabilities: bool) -> str:
    """The batch output folder (summary.csv and masks) and its CTs; what the CT is."""
    import numpy as np
    import SimpleITK as sitk
    from slicer_click import ct_512x512

    from LiverSegExtension import io
    from LiverSegExtension.model.catalog import default_model_dir

    image, liver, what = ct_512x512(130)
    probability = None
    if default_model_dir() is not None:
        from LiverSegExtension.inference.segmenter import LiverSegmenter

        result = LiverSegmenter(None, device="cpu").segment_image(image, probabilities=True)
        liver, probability, what = result.mask, result.probability, f"{what}, the bundled model's mask"
    elif liver is None:
        raise SystemExit("no synthetic liver and no model to make a mask with")
    rows = []
    for i in range(cases):
        ct = folder / "scans" / f"p{i}" / "ct.nii.gz"
        mask = folder / "out" / f"p{i}" / "ct_liver.nii.gz"
        mask.parent.mkdir(parents=True, exist_ok=True)
        ct.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image + i, str(ct), True)  # each patient's own voxels
        labelled = sitk.GetImageFromArray(np.asarray(liver, np.uint8))
        labelled.CopyInformation(image)
        sitk.WriteImage(labelled, str(mask), True)
        if probabilities and probability is not None:
            mapped = sitk.GetImageFromArray(np.asarray(probability, np.uint8))
            mapped.CopyInformation(image)
            sitk.WriteImage(mapped, str(mask.with_name("ct_liver_prob.nii.gz")), True)
        rows.append({**io.summary_row(str(ct), str(mask)), "uncertainty": f"{0.5 - i / 100:.3f}"})
    io.write_summary(folder / "out" / "summary.csv", rows)
    return what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="cases in the folder (one click fewer is timed)")
    parser.add_argument("--probabilities", action="store_true", help="a probability map beside each mask")
    args = parser.parse_args()

    import slicer_app

    scene = slicer_app.install(testing=True)
    from LiverSeg import LiverSegLogic
    from LiverSegLib.review import ReviewLogic

    with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
        folder = Path(tmp)
        launcher = folder / "bin" / "PythonSlicer"  # CTK's launcher, as Slicer has it on its PATH
        launcher.parent.mkdir()
        stand_in = ROOT / "Testing" / "StandIns" / "python_launcher.py"
        launcher.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(stand_in)!r}, run_name='__main__')\n")
        launcher.chmod(0o755)
        os.environ["PATH"] = f"{launcher.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        what = make_folder(folder, args.cases, args.probabilities)
        scene.AddNewNodeByClass("vtkMRMLSliceNode")
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        logic = LiverSegLogic()
        review = ReviewLogic(logic, scene)
        review.open(folder / "out", "bench")
        engine = logic.engine()  # warm, as it is after the first segmentation or export
        while engine.ready is None and engine.running:
            engine.wait_for_output(50)
            engine.read()
        start = time.perf_counter()
        review.next()
        first = time.perf_counter() - start
        print(json.dumps({"first_case_s": round(first, 3), "ct": what, "probabilities": args.probabilities}))
        times = []
        while review.current is not None:
            start = time.perf_counter()
            case = review.exportAndNext(folder / "dataset", background=True)
            waited = time.perf_counter() - start
            begun = time.perf_counter()
            messages = review.pollExports(wait=True)
            if case is not None:  # the last click opens nothing: not a transition to a case
                times.append(waited)
            print(json.dumps({"export_and_next_s": round(waited, 3), "next": case.name if case else None,
                              "export_in_engine_s": round(time.perf_counter() - begun, 3), "export": messages}))
        logic.shutdown()
    print(json.dumps({"median_export_and_next_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "max_s": round(max(times), 3), "clicks": len(times)}))


if __name__ == "__main__":
    main()
