"""Only here to ship the bundled model(s) with the wheel: every Resources/Models/<name>/ folder goes to
<prefix>/share/liverseg/Models/<name>/, where LiverSegExtension.model looks for it. All else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

MODELS = Path("Resources") / "Models"
FILES = ("card.json", "model.safetensors", "model.onnx")
data_files = [
    (f"share/liverseg/Models/{folder.name}", [str(folder / f) for f in FILES if (folder / f).is_file()])
    for folder in sorted(MODELS.glob("*"))
    if folder.is_dir()
]
setup(data_files=[entry for entry in data_files if entry[1]])
