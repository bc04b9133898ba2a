"""Files written safely: atomically through named temporaries (a killed writer's are cleaned up later), never
replacing a file unasked, under a lock shared by every process, and read back before they count as done."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from LiverSegExtension.errors import LiverSegError, OutputExistsError
from LiverSegExtension.io.formats import VolumeFormat, format_of, split_suffix


@contextlib.contextmanager
def locked(folder: Path, name: str) -> Iterator[None]:
    """An exclusive lock, shared by all processes (Slicer instances, CLI runs), on ``folder/name``.

    The lock file is removed on release. A waiter that then holds a lock on the removed file notices
    (the path no longer names the file it locked) and takes the lock again on the current one. A folder that
    cannot hold the lock file (read-only, gone) is a LiverSegError naming it."""
    folder = Path(folder)
    path = folder / name
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+b")
        except OSError as exc:
            raise LiverSegError(f"{folder}: cannot lock it for writing ({exc.strerror or type(exc).__name__}); "
                                "is the folder read-only?") from None
        try:
            _lock(handle)
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # releases the stale lock
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows cannot remove an open file: it stays, harmless
            os.unlink(path)
        handle.close()


def _lock(handle) -> None:  # noqa: ANN001 - a binary file object
    if os.name == "nt":
        import msvcrt

        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def check_writable_folder(folder: Path) -> None:
    """Make ``folder`` if needed and check that files can be created in it, before any work is done."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise LiverSegError(f"{folder}: a symbolic link to {os.readlink(folder)}, which does not exist")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".liverseg-write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LiverSegError(f"{folder}: cannot write output there ({reason})") from None


def complete_output(path: Path) -> bool:
    """True when an existing output is a whole, readable image (a rerun skips it); False when it is
    truncated or unreadable (a rerun must not count it as done)."""
    try:
        (format_of(path) or VolumeFormat()).check_written(path)
        return True
    except Exception:  # noqa: BLE001 - whatever the reader says, the file is not a whole output
        return False


TEMP_MARK = ".liverseg-tmp-"


_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


STALE_SECONDS = 24 * 3600  # another host's temporary: removed only when this old


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what a killed writer left in ``folder``: temporaries of processes of this host that no longer
    run (or of other hosts, once a day old). Work in progress of a concurrent run is left alone."""
    removed = []
    try:
        candidates = [p for p in Path(folder).iterdir() if p.name.startswith(".") and TEMP_MARK in p.name]
    except OSError:
        return removed
    for path in candidates:
        writer = path.name.split(TEMP_MARK, 1)[1].split("-")
        try:
            host, pid = writer[0], int(writer[1])
        except (IndexError, ValueError):
            continue
        if host == _HOST:
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # someone else's live process
        else:
            try:
                if time.time() - path.stat().st_mtime < STALE_SECONDS:
                    continue
            except OSError:
                continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write(path: Path, write_to: Callable[[str], object], overwrite: bool = False) -> None:
    """Write through a temporary file in the same folder and rename it into place, so that a crash
    never leaves a half-written file; refuse to replace an existing file unless ``overwrite``.

    ``write_to(tmp)`` creates the file itself (the name is unique but not pre-created, so writers that
    complain about replacing a file, such as Slicer's storage nodes, stay quiet)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = split_suffix(path.name)[1] or path.suffix  # the temporary keeps the format: writers go by it
    # Named after the writer (host and process), so that a later run can tell debris from work in progress.
    tmp = str(path.with_name(f".{path.name}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"))
    try:
        try:
            write_to(tmp)
        except OSError as exc:  # name the file the user asked for, not the hidden temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        except RuntimeError as exc:  # ITK's writers
            if tmp not in str(exc):
                raise
            raise LiverSegError(f"{path}: could not be written ({str(exc).replace(tmp, str(path)).strip()})") from None
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: never clobber a file written concurrently.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)") from None
            os.unlink(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
