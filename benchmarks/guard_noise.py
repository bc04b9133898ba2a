"""How much the regression guard's Dice moves when nothing was learnt: the noise its rules must tolerate.

    python benchmarks/guard_noise.py --out runs/guard-noise [--seeds 0,1,2] [--iterations 2]

The bundled model is fine-tuned with the default recipe, for a couple of iterations only (too few to learn
anything), on three labelled scans used as "corrections" (all trained on), with seeds 0, 1, 2. Each run's
guard scores the parent and the new model on the parent's validation cases and on the trained-on
corrections; the changes of each group's mean Dice are the noise. The parent is scored in every run: its
scores, run to run, show whether scoring itself is deterministic. Prints one JSON line per seed and a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LiverSegExtension.data.dataset import add_case  # noqa: E402
from LiverSegExtension.model.catalog import default_model_dir  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "liver-train"
CORRECTIONS = ("ircad_e02", "ircad_e03", "ircad_e04")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, default=2)
    args = p.parse_args(argv)
    corrections = args.out / "corrections"
    if not (corrections / "dataset.json").is_file():
        for case in CORRECTIONS:
            add_case(corrections, SHARED / "imagesTr" / f"{case}.nii.gz", SHARED / "labelsTr" / f"{case}.nii.gz")
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        model = args.out / f"seed{seed}"
        subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "train", "--init", str(default_model_dir()),
                        "--data", str(corrections), "--output", str(model), "--holdout", "0", "--iterations",
                        str(args.iterations), "--seed", str(seed), "--device", "cpu", "-q"], cwd=ROOT)
        card = json.loads((model / "card.json").read_text())
        groups = card["verdict"]["groups"]
        line = {"seed": seed, "verdict": card["verdict"]["reason"][:160],
                **{g: {"parent": v["mean_dice_parent"], "new": v["mean_dice_new"],
                       "delta": round(v["mean_dice_new"] - v["mean_dice_parent"], 4)} for g, v in groups.items()}}
        print(json.dumps(line), flush=True)
        results.append(line)
    summary = {}
    for group in {g for r in results for g in r if isinstance(r[g], dict)}:
        deltas = [r[group]["delta"] for r in results if group in r]
        parents = {r[group]["parent"] for r in results if group in r}
        summary[group] = {"largest_fall": round(-min(deltas), 4), "largest_rise": round(max(deltas), 4),
                          "parent_scores_seen": sorted(parents)}
    print(json.dumps({"iterations": args.iterations, "seeds": args.seeds, "noise": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
