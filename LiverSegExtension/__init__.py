"""LiverSeg engine: liver segmentation in abdominal CT, with no Slicer import.

The Slicer module, the batch script and the ``liverseg`` CLI are thin doors onto this package.
"""

import gc
import os
import sys

from LiverSegExtension.errors import LiverSegError

__version__ = "1.2.0"

__all__ = ["LiverSegError", "__version__", "console", "segment"]


def __getattr__(name: str):  # noqa: ANN202 - the Python API, imported on first use (the CLI need not load it)
    if name == "segment":
        from LiverSegExtension.api import segment

        return segment
    raise AttributeError(f"module 'LiverSegExtension' has no attribute {name!r}")


#: the least address space (``ulimit -v``) in which ``liverseg segment`` can run at all: Python, numpy, SimpleITK,
#: scipy and ONNX Runtime mapped, the model loaded and the smallest CT segmented took 0.77 GB on a 2-core machine
#: (more with more cores); below it a run fails somewhere, or OpenBLAS ends the process with words of its own
START_BYTES = 768 << 20


def console() -> int:
    """The ``liverseg`` command: the CLI, or one line when it cannot even start.

    Too little memory to load numpy or ITK reaches Python as an ImportError or a MemoryError, at start-up
    or at a later import. A virtual-memory limit (``ulimit -v``, set by some cluster schedulers) below what
    starting needs is refused before anything is imported: under it, OpenBLAS's thread start inside numpy's
    and scipy's imports can hang instead of failing. So OpenBLAS gets one thread, whatever the environment
    asks (a cluster's often sets it to the job's cores): LiverSeg does no BLAS work worth threads, and
    ``train`` runs in PyTorch, whose threads this does not touch."""
    if sys.argv[1:2] != ["train"]:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    if _address_space_limit() < START_BYTES:
        return _cannot_start(MemoryError())
    try:
        from LiverSegExtension.cli import main
    except (ImportError, MemoryError) as exc:
        return _cannot_start(exc)
    try:
        code = main()
    except (ImportError, MemoryError) as exc:  # a package imported on first use
        if not _memory(exc):
            raise
        return _cannot_start(exc)
    # The process ends now: the collector's last passes over everything imported (0.08 s with scipy and ONNX
    # Runtime loaded) would free nothing the end of the process does not; files are closed and atexit still runs.
    gc.freeze()
    return code


def _address_space_limit() -> float:
    try:
        import resource
    except ImportError:  # Windows: no ulimit
        return float("inf")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return float("inf") if limit < 0 or limit == resource.RLIM_INFINITY else float(limit)


def _memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(w in text for w in ("memory", "map segment", "allocate"))


def _cannot_start(exc: BaseException) -> int:
    reason = "not enough memory to start" if _memory(exc) else f"a package is missing or broken ({exc})"
    print(f"liverseg: error: {reason}", file=sys.stderr)
    return 1
