"""What every ``liverseg`` command shares: options, the one-line error, and argparse that suggests the closest
option for a misspelt one."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from LiverSegExtension import __version__


class Parser(argparse.ArgumentParser):
    """argparse, with the closest option suggested for a misspelt one (``--skip-exisiting``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib

        if "unrecognized arguments:" in message:
            options = sorted(_option_strings(self))
            for word in message.split(":", 1)[1].split():
                if word.startswith("--") and (close := difflib.get_close_matches(word.split("=")[0], options, n=1)):
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--"))
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                found |= _option_strings(action.choices[sub])
    return found


class Version(argparse.Action):
    """``--version``: the package's version and the bundled model's, read only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the package's and "
                         "the bundled model's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        from LiverSegExtension.model.catalog import bundled_model_name

        print(f"liverseg {__version__}, bundled model {bundled_model_name()}")
        parser.exit()


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto: a GPU when "
                                                     "PyTorch with CUDA or MPS is installed, else the CPU)")
    if model:
        p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"],
                       help="what runs the networks (default: auto: ONNX Runtime on the CPU, PyTorch on a GPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def print_error(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    print(f"liverseg: error: {exc}", file=sys.stderr)
