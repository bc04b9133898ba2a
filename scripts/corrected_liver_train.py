"""Make a corrected view of ../shared/data/liver-train: every case linked as it is, except lits_117_crop,
whose header is rotated 180 degrees in-plane.

Evidence (look at it with `liverseg view` or any viewer): read with its header, lits_117_crop shows the
vertebral body anterior to the liver and the liver on the patient's left; with the in-plane axes turned
(direction diag(1, 1, 1) instead of diag(-1, -1, 1)) the spine is posterior and the liver on the right,
as in every other case. The anatomy fixes the rotation; the voxels and the written 1 mm spacing are kept
(the true spacing is unknown, about 1.35 mm by liver volume). liverseg v1.1.0 scores Dice 0.25 on the case
as written (88 mL found of 615, with a warning that the spine lies in front of the liver) and 0.93 with the
header corrected, the figure of the README's validation table.

    python scripts/corrected_liver_train.py ../shared/data/liver-train runs/liver-train-corrected
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import SimpleITK as sitk

CASE = "lits_117_crop"
WRONG = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
RIGHT = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("output", type=Path)
    args = p.parse_args(argv)
    src, out = args.source.resolve(), args.output
    meta = json.loads((src / "dataset.json").read_text())
    if out.exists():
        print(f"{out}: already exists; remove it first", file=sys.stderr)
        return 1
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir()):
            target = out / sub / f.name
            if f.name.startswith(CASE + "."):
                image = sitk.ReadImage(str(f))
                if tuple(round(v) for v in image.GetDirection()) != WRONG:
                    print(f"{f}: header is not the known wrong one; nothing to correct", file=sys.stderr)
                    return 1
                image.SetDirection(RIGHT)
                sitk.WriteImage(image, str(target), True)
            else:
                os.symlink(f, target)
    meta.setdefault("cases", {}).setdefault(CASE, {})["corrected"] = "in-plane 180 degree header rotation undone"
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"corrected view of {src} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
