"""A site fine-tunes the shipped model on its own corrected cases: does its test Dice change?

The labelled scans the shipped model never trained on are its four validation cases (ts_a, lits_117_crop
with its header fixed, ircad_e05, ircad_e12). For each k and seed, k of them become the site's
"corrections" (under their own names, so that none is also scored as a test case) and the others its test
cases; ``liverseg train --init MODEL --data CORRECTIONS`` runs with the default recipe (fine stage,
the parent's data replayed, one correction in five held back) and the guard's table gives each test
case's Dice before and after. With only four unseen cases, k stops at 3.

    python benchmarks/site_experiment.py --data ../shared/data/liver-train --ks 1,2,3 --seeds 0,1 --out runs/site
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LiverSegExtension.model.catalog import default_model_dir, read_card  # noqa: E402
from LiverSegExtension.training.finetune import (  # noqa: E402
    HELD_BACK,
    PARENT_VALIDATION,
    fine_tune,
    parent_validation_cases,
    recipe,
)


def corrections_dataset(folder: Path, cases: list) -> Path:
    """An MSD dataset of these cases under their own names, header fixes applied."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for c in cases:
        image, label = c.read()
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{c.name}.nii.gz"))
        sitk.WriteImage(label, str(folder / "labelsTr" / f"{c.name}.nii.gz"))
        entries.append({"image": f"./imagesTr/{c.name}.nii.gz", "label": f"./labelsTr/{c.name}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "site", "training": entries,
                                                     "cases": {c.name: {"source": "site experiment"} for c in cases}}))
    return folder


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--iterations", type=int, help="default: the recipe's")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    card = read_card(args.model)
    unseen = {c.name: c for c in parent_validation_cases(card)}
    print(f"unseen labelled cases: {', '.join(unseen)}", file=sys.stderr)
    results = []
    for k in [int(v) for v in args.ks.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            chosen = sorted(random.Random(seed).sample(sorted(unseen), k))
            run = args.out / f"k{k}_seed{seed}"
            if not (run / "corrections" / "dataset.json").is_file():
                corrections_dataset(run / "corrections", [unseen[n] for n in chosen])
            cfg = recipe([run / "corrections"], run / "model", args.model, iterations=args.iterations,
                         device="cpu", seed=seed)
            t0 = time.perf_counter()
            result = fine_tune(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
            rows = result.rows
            test = [r for r in rows if r["group"] == PARENT_VALIDATION]
            held = [r for r in rows if r["group"] == HELD_BACK]
            line = {"k": k, "seed": seed, "corrections": chosen, "held_back": [r["case"] for r in held],
                    "test": {r["case"]: [r["dice_parent"], r["dice_new"]] for r in test},
                    "held": {r["case"]: [r["dice_parent"], r["dice_new"]] for r in held},
                    "accepted": result.accepted, "reason": result.reason,
                    "minutes": round((time.perf_counter() - t0) / 60, 1)}
            print(json.dumps(line), flush=True)
            results.append(line)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
