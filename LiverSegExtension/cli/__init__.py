"""``liverseg``: segment, train, evaluate and manage datasets from the command line. One module per command
(``segment``, ``train``, ``commands`` for the smaller ones, ``review`` in its own package); ``common`` holds
what they share.

Exit codes: 0 every case worked, 1 some case failed (the others were still done), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from LiverSegExtension.cli import commands, segment, train
from LiverSegExtension.cli.common import Parser, Version, print_error
from LiverSegExtension.errors import LiverSegError, UsageError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from LiverSegExtension.review.status import add_parser as add_review

    p = Parser(prog="liverseg", description="Liver segmentation in abdominal CT.")
    p.add_argument("--version", action=Version)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (segment.add_parser, train.add_parser, commands.add_evaluate, commands.add_view, commands.add_summary,
                add_review, commands.add_dataset):
        add(sub)
    return p


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    if name == "review":
        from LiverSegExtension.review.status import cmd_review

        return cmd_review
    return {"segment": segment.run, "train": train.run, "evaluate": commands.cmd_evaluate, "view": commands.cmd_view,
            "summary": commands.cmd_summary, "dataset": commands.cmd_dataset}[name]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    from LiverSegExtension.io import quiet_native_logs

    quiet_native_logs(args.debug)
    logging.getLogger("highdicom").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        return _command(args.command)(args)
    except KeyboardInterrupt:
        print("liverseg: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print_error(exc, args.debug)
        return 2
    except LiverSegError as exc:
        print_error(exc, args.debug)
        return 1
    except MemoryError:
        print_error(LiverSegError("not enough memory"), args.debug)
        return 1
    except OSError as exc:  # a full disk, a folder that went away: one line, not a traceback
        from LiverSegExtension.io import display_path

        where = f"{display_path(exc.filename)}: " if exc.filename else ""
        print_error(LiverSegError(f"{where}{exc.strerror or exc}"), args.debug)
        return 1
