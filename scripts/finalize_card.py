"""Complete a trained model's card for shipping: data sources and licences, per-case validation metrics
(from ``liverseg evaluate --output``), CPU time (from ``benchmarks/benchmark.py``) and Dice per simulated
condition, this model's and its parent's (from ``benchmarks/conditions.py --summary``). The weights and their
sha256 are not touched. With ``--readme``, the README's validation table is made anew from the card (between its
two ``validation table`` comments); ``--readme`` alone (no ``--data``) only remakes the table.

    python scripts/finalize_card.py MODEL_DIR --data DATASET --evaluation validation.csv [--benchmark bench.jsonl] \
        [--conditions conditions.json --conditions parent-conditions.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

LICENCES = {
    "ircad": "3D-IRCADb-01 (IRCAD, Strasbourg): research use; also part of LiTS/MSD (CC BY-NC-SA 4.0)",
    "ts": "TotalSegmentator example data (Wasserthal et al.), Apache-2.0; label made by the TotalSegmentator model",
    "lits": "LiTS (Bilic et al., 2023), CC BY-NC-SA 4.0",
}


BEGIN, END = "<!-- validation table: scripts/finalize_card.py --readme -->", "<!-- end of validation table -->"


def _number(value: Any, spec: str, suffix: str = "") -> str:
    """A card's figure as the table shows it; a case that failed (empty) or a figure not measured shows as "-"."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if x != x else f"{x:{spec}}{suffix}"


def readme_table(card: dict[str, Any]) -> str:
    """The README's validation table, from the card's per-case rows (Dice, NSD at 2 mm, HD95, volume error)."""
    v = card["validation"]
    lines = [f"Validation of `{card['name']} v{card['version']}` ({v.get('protocol', 'cases never trained on')}):",
             "", "| case | source | Dice | NSD@2mm | HD95 mm | volume error |", "|---|---|---|---|---|---|"]
    sources = v.get("case_sources", {})
    for r in v["cases"]:
        image = sources.get(r["case"], {}).get("image", "").replace(" (see README)", "")
        lines.append(f"| {r['case']} | {image} | {_number(r.get('dice'), '.3f')} | {_number(r.get('nsd_2mm'), '.3f')} | "
                     f"{_number(r.get('hd95_mm'), '.1f')} | {_number(r.get('volume_error_pct'), '+.1f', ' %')} |")
    m = v.get("mean", {})
    lines.append(f"| **mean** | | **{_number(m.get('dice'), '.3f')}** | **{_number(m.get('nsd_2mm'), '.3f')}** | "
                 f"**{_number(m.get('hd95_mm'), '.1f')}** | {_number(m.get('volume_error_pct'), '+.1f', ' %')} |")
    return "\n".join(lines)


def write_readme(readme: Path, card: dict[str, Any]) -> None:
    text = readme.read_text()
    block = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not block.search(text):
        sys.exit(f"{readme}: no validation table to replace (the two comments {BEGIN} and {END})")
    readme.write_text(block.sub(lambda _: f"{BEGIN}\n{readme_table(card)}\n{END}", text))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--evaluation", type=Path)
    p.add_argument("--readme", type=Path, help="remake this README's validation table from the card")
    p.add_argument("--benchmark", type=Path)
    p.add_argument("--conditions", type=Path, action="append", default=[],
                   help="benchmarks/conditions.py --summary of this model (and of its parent, to compare)")
    args = p.parse_args()
    card_path = args.model / "card.json"
    card = json.loads(card_path.read_text())
    if args.data is None or args.evaluation is None:
        if args.readme is None or args.data or args.evaluation or args.benchmark or args.conditions:
            p.error("give --data and --evaluation to complete the card (or --readme alone to remake its table)")
        write_readme(args.readme, card)
        return
    meta = json.loads((args.data / "dataset.json").read_text())
    cases = meta.get("cases", {})

    def source(name: str) -> dict:
        info = cases.get(name, {})
        return {"image": info.get("image_source", ""), "label": info.get("label_source", ""),
                "licence": LICENCES.get(name.split("_")[0], "see the dataset's README")}

    card["training"]["case_sources"] = {c: source(c) for c in card["training"]["cases"]}
    rows = list(csv.DictReader(open(args.evaluation)))
    per_case = [{k: (float(v) if k not in ("case", "note", "error") and v != "" else v) for k, v in r.items()} for r in rows]
    card["validation"] = {
        "cases": per_case,
        "case_sources": {r["case"]: source(r["case"]) for r in rows},
        "mean": {k: round(sum(r[k] for r in per_case if isinstance(r.get(k), float)) / len(per_case), 4)
                 for k in ("dice", "nsd_2mm", "hd95_mm", "msd_mm", "volume_error_pct") if k in per_case[0]},
        "protocol": "full coarse-to-fine pipeline at each case's own resolution; cases never trained on",
    }
    if args.benchmark and args.benchmark.is_file():
        card["cpu_time"] = [json.loads(line) for line in args.benchmark.read_text().splitlines() if line.startswith("{")]
    if args.conditions:
        measured = [json.loads(path.read_text()) for path in args.conditions]
        card["conditions"] = {
            "protocol": measured[0]["protocol"],
            "cases": measured[0]["cases"],
            "results": [{k: m.get(k) for k in ("model", "version", "weights_sha256", "dice", "cort_heart_ml")}
                        for m in measured],
        }
    card["licence"] = ("Weights derived from data licensed for non-commercial research (CC BY-NC-SA 4.0 and similar): "
                       "research use only, not for clinical or commercial use.")
    card["intended_use"] = "Liver segmentation in abdominal CT for research; review every result."
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    if args.readme:
        write_readme(args.readme, card)
    print(json.dumps(card["validation"]["mean"]))


if __name__ == "__main__":
    main()
