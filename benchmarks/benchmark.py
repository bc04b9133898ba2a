"""Per-stage time and peak memory of LiverSeg on a real CT and a large synthetic one.

    python benchmarks/benchmark.py [--model DIR] [--device cpu] [--baseline]

Each case runs in its own process so that peak memory (max RSS) is that case's alone; the baseline RSS
after loading torch and the model is printed too. ``--baseline`` also times a standard MONAI pipeline
(UNet 16-256 channels, 1.5 x 1.5 x 2 mm, 160^3 sliding windows, untrained weights: only time matters).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_ct(shape_kji):
    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "Testing"))
    from synthetic import LIVER_CENTER_RAS, make_affine

    spacing = (0.78, 0.78, 1.0 if shape_kji[0] > 200 else 2.5)
    m = make_affine(spacing, shape_kji)
    ct = np.full(shape_kji, -1000, np.int16)
    # body and liver, slice by slice (no full-volume float temporaries)
    j, i = np.mgrid[0 : shape_kji[1], 0 : shape_kji[2]]
    for k in range(shape_kji[0]):
        ras = (m @ np.stack([i, j, np.full_like(i, k), np.ones_like(i)]).reshape(4, -1)).reshape(4, *i.shape)[:3]
        body = (ras[0] / 160) ** 2 + (ras[1] / 120) ** 2 <= 1
        liver = ((ras[0] - LIVER_CENTER_RAS[0]) / 80) ** 2 + ((ras[1] - 10) / 70) ** 2 + ((ras[2] - 20) / 70) ** 2 <= 1
        ct[k][body] = 40
        ct[k][liver] = 110
    image = sitk.GetImageFromArray(ct)
    from LiverSegExtension.geometry import set_geometry

    set_geometry(image, m)
    return image


def run_case(name: str, model: str | None, device: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from LiverSegExtension.inference.segmenter import LiverSegmenter
    from LiverSegExtension.io import read_image

    t0 = time.perf_counter()
    if name == "chaos_ct3":
        image = read_image(SHARED / "dicom" / "chaos_ct3")
    else:
        image = synthetic_ct(tuple(int(v) for v in name.split("x")[::-1]))
    t_read = time.perf_counter() - t0
    seg = LiverSegmenter(model, device=device)
    seg.segment_image(image)  # warm-up (first-call allocations, thread pools)
    base = rss_mb()
    result = seg.segment_image(image)
    return {"case": name, "size": list(image.GetSize()), "read_s": round(t_read, 2), "seconds": round(result.seconds, 2),
            "stages": {k: round(v, 2) for k, v in result.timings.items()}, "liver_ml": round(result.liver_ml, 1),
            "rss_before_mb": round(base), "peak_rss_mb": round(rss_mb())}


def run_baseline(name: str) -> dict:
    """A standard MONAI pipeline for scale: Spacing 1.5x1.5x2 mm, UNet 16..256, 160^3 windows."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ScaleIntensityRange, Spacing

    torch.set_grad_enabled(False)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).eval()
    path = SHARED / "dicom" / "chaos_ct3"
    t0 = time.perf_counter()
    pre = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS"), Spacing((1.5, 1.5, 2.0)),
                   ScaleIntensityRange(-200, 300, 0, 1, clip=True)])
    x = pre(str(path))[None]
    t1 = time.perf_counter()
    y = sliding_window_inference(x, (160, 160, 160), 1, net, overlap=0.25)
    t2 = time.perf_counter()
    return {"case": f"baseline:{name}", "preprocess_s": round(t1 - t0, 2), "inference_s": round(t2 - t1, 2),
            "seconds": round(t2 - t0, 2), "output": list(y.shape), "peak_rss_mb": round(rss_mb())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", default="chaos_ct3,512x512x130,512x512x500")
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        out = run_baseline(args.one[9:]) if args.one.startswith("baseline:") else run_case(args.one, args.model, args.device)
        print(json.dumps(out))
        return
    cases = [c for c in args.cases.split(",") if c != "chaos_ct3" or (SHARED / "dicom" / "chaos_ct3").is_dir()]
    if args.baseline and (SHARED / "dicom" / "chaos_ct3").is_dir():
        cases.append("baseline:chaos_ct3")
    print(f"LiverSeg benchmark on {os.cpu_count()} CPU core(s), device {args.device}")
    for case in cases:
        cmd = [sys.executable, __file__, "--one", case, "--device", args.device] + (["--model", args.model] if args.model else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{case}: failed\n{r.stderr[-2000:]}")
            continue
        print(json.dumps(json.loads(r.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
