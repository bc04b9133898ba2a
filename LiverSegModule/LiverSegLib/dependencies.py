"""First use in Slicer: torch from the PyTorch extension, the other packages with the user's consent.

One dialog asks for everything that is missing. Nothing is imported to find out what is missing (Slicer
must not load torch before the user agreed); Slicer's own numpy and SimpleITK, and the torch the PyTorch
extension installed, are pinned by a constraints file so that pip never replaces them. In testing mode
nothing is installed: a missing package is then an error that says what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import slicer

from LiverSegExtension.errors import LiverSegError

# Python packages the engine needs beyond what Slicer ships (import name -> requirement).
REQUIREMENTS = {"monai": "monai>=1.3", "safetensors": "safetensors>=0.4", "scipy": "scipy>=1.9", "tqdm": "tqdm"}
MINIMUM_TORCH = "2.0"  # the engine uses torch.inference_mode and safetensors' torch API
PROTECTED = ("numpy", "SimpleITK", "torch")


def importable(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_needed() -> bool:
    """True when torch is absent or older than the engine needs (read from its metadata, not imported)."""
    if not importable("torch"):
        return True
    try:
        return _version_tuple(version("torch")) < _version_tuple(MINIMUM_TORCH)
    except PackageNotFoundError:
        return True


def missing_packages() -> list[str]:
    return [req for name, req in REQUIREMENTS.items() if not importable(name)]


def dependencies_present() -> bool:
    return not torch_needed() and not missing_packages()


def constraints_file() -> str:
    """A constraints file pinning the packages Slicer (or the PyTorch extension) provides to the versions there."""
    lines = []
    for dist in PROTECTED:
        try:
            lines.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    path = Path(tempfile.mkdtemp(prefix="LiverSeg-pip-")) / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pip_arguments(packages: list[str], constraints: str) -> list[str]:
    """Arguments for ``slicer.util.pip_install``: a list, which Slicer passes on as it is (a string would be
    ``shlex.split``, which breaks a Windows path such as ``C:\\Users\\John Smith\\...``)."""
    return [*packages, "--constraint", constraints]


def _packaging_module():
    """``slicer.packaging`` (Slicer 5.12+; a submodule that exists only once imported), else None."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def install_packages(packages: list[str]) -> None:
    constraints = constraints_file()
    logging.info("LiverSeg: installing %s", " ".join(packages))
    packaging = _packaging_module()
    if packaging is not None:  # the user agreed already: no second dialog
        packaging.pip_ensure(list(packages), constraints=constraints, prompt_install=False, requester="LiverSeg")
    else:
        slicer.util.pip_install(pip_arguments(packages, constraints))


def install_torch() -> None:
    """torch through the PyTorch extension (it picks the CUDA build that fits the driver)."""
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError:
        raise LiverSegError("PyTorch is required: install the 'PyTorch' extension from the Extensions Manager, "
                            "restart Slicer and try again") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None:
        raise LiverSegError("PyTorch could not be installed (see the Python console)")


def ensure_dependencies(ask: bool = True) -> None:
    """Make torch and the engine's packages importable, or raise LiverSegError saying what is missing."""
    torch = torch_needed()
    packages = missing_packages()
    if not torch and not packages:
        return
    wanted = ([f"torch>={MINIMUM_TORCH} (through the PyTorch extension)"] if torch else []) + packages
    if slicer.app.testingEnabled():
        raise LiverSegError(f"LiverSeg needs these Python packages, which are not installed: {', '.join(wanted)}")
    if ask and not slicer.util.confirmOkCancelDisplay(
        "LiverSeg needs these Python packages, which will be downloaded and installed now (this takes a few "
        "minutes):\n\n" + "\n".join(wanted) + "\n\nSlicer's own numpy and SimpleITK are not changed.",
        "LiverSeg: install Python packages",
    ):
        raise LiverSegError(f"LiverSeg cannot run without: {', '.join(wanted)} (installation declined)")
    if torch:
        install_torch()
    if packages:
        install_packages(packages)
    importlib.invalidate_caches()  # find_spec must see what pip just installed
    still = (["torch"] if torch_needed() else []) + missing_packages()
    if still:
        raise LiverSegError(f"could not install: {', '.join(still)} (see the Python console)")
