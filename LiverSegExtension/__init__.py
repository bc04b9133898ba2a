"""LiverSeg engine: liver segmentation in abdominal CT, with no Slicer import.

The Slicer module, the batch script and the ``liverseg`` CLI are thin doors onto this package.
"""

import sys

from LiverSegExtension.errors import LiverSegError

__version__ = "1.0.0"

__all__ = ["LiverSegError", "__version__", "console"]


def console() -> int:
    """The ``liverseg`` command: the CLI, or one line when it cannot even start (too little memory to load
    numpy or ITK reaches Python as an ImportError or a MemoryError)."""
    try:
        from LiverSegExtension.cli import main
    except (ImportError, MemoryError) as exc:
        text = str(exc).lower()
        memory = isinstance(exc, MemoryError) or any(w in text for w in ("memory", "map segment", "allocate"))
        reason = "not enough memory to start" if memory else f"a package is missing or broken ({exc})"
        print(f"liverseg: error: {reason}", file=sys.stderr)
        return 1
    return main()
