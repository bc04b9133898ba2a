"""The extension's build and metadata follow the source tree: every Python file the module needs is
installed, the engine and the model files are installed recursively, and the catalog entry is complete."""

from __future__ import annotations

import json
import re

from conftest import ROOT


def test_every_module_python_file_is_in_the_install_list():
    text = (ROOT / "LiverSegModule" / "CMakeLists.txt").read_text()
    listed = set(re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split())
    listed = {item.replace("${MODULE_NAME}", "LiverSeg") for item in listed}
    present = {p.relative_to(ROOT / "LiverSegModule").as_posix() for p in (ROOT / "LiverSegModule").rglob("*.py")}
    assert present == listed, (present - listed, listed - present)


def test_engine_and_models_are_installed_recursively():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert 'file(GLOB_RECURSE LIVERSEG_ENGINE_SCRIPTS RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} "LiverSegExtension/*.py")' in text
    for name in ("card.json", "model.safetensors", "model.onnx"):
        assert f'"Resources/Models/*/{name}"' in text
    for name in ("card.json", "model.safetensors", "model.onnx"):
        assert name in (ROOT / "setup.py").read_text()


def test_extension_metadata_is_complete():
    text = (ROOT / "CMakeLists.txt").read_text()
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        value = re.search(rf'set\(EXTENSION_{field} "(.*?)"\)', text).group(1)
        assert value.strip(), field
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "(.*?)"\)', text).group(1)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c.strip()) for c in contributors.split(","))  # Name (Organization)
    assert "non-commercial" in re.search(r'set\(EXTENSION_DESCRIPTION "(.*?)"\)', text).group(1)
    entry = json.loads((ROOT / "LiverSeg.json").read_text())
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert entry["category"] == "Segmentation" and entry["scm_url"] and entry["$schema"].endswith("schema-v1.0.1.json#")
    depends = re.search(r'set\(EXTENSION_DEPENDS "(.*?)"\)', text).group(1).split()
    assert entry.get("build_dependencies", []) == [d for d in depends if d != "NA"]  # "NA": none (Slicer's template)
    assert "Apache License" in (ROOT / "LICENSE").read_text()
