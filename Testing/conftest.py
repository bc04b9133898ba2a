"""Shared fixtures. Real data is read from ../shared/data when it exists; tests needing it skip otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Test-only stand-ins for what slicer-core lacks; must come before the first ``import slicer``.
sys.path.insert(0, str(Path(__file__).resolve().parent / "StandIns"))
sys.path.insert(0, str(ROOT / "LiverSegModule"))

SHARED = Path(os.environ.get("LIVERSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


# -- tiers: `pytest --fast` (bash Testing/run_tests.sh --fast) runs the in-process tests alone ------------------
def pytest_addoption(parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="the fast tier: skip the tests marked slow (training, every real CT) and every test that "
                          "starts a process (the CLI, the batch, the engine process); CI runs all")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: trains a model or reads every real CT (left out by --fast)")
    config.addinivalue_line("markers", "process: starts a process: the CLI, the batch script or the engine as a process "
                                       "of its own, a PythonSlicer launcher (left out by --fast)")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--fast"):
        for item in items:
            for mark, reason in (("slow", "slow tier: run without --fast"),
                                 ("process", "starts a process: slow tier, run without --fast")):
                if mark in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))
                    break


@pytest.fixture(autouse=True)
def _processes_are_marked(request, monkeypatch):
    """With --fast, a test that starts a process without saying so (``@pytest.mark.process``) fails: the fast tier
    stays in-process, and what it leaves out is named by the marker, not found out at run time."""
    if request.config.getoption("--fast"):
        import subprocess

        def refuse(self, *args, **kwargs):
            pytest.fail("starts a process but is not marked @pytest.mark.process")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def _no_exception_leaves_a_slot():
    """PythonQt prints an exception that leaves a slot and goes on, as the qt stand-in does: a test fails on any
    it did not take itself (``qt.take_slot_errors()``)."""
    qt = sys.modules.get("qt")
    if hasattr(qt, "take_slot_errors"):
        qt.take_slot_errors()
    yield
    qt = sys.modules.get("qt")
    errors = qt.take_slot_errors() if hasattr(qt, "take_slot_errors") else []
    if errors:
        pytest.fail(f"an exception left a slot (PythonQt prints its traceback and goes on): {errors[0]!r}")


requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not found at {SHARED} (set LIVERSEG_SHARED_DATA)")


def bundled_model():
    from LiverSegExtension.model.catalog import default_model_dir

    return default_model_dir()


requires_bundled_model = pytest.mark.skipif(bundled_model() is None, reason="no trained model in Resources/Models")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real, untrained, small LiverSeg model folder (safetensors + card)."""
    import torch

    from LiverSegExtension.model.networks import DEFAULT_CONFIG, LiverModel

    torch.manual_seed(0)
    card = {"name": "tiny-test", "version": "0.0.1", **DEFAULT_CONFIG}
    stages = DEFAULT_CONFIG["stages"]
    card["stages"] = {
        s: {**stages[s], "network": {**stages[s]["network"], "channels": ch}, "patch_size": [32, 32, 32]}
        for s, ch in (("coarse", [4, 8, 8, 8]), ("fine", [4, 8, 8, 8, 8]))
    }
    return LiverModel.new(card).save(tmp_path_factory.mktemp("models") / "tiny-test-v0.0.1")


@pytest.fixture()
def threshold_segmenter(tiny_model_dir):
    """The real coarse-to-fine pipeline with the networks replaced by an intensity threshold, so that
    the expected mask is known exactly and every geometric step (grids, crops, resampling) is tested."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    class ThresholdSegmenter(LiverSegmenter):
        def predict(self, stage: str, volume: np.ndarray) -> np.ndarray:
            volume = np.asarray(volume)  # phantom liver 160 HU, body 30 HU, bone (where a test adds it) 400 HU
            return ((volume > 95) & (volume < 300)).astype(np.float32)

    return ThresholdSegmenter(tiny_model_dir, device="cpu")


@pytest.fixture()
def scene():
    """A fresh real vtkMRMLScene as slicer.mrmlScene, with the segmentation converters registered."""
    import slicer_app

    return slicer_app.install(testing=True)


@pytest.fixture()
def slicer_launcher(tmp_path, monkeypatch) -> Path:
    """``PythonSlicer`` on PATH as Slicer has it: CTK's launcher (StandIns/python_launcher.py), which runs this
    Python as its child. Engine processes started by the module then sit behind a launcher, as in Slicer."""
    folder = tmp_path / "launcher-bin"
    folder.mkdir()
    launcher = folder / "PythonSlicer"
    stand_in = Path(__file__).resolve().parent / "StandIns" / "python_launcher.py"
    launcher.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(stand_in)!r}, run_name='__main__')\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return launcher


def open_panel():
    """The panel as Slicer's module manager builds it: the widget under its module panel, set up, entered.
    Returns (module panel, widget); close with :func:`close_panel`."""
    import LiverSeg
    from slicer.ScriptedLoadableModule import ModulePanel

    module = ModulePanel(LiverSeg.LiverSegWidget)
    widget = module.setup()
    module.enter()
    return module, widget


def close_panel(module) -> None:
    """As Slicer does when the module is left, then the application closes."""
    if module.isEntered:
        module.exit()
    module.widget.cleanup()


def alive(pid: int | None) -> bool:
    """Whether a process runs (a zombie has ended)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int | None, seconds: float = 5.0) -> bool:
    import time

    end = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True
