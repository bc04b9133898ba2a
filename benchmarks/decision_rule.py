"""Decision rules scored offline on the fine stage's probabilities: threshold, what is resampled, ensembles.

Each case is segmented once by the model (``--model``; the bundled one by default); the fine stage's probabilities on its last
(grown) box are kept, with those of a second model (``--second``, v1.0.0 from git history) run on the same
resampled volume. Every rule is then applied offline, exactly as the segmenter would apply it:

* ``p>=t``: the liver probability shifted on the logit scale so that ``t`` becomes 0.5
  (``sigmoid(logit(p) - logit(t))``, what a card's ``"decision": {"threshold": t}`` does), then the usual
  body / holes / linear resampling of probabilities onto the input grid, and 0.5 there;
* ``logit>=t``: the same body and holes, but the logits (clipped at +-LOGIT_CLIP) resampled instead;
* ``ens``: the mean of the two models' probabilities before either.

Validation cases (never trained on) and trained-on cases are reported apart, never mixed.

    python scripts/corrected_liver_train.py ../shared/data/liver-train runs/liver-train-corrected
    mkdir -p runs/liverseg-v1.0.0 && for f in card.json model.onnx model.safetensors; do \
        git show 2fb6ce9~1:Resources/Models/liverseg-v1.0.0/$f > runs/liverseg-v1.0.0/$f; done
    mkdir -p runs/liverseg-v1.1.0 && for f in card.json model.onnx model.safetensors; do \
        git show 158bed8:Resources/Models/liverseg-v1.1.0/$f > runs/liverseg-v1.1.0/$f; done
    nice -n 19 python benchmarks/decision_rule.py --data runs/liver-train-corrected --model runs/liverseg-v1.1.0 \
        --out runs/decision_rule
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LiverSegExtension.data.metrics import case_metrics  # noqa: E402
from LiverSegExtension.data.msd import load_msd  # noqa: E402
from LiverSegExtension.geometry import Grid, canonical, index_box, to_original_order  # noqa: E402
from LiverSegExtension.inference.segmenter import LiverSegmenter  # noqa: E402

VALIDATION = ["ts_a", "lits_117_crop", "ircad_e05", "ircad_e12"]
THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3)
LOGIT_CLIP = 14.0
KEYS = ("dice", "nsd_2mm", "hd95_mm", "volume_error_pct")


class _Recording(LiverSegmenter):
    """The segmenter, keeping the fine stage's last box: its grid, volume (HU) and probabilities."""

    def _segment_box(self, image, lower, upper):
        grid, volume, prob = super()._segment_box(image, lower, upper)
        self.last = (grid, volume, prob)
        return grid, volume, prob


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def shifted(prob: np.ndarray, t: float) -> np.ndarray:
    """Probabilities whose 0.5 is ``prob``'s ``t``: a bias on the logit scale."""
    return (1.0 / (1.0 + np.exp(-(logit(prob) - logit(t))))).astype(np.float32)


def paste_logits(image: sitk.Image, grid: Grid, cleaned: np.ndarray) -> np.ndarray:
    """``[k, j, i]`` mask on the canonical input grid: the cleaned probabilities' logits resampled there, >= 0."""
    mask = np.zeros(image.GetSize()[::-1], np.uint8)
    support = np.nonzero(cleaned)
    if support[0].size == 0:
        return mask
    first = np.array([int(a.min()) for a in support][::-1]) - 1
    last = np.array([int(a.max()) for a in support][::-1]) + 1
    lo, hi = index_box(image, grid.index_to_physical(first), grid.index_to_physical(last), margin_vox=1)
    lg = sitk.GetImageFromArray(np.clip(logit(cleaned), -LOGIT_CLIP, LOGIT_CLIP).astype(np.float32))
    lg.SetOrigin(grid.origin)
    lg.SetSpacing(grid.spacing)
    ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    sub = sitk.GetArrayFromImage(sitk.Resample(lg, ref, sitk.Transform(), sitk.sitkLinear, -LOGIT_CLIP, sitk.sitkFloat32))
    mask[tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))] = sub >= 0.0
    return mask


