"""Memory: what this process may use (the machine, its control group, a virtual-memory limit), what a
segmentation of a CT needs, and the words for running out. Plain Python: nothing here imports numpy."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from LiverSegExtension.errors import LiverSegError

try:
    import resource
except ImportError:  # Windows: no ulimit
    resource = None  # type: ignore[assignment]


def memory_bytes() -> int:
    """The memory this process may fill: the machine's physical memory, or the smaller limit of the control
    group it runs in (a container, a cluster job); 0 where it cannot be told."""
    try:
        physical = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        physical = 0
    return min((v for v in (physical, _cgroup_limit()) if v > 0), default=0)


def _cgroup_limit() -> int:
    """The memory limit of this process's control group (v2 or v1), 0 when none is set or readable."""
    places = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            number, kinds, where = line.split(":", 2)
            if number == "0":
                places += [f"/sys/fs/cgroup{where}/memory.max", "/sys/fs/cgroup/memory.max"]
            elif "memory" in kinds.split(","):
                places += [f"/sys/fs/cgroup/memory{where}/memory.limit_in_bytes",
                           "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    except (OSError, ValueError):
        return 0
    limits = []
    for place in places:
        try:
            text = Path(place).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max", or v1's huge number: no limit
            limits.append(int(text))
    return min(limits, default=0)


def address_space_left() -> int | None:
    """What a virtual-memory limit (``ulimit -v``, set by some cluster schedulers) still allows this process
    to map, or None when no limit is set."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    if limit < 0 or limit == getattr(resource, "RLIM_INFINITY", -1):
        return None
    try:
        status = Path("/proc/self/status").read_text()
        used = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, limit - used)


#: LiverSeg's peak memory is at most about this many bytes per CT voxel, plus RUN_BYTES for the runtime and
#: model (benchmarks/peak_memory.py, 0.57 mm pixels: 0.53 GB for 512x512x129, 0.75-0.77 GB for 512x512x516;
#: a DICOM series is read as int32 and made int16, 6 bytes a voxel for a moment)
PEAK_BYTES_PER_VOXEL = 4
RUN_BYTES = 0.5e9


def memory_needed(voxels: int) -> float:
    """Bytes a whole segmentation of a CT of ``voxels`` voxels needs at its peak (a little more than measured)."""
    return PEAK_BYTES_PER_VOXEL * voxels + RUN_BYTES


def check_fits_memory(source: str | Path, size: Sequence[int], voxel_bytes: int = 2) -> None:
    """Refuse, from the header alone, a CT whose segmentation cannot fit in this machine's memory (or under
    the process's virtual-memory limit): before a byte of it is read or decompressed."""
    voxels = math.prod(int(v) for v in size)
    needed = memory_needed(voxels)
    have, left = memory_bytes(), address_space_left()
    if have and needed > have:
        where = f"this machine has {have / 1e9:.1f} GB"
    elif left is not None and needed - RUN_BYTES > left:
        where = f"the process's virtual-memory limit (ulimit -v) leaves {left / 1e9:.1f} GB"
    else:
        return
    claimed = f"{voxels * voxel_bytes / 1e9:.1f} GB of voxels ({'x'.join(str(int(v)) for v in size)})"
    raise LiverSegError(f"{source}: the header claims {claimed}: not enough memory (needed about "
                        f"{needed / 1e9:.0f} GB; {where})")


def is_allocation_failure(exc: BaseException) -> bool:
    """ITK's, NIfTI's and ONNX Runtime's words for an allocation that failed, and the loader's for a library it
    could not map (a package imported on first use, under a virtual-memory limit)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        words in text for words in ("bad_alloc", "failed to allocate", "out of memory", "nifti_image_load failed",
                                    "memory allocation", "cannot allocate memory", "failed to map segment"))


def not_enough_memory(reader: Any = None, voxels: int = 0) -> str:
    """"not enough memory (needed about N GB)", N from the image's size (:func:`memory_needed`)."""
    try:
        if reader is not None:
            voxels = math.prod(int(v) for v in reader.GetSize())
    except RuntimeError:
        voxels = 0
    if not voxels:
        return "not enough memory"
    return f"not enough memory (needed about {max(1.0, memory_needed(voxels) / 1e9):.0f} GB)"
