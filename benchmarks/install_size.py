"""What segmenting needs installed beyond 3D Slicer's own Python packages, and what PyTorch would add.

    python benchmarks/install_size.py [--with-torch]

Installs, with pip from the package index, into empty target folders: what the Slicer panel's first click
installs (onnxruntime and its dependencies), and with --with-torch the CPU build of torch (the smallest
there is; a CUDA build is several GB). Packages Slicer already ships (numpy, scipy, SimpleITK, vtk, pydicom,
requests and their dependencies) are not counted. Prints one JSON line per requirement set: the wheels'
download size and the installed size, per package and in all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SLICER_SHIPS = {"numpy", "scipy", "simpleitk", "vtk", "pydicom", "requests", "urllib3", "idna", "certifi",
                "charset_normalizer", "charset-normalizer", "packaging", "pip", "setuptools"}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def measure(requirements: list[str], work: Path) -> dict:
    wheels, target = work / "wheels", work / "target"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *requirements], check=True)
    counted = [w for w in wheels.iterdir() if w.name.split("-")[0].lower().replace("_", "-") not in SLICER_SHIPS
               and w.name.split("-")[0].lower() not in SLICER_SHIPS]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    *map(str, counted)], check=True)
    per_package: dict[str, float] = {}
    for entry in target.iterdir():
        name = entry.name.split("-")[0].lower()
        if entry.name.endswith((".dist-info", ".data")):
            name = entry.name.split("-")[0].lower()
        size = folder_size(entry) if entry.is_dir() else entry.stat().st_size
        per_package[name] = per_package.get(name, 0) + size
    return {"requirements": requirements,
            "wheels": {w.name: round(w.stat().st_size / 1e6, 1) for w in counted},
            "download_mb": round(sum(w.stat().st_size for w in counted) / 1e6, 1),
            "installed_mb": round(folder_size(target) / 1e6, 1),
            "installed_per_package_mb": {k: round(v / 1e6, 1) for k, v in sorted(per_package.items(), key=lambda kv: -kv[1])
                                         if v > 100_000}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-torch", action="store_true", help="also measure the CPU build of torch")
    args = parser.parse_args()
    sets = [["onnxruntime>=1.16"]]
    if args.with_torch:
        sets.append(["torch==2.13.0"])  # pinned: the CPU wheel where the package index serves one
    for requirements in sets:
        with tempfile.TemporaryDirectory(prefix="liverseg-size-") as tmp:
            print(json.dumps(measure(requirements, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
