"""How the panel shows a run it polls (an install, a segmentation, an export, a fine-tune): its progress on a bar
and a label, and its error in a dialog."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import slicer

from LiverSegExtension.errors import CancelledError, LiverSegError


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


@contextlib.contextmanager
def outcome_shown(run, label, what: str, failed: str, cancelled: str | None = None, crashed: str | None = None
                  ) -> Iterator[None]:
    """Read an ended run's outcome in the body: a cancel and the user's errors (``LiverSegError``) are told on
    ``label`` (``cancelled``, ``failed``; the error in a dialog with the run's details); anything else is a bug,
    logged with its traceback and shown (``crashed`` on the label), and Slicer keeps running."""
    try:
        yield
    except CancelledError as exc:
        if cancelled is None:  # a run that cannot be cancelled: as any other failure
            label.text = failed
            show_error(str(exc), run.details)
        else:
            label.text = cancelled
    except LiverSegError as exc:
        label.text = failed
        show_error(str(exc), run.details)
    except Exception as exc:  # noqa: BLE001 - a bug: say so and keep Slicer running
        label.text = crashed or failed
        logging.exception("LiverSeg %sfailed", what)
        show_error(f"LiverSeg {what}failed: {exc}", run.details)
