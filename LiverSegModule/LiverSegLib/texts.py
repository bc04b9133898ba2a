"""What the panel says about models and fine-tunes, as text and rich text (no Qt, no MRML)."""

from __future__ import annotations


def card_summary(card: dict) -> str:
    """About a model for the panel: name, version, validation Dice; for a fine-tune, its parent, the cases
    it added and its Dice against the parent's on the same cases."""
    if not card:
        return "No trained model installed"
    validation = card.get("validation", {})
    dice = validation.get("mean", {}).get("dice")
    parent_dice = validation.get("parent_mean", {}).get("dice")
    parent = card.get("parent_model")
    added = card.get("added_cases") or []
    text = f"{card.get('name', '?')} v{card.get('version', '?')}"
    if isinstance(dice, float) and isinstance(parent_dice, float):
        text += f", validation Dice {dice:.3f} (parent {parent_dice:.3f}, same cases)"
    elif isinstance(dice, float):
        text += f", validation Dice {dice:.3f}"
    if parent:
        text += f", fine-tuned from {parent}" + (f" on {len(added)} added case(s)" if added else "")
    return text


def comparison_html(result, notes: list[str]) -> str:  # noqa: ANN001 - protocol.TrainOutcome
    """The fine-tune's parent-versus-new table and verdict, as rich text for a QLabel."""
    from html import escape

    cells = "".join(
        f"<tr><td>{escape(r['case'])}</td><td>{escape(r['group'])}</td><td>{r['dice_parent']:.3f}</td>"
        f"<td>{r['dice_new']:.3f}</td><td>{r['hd95_mm_parent']:.1f}</td><td>{r['hd95_mm_new']:.1f}</td></tr>"
        for r in result.rows)
    table = ("<table><tr><th>case</th><th>group</th><th>Dice parent</th><th>Dice new</th><th>HD95 parent</th>"
             f"<th>HD95 new</th></tr>{cells}</table>") if cells else ""
    verdict = f"<p><b>{escape(result.reason)}</b></p>"
    return table + verdict + "".join(f"<p>{escape(n)}</p>" for n in notes)
