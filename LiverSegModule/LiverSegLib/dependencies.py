"""First use in Slicer: torch from the PyTorch extension, the other packages with the user's consent.

Never replaces Slicer's own numpy or SimpleITK (a constraints file pins them), never installs in
testing mode (a missing package is then an error).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import slicer

# Python packages the engine needs beyond what Slicer ships (import name -> requirement).
REQUIREMENTS = {"monai": "monai>=1.3", "safetensors": "safetensors>=0.4", "scipy": "scipy>=1.9", "tqdm": "tqdm"}
PROTECTED = ("numpy", "SimpleITK", "torch")


def missing_packages() -> list[str]:
    return [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _constraints_file() -> str:
    """Pin the packages Slicer (or the PyTorch extension) provides to the versions already there."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for dist in PROTECTED:
        try:
            lines.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    path = Path(tempfile.gettempdir()) / "liverseg-constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def ensure_dependencies(ask: bool = True) -> None:
    """Make torch and the engine's packages importable, or raise RuntimeError saying what is missing."""
    testing = bool(getattr(slicer, "app", None)) and slicer.app.testingEnabled()
    if not torch_available():
        if testing:
            raise RuntimeError("PyTorch is not installed (install the PyTorch extension)")
        try:
            import PyTorchUtils  # the PyTorch extension's module

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask)
        except ImportError:
            torch = None
        if torch is None:
            raise RuntimeError("PyTorch is required: install the 'PyTorch' extension from the Extensions Manager")
    missing = missing_packages()
    if not missing:
        return
    if testing:
        raise RuntimeError(f"missing Python packages: {', '.join(missing)}")
    if ask and not slicer.util.confirmOkCancelDisplay(
        "LiverSeg needs these Python packages, which will be downloaded and installed now:\n"
        + "\n".join(missing) + "\n\nSlicer's own numpy and SimpleITK are not changed.",
        "LiverSeg: install Python packages",
    ):
        raise RuntimeError(f"missing Python packages (installation declined): {', '.join(missing)}")
    constraints = _constraints_file()
    logging.info("LiverSeg: installing %s", " ".join(missing))
    for module_name in ("packaging", "pydeps"):  # slicer.packaging (5.12+), slicer.pydeps (5.11)
        pip_api = getattr(slicer, module_name, None)
        if pip_api is not None and hasattr(pip_api, "pip_ensure"):
            from packaging.requirements import Requirement

            pip_api.pip_ensure([Requirement(r) for r in missing], constraints=constraints, requester="LiverSeg")
            break
    else:
        slicer.util.pip_install(" ".join(missing) + f" --constraint {constraints}")
    still = missing_packages()
    if still:
        raise RuntimeError(f"could not install: {', '.join(still)}")
