"""One install command of LiverSeg's first use in Slicer, in a process of its own (``dependencies.InstallRun``):

    PythonSlicer -u installer.py [--path FOLDER] MODULE ARGUMENTS...

runs ``python -m MODULE ARGUMENTS`` (pip, or light-the-torch) in this process, after saying its pid on the
first line. ``PythonSlicer`` is CTK's launcher: the process Slicer starts is the launcher, which runs this one
as its child and leaves it running when it is killed itself (commontk/AppLauncher, ``ctkAppLauncher.cpp``);
so a cancel kills this pid as well, and this process ends itself when its launcher goes (POSIX). ``--path``
puts a folder first on ``sys.path``: light-the-torch runs there with the pip it requires, and Slicer's own
pip is never replaced. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time

PID_LINE = "LiverSeg installer pid "


def _end_with_parent() -> None:
    """End when the launcher goes (Slicer quit or crashed): a half-done install must not run on alone.
    POSIX: an orphan is adopted, so its parent pid changes."""
    if os.name == "nt":
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="liverseg-installer-parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    print(f"{PID_LINE}{os.getpid()}", flush=True)
    _end_with_parent()
    here = os.path.dirname(os.path.abspath(__file__))  # LiverSeg's own modules: nothing pip should import
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    if argv[:1] == ["--path"]:
        sys.path.insert(0, argv[1])
        argv = argv[2:]
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)  # ends with the module's sys.exit


if __name__ == "__main__":
    main(sys.argv[1:])