def apply_rule(seg: LiverSegmenter, original: sitk.Image, grid: Grid, prob: np.ndarray, t: float,
               resample: str) -> np.ndarray:
    """The mask a rule gives, ``[k, j, i]`` on ``original``'s grid."""
    image = canonical(original)
    p = shifted(prob, t) if t != 0.5 else prob
    cleaned = seg.clean(p, seg._body(p))
    if resample == "logit":
        mask = paste_logits(image, grid, cleaned)
    else:
        mask = np.zeros(image.GetSize()[::-1], np.uint8)
        seg._paste(image, grid, cleaned, mask)
    return to_original_order(mask, image, original)


def collect(args: argparse.Namespace) -> dict[str, dict]:
    """Per case: the image, the label, the fine grid and both models' probabilities, and the first model's own mask."""
    first = _Recording(args.model, device="cpu")
    second = LiverSegmenter(args.second, device="cpu")
    out = {}
    for case in load_msd(args.data):
        image, label = case.read()
        result = first.segment_image(image, source=case.name)
        grid, volume, prob = first.last
        own_second = second.segment_image(image, source=case.name).mask
        out[case.name] = {"image": image, "ref": sitk.GetArrayFromImage(label) > 0, "grid": grid,
                          "p1": prob, "p2": second.predict("fine", volume), "mask": result.mask,
                          "second_mask": own_second, "seconds": result.seconds}
        print(f"{case.name}: segmented ({result.seconds:.2f} s)", flush=True)
    return out


def rules(thresholds: tuple[float, ...]) -> list[tuple[str, str, float, str]]:
    """(name, probabilities, threshold, what is resampled)."""
    out = [(f"v1.1 p>={t}", "p1", t, "prob") for t in thresholds]
    out += [(f"v1.1 logit>={t}", "p1", t, "logit") for t in thresholds]
    out += [(f"ens p>={t}", "ens", t, "prob") for t in thresholds]
    out += [(f"ens logit>={t}", "ens", t, "logit") for t in thresholds[:3]]
    out += [("v1.0 (v1.1's box) p>=0.5", "p2", 0.5, "prob")]
    return out


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Per rule and group: means of the metrics, the mean volume bias, and the worst case's volume error."""
    out = []
    for group in ("validation", "trained-on"):
        for name in names:
            rs = [r for r in rows if r["rule"] == name and r["group"] == group]
            if not rs:
                continue
            s = {"rule": name, "group": group, "n": len(rs)}
            s.update({k: round(float(np.nanmean([r[k] for r in rs])), 4) for k in KEYS})
            s["min_dice"] = round(min(r["dice"] for r in rs), 4)
            s["max_abs_volume_error_pct"] = round(max(abs(r["volume_error_pct"]) for r in rs), 2)
            out.append(s)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="MSD folder (the corrected liver-train)")
    p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--second", type=Path, default=ROOT / "runs/liverseg-v1.0.0", help="the ensemble's other model")
    p.add_argument("--out", type=Path, required=True, help="folder for per_case.csv and summary.json")
    args = p.parse_args(argv)
    data = collect(args)
    table = rules(THRESHOLDS)
    scorer = LiverSegmenter(args.model, device="cpu")  # its clean/_body/_paste apply the rules
    rows = []
    for name, d in data.items():
        spacing = d["image"].GetSpacing()[::-1]
        group = "validation" if name in VALIDATION else "trained-on"
        probs = {"p1": d["p1"], "p2": d["p2"], "ens": (d["p1"] + d["p2"]) / 2}
        for rule, which, t, resample in table:
            mask = apply_rule(scorer, d["image"], d["grid"], probs[which], t, resample)
            if rule == "v1.1 p>=0.5":  # the rule the segmenter applies: it must give its mask exactly
                assert np.array_equal(mask, d["mask"]), f"{name}: offline rule differs from the segmenter"
            rows.append({"case": name, "group": group, "rule": rule,
                         **case_metrics(mask > 0, d["ref"], spacing)})
        rows.append({"case": name, "group": group, "rule": "v1.0 own run",
                     **case_metrics(d["second_mask"] > 0, d["ref"], spacing)})
        print(f"{name}: scored", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cols = ["case", "group", "rule", "dice", "nsd_2mm", "hd95_mm", "msd_mm", "pred_ml", "ref_ml", "volume_error_pct"]
    with open(args.out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    summary = summarise(rows, [r[0] for r in table] + ["v1.0 own run"])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for s in summary:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
