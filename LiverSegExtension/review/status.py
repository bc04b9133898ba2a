"""``liverseg review status OUT``: what a folder's review says about the model. Progress by state, how much the
annotators changed the model's masks (1 - Dice between the model's mask and the reviewed one), the cases the
model got most wrong, and how well the uncertainty ranked the cases the annotators changed most (Spearman's
rank correlation): the site's own check that the uncertainty can be trusted to say which cases to look at.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from LiverSegExtension.review.state import DECISIONS, ReviewState
from LiverSegExtension.review.worklist import read_worklist

#: upper limits of the "how much was changed" bins (1 - Dice); 0 is "unchanged"
CHANGE_BINS = (0.01, 0.05, 0.10, 0.20)


def _bin_labels() -> list[str]:
    edges = [f"{v:.2f}" for v in CHANGE_BINS]
    return ["unchanged", f"< {edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">= {edges[-1]}"]


def change_histogram(changes: list[float]) -> list[tuple[str, int]]:
    """(label, count) of 1 - Dice over the bins: unchanged, then up to each of CHANGE_BINS, then above."""
    counts = [0] * (len(CHANGE_BINS) + 2)
    for change in changes:
        if change <= 1e-9:
            counts[0] += 1
        else:
            counts[1 + sum(change >= edge for edge in CHANGE_BINS)] += 1
    return list(zip(_bin_labels(), counts))


def rank_correlation(uncertainty: list[float], change: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None with fewer than 3 cases or no spread."""
    from scipy.stats import spearmanr

    if len(uncertainty) < 3 or len(set(uncertainty)) < 2 or len(set(change)) < 2:
        return None
    rho = float(spearmanr(uncertainty, change)[0])
    return None if math.isnan(rho) else rho


def review_summary(folder: str | Path) -> dict:
    """The numbers ``review status`` prints: counts by state, (case, change, uncertainty) per reviewed case."""
    folder = Path(folder)
    cases = read_worklist(folder)
    state = ReviewState(folder)
    records = state.records()
    counts = dict.fromkeys((*DECISIONS, "in review", "not reviewed"), 0)
    reviewed = []
    for case in cases:
        record = records.get(case.key, {})
        decision = record.get("decision", "")
        if decision in DECISIONS:
            counts[decision] += 1
        elif record.get("claimed_by") and state.claimed_by_other(record, ""):
            counts["in review"] += 1
        else:
            counts["not reviewed"] += 1
        if decision in ("accepted", "exported") and record.get("dice_changed"):
            reviewed.append({"name": case.name, "change": 1.0 - float(record["dice_changed"]),
                             "uncertainty": case.uncertainty, "decision": decision, "who": record.get("who", "")})
    keys = {c.key for c in cases}
    return {"total": len(cases), "counts": counts, "reviewed": reviewed,
            "orphans": sum(1 for k, r in records.items() if k not in keys and r.get("decision"))}


def review_status(folder: str | Path, worst: int = 5) -> str:
    """The report ``liverseg review status`` prints."""
    numbers = review_summary(folder)
    counts, total, reviewed = numbers["counts"], numbers["total"], numbers["reviewed"]
    done = sum(counts[d] for d in DECISIONS)
    lines = [f"{folder}: {done} of {total} case(s) reviewed" + (f" ({100 * done / total:.0f} %)" if total else ""),
             "  " + ", ".join(f"{n} {state}" for state, n in counts.items())]
    if numbers["orphans"]:
        lines.append(f"  {numbers['orphans']} review record(s) for cases no longer in summary.csv (kept, not counted)")
    changes = [r["change"] for r in reviewed]
    lines.append(f"How much the annotators changed the model's mask (1 - Dice; {len(changes)} accepted or exported):")
    for label, count in change_histogram(changes):
        lines.append(f"  {label:>11s} {count:5d} {'#' * min(count, 60)}".rstrip())
    most = sorted((r for r in reviewed if r["change"] > 0), key=lambda r: -r["change"])[:worst]
    if most:
        lines.append("The cases the model got most wrong:")
        for r in most:
            uncertainty = f"{r['uncertainty']:.3f}" if r["uncertainty"] is not None else "?"
            lines.append(f"  {r['name']}: 1 - Dice {r['change']:.3f}, uncertainty {uncertainty} ({r['who']})")
    paired = [r for r in reviewed if r["uncertainty"] is not None]
    rho = rank_correlation([r["uncertainty"] for r in paired], [r["change"] for r in paired])
    if rho is None:
        lines.append(f"Uncertainty against the change: not yet measurable ({len(paired)} case(s); it needs 3 or more, "
                     "with different uncertainties and different changes)")
    else:
        lines.append(f"Uncertainty against the change: Spearman rank correlation {rho:+.2f} over {len(paired)} case(s)")
        lines.append("  (+1: the uncertainty ranked the cases as the annotators' changes did; 0: it says nothing)")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``liverseg review status OUT`` (the CLI's subparser)."""
    r = sub.add_parser("review", help="what the review of a batch's results says (review.csv beside summary.csv)")
    rsub = r.add_subparsers(dest="review_command", required=True)
    rs = rsub.add_parser("status", help="progress, how much was changed, the worst cases, and the uncertainty's ranking",
                         description="Print a batch output folder's review progress by state, the distribution of "
                                     "1 - Dice between the model's masks and the reviewed ones, the cases the model "
                                     "got most wrong, and Spearman's rank correlation between the uncertainty and "
                                     "the change.")
    rs.add_argument("folder", type=Path, metavar="OUT", help="the batch's output folder (summary.csv, review.csv)")
    rs.add_argument("--worst", type=int, default=5, help="how many of the most changed cases to list (default: 5)")
    rs.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_review(args: argparse.Namespace) -> int:
    print(review_status(args.folder, max(0, args.worst)), file=sys.stdout)
    return 0
