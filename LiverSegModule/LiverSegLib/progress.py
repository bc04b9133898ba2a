"""How the panel shows a run it polls (an install, a segmentation, an export, a fine-tune): its progress on a bar
and a label, and its error in a dialog."""

from __future__ import annotations

import slicer


def show_progress(run, bar, label) -> bool:
    """Poll ``run`` (an install, segmentation or training run) and show its progress; whether it has ended."""
    done = run.poll()
    bar.value = int(run.fraction * 100)
    label.text = run.stage[:1].upper() + run.stage[1:]
    return done


def show_error(text: str, details: str = "") -> None:
    """An error dialog; details only when there are some (``detailedText=None`` shows the word "None")."""
    kwargs = {"detailedText": details} if details else {}
    slicer.util.errorDisplay(text, **kwargs)
