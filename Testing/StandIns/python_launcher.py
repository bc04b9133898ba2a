"""Stand-in for ``PythonSlicer``, CTK's application launcher running Slicer's ``python-real`` (test-only).

Mirrors commontk/AppLauncher ``Base/ctkAppLauncher.cpp`` for what LiverSeg meets: the real program runs as a
*child* of the launcher, with the launcher's channels forwarded to it (``QProcess::ForwardedChannels`` and
``ForwardedInputChannel``: the child reads and writes the very pipes the caller gave the launcher); the
launcher exits with the child's exit code, and with ``EXIT_FAILURE`` (1) when the child crashed
(``applicationFinished``); killing the launcher does not end the child.

Installed as an executable named ``PythonSlicer`` on PATH by the tests (``conftest.slicer_launcher``, or
:func:`put_on_path`). What it runs (the engine, or pip through LiverSeg's installer) outlives a kill of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def put_on_path(folder: Path) -> Path:
    """Write ``PythonSlicer`` (this launcher, running this Python) into ``folder`` and put that first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / "PythonSlicer"
    launcher.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(Path(__file__).resolve())!r}, "
                        "run_name='__main__')\n")
    launcher.chmod(0o755)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return launcher


def main(argv: list[str]) -> int:
    child = subprocess.Popen([sys.executable, *argv])  # stdin, stdout and stderr inherited: forwarded
    code = child.wait()
    return 1 if code < 0 else code  # a child ended by a signal: CrashExit -> EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
