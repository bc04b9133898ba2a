"""The Slicer panel and its engine process, on slicer-core's real MRML with the Qt stand-in.

The panel is built as Slicer builds it (setup, enter, exit, cleanup), once in a Python where torch, monai
and safetensors cannot be imported (a fresh Slicer), and once driving the real engine process with the
bundled model: progress, nodes fixed at the start, cancel, a killed engine, dependencies, no leaked nodes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, requires_bundled_model
from synthetic import make_affine, phantom

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.metrics import dice

slicer = pytest.importorskip("slicer")
TESTING = ROOT / "Testing"

PANEL_WITHOUT_TORCH = r"""
import json, sys
BLOCKED = ("torch", "monai", "safetensors")

class Blocker:  # importing any of these fails, as in a Slicer where they were never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Blocker())
sys.path[:0] = PATHS
import slicer_app
slicer_app.install(testing=True)
import numpy as np
import slicer
import LiverSeg

out = {}
widget = LiverSeg.LiverSegWidget()
widget.setup()
widget.parent.isEntered = True
widget.enter()
ui = widget.ui
out["models"] = [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)]
out["card"] = ui.modelCardLabel.text
out["devices"] = [ui.deviceComboBox.model().item(i).isEnabled() for i in range(ui.deviceComboBox.count)]
out["apply_before"] = bool(ui.applyButton.enabled)
ct = np.full((30, 64, 64), -1000, np.int16)
ct[5:25, 10:54, 10:54] = 40
volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-2.0, -2.0, 3.0, 1.0]), name="CT")
ui.inputVolumeSelector.setCurrentNode(volume)
out["apply_after"] = bool(ui.applyButton.enabled)
out["parameter"] = widget._parameterNode.inputVolume.GetID() == volume.GetID()
nodes = slicer.mrmlScene.GetNumberOfNodes()
try:
    ui.applyButton.click()
except Exception as exc:  # tryWithErrorDisplay shows it, then raises on (PythonQt prints it)
    out["apply_error"] = str(exc)
out["scene_unchanged"] = slicer.mrmlScene.GetNumberOfNodes() == nodes
widget.exit()
widget.cleanup()
out["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print("RESULT " + json.dumps(out))
"""


def test_panel_builds_without_torch(tmp_path):
    """A fresh Slicer: no torch, monai or safetensors. The panel opens, lists the bundled model with its
    card, enables Apply once a CT is selected, and Apply says what is missing instead of crashing."""
    paths = [str(TESTING / "StandIns"), str(ROOT / "LiverSegModule"), str(ROOT), str(TESTING)]
    script = PANEL_WITHOUT_TORCH.replace("PATHS", repr(paths), 1)
    (tmp_path / "panel.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "panel.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "LIVERSEG_MODELS_DIR": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["models"] == ["liverseg v1.0.0"]
    assert out["card"].startswith("liverseg v1.0.0, validation Dice 0.9")
    assert out["devices"] == [True, True, False, False]  # GPUs only once the engine process has looked
    assert out["apply_before"] is False and out["apply_after"] is True and out["parameter"] is True
    assert "torch" in out["apply_error"] and "monai" in out["apply_error"]
    assert out["scene_unchanged"] is True
    assert out["loaded"] == []


# -- the real engine process -----------------------------------------------------------------------------
def add_ct(name: str, shape=(50, 110, 120), spacing=(3.0, 3.0, 5.0), left_handed=False):
    """A synthetic CT node (body, liver-like blob) on a left-handed, oblique grid when asked."""
    from synthetic import rotation

    m = make_affine(spacing, shape, rotation(0.1, -0.05, 0.2) if left_handed else None, left_handed=left_handed)
    ct, _ = phantom(shape, m)
    return slicer.util.addVolumeFromArray(ct, ijkToRAS=m, name=name)


@pytest.fixture()
def panel(scene):
    """The panel as Slicer builds it (setup, then enter); cleaned up as Slicer does when it closes."""
    import LiverSeg

    widget = LiverSeg.LiverSegWidget()
    widget.setup()
    widget.parent.isEntered = True
    widget.enter()
    yield widget
    widget.cleanup()


def poll_until_done(widget, timeout_s: float = 300.0, during=None) -> list[tuple[int, str]]:
    """The event loop's part: fire the panel's 100 ms timer until the run is over."""
    seen = []
    end = time.monotonic() + timeout_s
    while widget._timer.isActive():
        assert time.monotonic() < end, "the run did not finish"
        widget._timer.timeout()
        seen.append((widget.ui.progressBar.value, widget.ui.statusLabel.text))
        if during is not None:
            during(seen)
        time.sleep(0.05)
    return seen


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@requires_bundled_model
def test_panel_runs_the_engine_process_on_the_nodes_chosen_at_start(scene, panel):
    from LiverSeg import LiverSegLogic
    from LiverSegLib.mrml import segment_mask

    first, second = add_ct("first", left_handed=True), add_ct("second", shape=(40, 100, 100))
    panel.ui.inputVolumeSelector.setCurrentNode(first)
    panel.ui.applyButton.click()
    assert panel._run is not None
    assert not panel.ui.applyButton.enabled and panel.ui.cancelButton.enabled
    assert not panel.ui.inputVolumeSelector.enabled and not panel.ui.outputSegmentationSelector.enabled
    pid = panel.logic._engine.pid
    panel._parameterNode.inputVolume = second  # the selection changes while the engine works
    seen = poll_until_done(panel)
    assert any(0 < value < 100 for value, _ in seen), seen  # progress arrived before the end
    assert any("Segmenting the liver" in text for _, text in seen)
    seg = panel._parameterNode.outputSegmentation
    assert seg is not None and seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == first.GetID()
    assert panel.ui.statusLabel.text.startswith("Liver: ")
    assert panel.ui.applyButton.enabled and panel.ui.inputVolumeSelector.enabled
    # The engine process gives exactly what the engine gives in this process.
    segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    through_process = segment_mask(seg, segment_id, first)
    here = LiverSegLogic().process(first, None, device="cpu")
    in_process = segment_mask(here.segmentation_node, here.segment_id, first)
    assert in_process.any() and dice(through_process, in_process) >= 0.999
    # Where the model hesitated: the same band from the engine process as in this process; shown on request.
    assert "uncertainty 0." in panel.ui.statusLabel.text
    panel._parameterNode.inputVolume = first
    panel._updateButtons()
    assert panel.ui.showUncertainCheckBox.enabled and panel.ui.jumpUncertainButton.enabled
    band = panel.logic.uncertainBand(seg, first)
    assert band.any() and dice(band, LiverSegLogic.uncertainBand(here.segmentation_node, first)) >= 0.99
    panel.ui.showUncertainCheckBox.click()
    uncertain = seg.GetSegmentation().GetSegmentIdBySegmentName("Liver: uncertain")
    assert uncertain and np.array_equal(segment_mask(seg, uncertain, first) > 0, band)
    panel.ui.jumpUncertainButton.click()
    panel.ui.showUncertainCheckBox.click()
    assert not seg.GetSegmentation().GetSegmentIdBySegmentName("Liver: uncertain")
    # A second click reuses the warm engine.
    panel.ui.applyButton.click()
    poll_until_done(panel)
    assert panel.logic._engine.pid == pid
    assert panel._parameterNode.outputSegmentation.GetID() == seg.GetID()  # updated in place
    slicer.app.quit()  # Slicer exits: the engine goes with it
    assert not alive(pid)


@requires_bundled_model
def test_cancel_mid_run_leaves_the_scene_unchanged_and_no_engine(scene, panel):
    volume = add_ct("ct")
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    before = scene.GetNumberOfNodes()
    panel.ui.applyButton.click()
    pid = panel.logic._engine.pid
    stages = []

    def cancel_while_segmenting(seen) -> None:  # at the engine's first step of this run
        if panel._run is not None and panel._run.stage in ("loading the model", "locating the liver"):
            stages.append(panel._run.stage)
            panel.ui.cancelButton.click()

    poll_until_done(panel, during=cancel_while_segmenting)
    assert stages, "the run ended before any step of it was seen"
    assert panel.ui.statusLabel.text == "Cancelled; the scene was not changed."
    assert scene.GetNumberOfNodes() == before
    assert not alive(pid)
    assert panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled


@requires_bundled_model
def test_a_killed_engine_gives_an_error_and_leaves_the_scene_unchanged(scene):
    from LiverSeg import LiverSegLogic

    volume = add_ct("ct")
    logic = LiverSegLogic()
    before = scene.GetNumberOfNodes()
    try:
        run = logic.start(volume, None, None, "cpu")
        pid = logic._engine.pid
        os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        assert run.wait(60)
        with pytest.raises(LiverSegError, match="the LiverSeg engine stopped before it finished .*killed or crashed"):
            logic.finish(run)
        assert scene.GetNumberOfNodes() == before
        assert not run.workdir.exists()  # the private CT copy is gone
        # The next run starts a new engine and works.
        run = logic.start(volume, None, None, "cpu")
        assert run.wait(300) and logic._engine.pid != pid
        assert logic.finish(run).segmentation_node is not None
    finally:
        logic.shutdown()


@requires_bundled_model
def test_a_volume_removed_during_the_run_is_an_error_not_a_crash(scene):
    from LiverSeg import LiverSegLogic

    volume = add_ct("ct")
    logic = LiverSegLogic()
    try:
        run = logic.start(volume, None, None, "cpu")
        scene.RemoveNode(volume)
        assert run.wait(300)
        with pytest.raises(LiverSegError, match="input volume was removed"):
            logic.finish(run)
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    finally:
        logic.shutdown()


def test_a_mask_that_does_not_fit_the_volume_is_refused(scene):
    from LiverSeg import LiverSegLogic

    volume = add_ct("ct", shape=(20, 40, 40))
    before = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match="does not fit the volume"):
        LiverSegLogic()._write_result(volume, None, np.zeros((20, 40, 39), np.uint8), 0.0, 0.0, "m", [])
    assert scene.GetNumberOfNodes() == before


# -- no node left behind -----------------------------------------------------------------------------------
def nodes_by_class(scene) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_segment_mask_and_export_leave_no_node_behind(scene, threshold_segmenter, tmp_path):
    from LiverSeg import LiverSegLogic
    from LiverSegLib.mrml import segment_mask

    logic = LiverSegLogic()
    logic._segmenters[("", "cpu")] = threshold_segmenter
    volume = add_ct("ct", left_handed=True)
    run = logic.process(volume, None, device="cpu")
    before = nodes_by_class(scene)
    for _ in range(2):
        assert segment_mask(run.segmentation_node, run.segment_id, volume).any()
    logic.exportForTraining(volume, run.segmentation_node, tmp_path / "dataset")
    assert nodes_by_class(scene) == before


# -- dependencies ------------------------------------------------------------------------------------------
def slicer_54_pip_install(requirements) -> list[str]:
    """What Slicer 5.4-5.10's ``slicer.util.pip_install`` hands to pip: a string is shlex.split."""
    return shlex.split(requirements) if isinstance(requirements, str) else list(requirements)


@pytest.fixture()
def fresh_slicer(scene, monkeypatch):
    """Not in testing mode, monai missing: what a user sees on the first click."""
    from LiverSegLib import dependencies

    monkeypatch.setattr(slicer.app, "_testing", False)
    monkeypatch.setattr(dependencies, "importable", lambda name: name != "monai" or installed["monai"])
    installed = {"monai": False}
    dialogs: list[str] = []

    def confirm(text, *args, **kwargs) -> bool:
        dialogs.append(text)
        return True

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    return dependencies, installed, dialogs


def test_pip_arguments_keep_a_windows_path_with_spaces(fresh_slicer, monkeypatch, tmp_path):
    dependencies, installed, dialogs = fresh_slicer
    odd = tmp_path / r"C:\Users\John Smith\AppData\Local\Temp"
    odd.mkdir()
    monkeypatch.setattr(dependencies.tempfile, "tempdir", str(odd))
    monkeypatch.setattr(dependencies, "_packaging_module", lambda: None)  # Slicer 5.4-5.10
    calls = []

    def pip_install(requirements, **kwargs) -> None:
        calls.append(slicer_54_pip_install(requirements))
        installed["monai"] = True

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    dependencies.ensure_dependencies(ask=True)
    assert len(dialogs) == 1 and "monai>=1.3" in dialogs[0]
    (args,) = calls
    assert args[:1] == ["monai>=1.3"] and args[1] == "--constraint"
    constraints = args[2]
    assert constraints.startswith(str(odd)) and os.path.isfile(constraints)
    assert "numpy==" in open(constraints).read()


def test_pip_ensure_is_used_without_a_second_dialog_when_slicer_packaging_imports(fresh_slicer, monkeypatch):
    import types

    dependencies, installed, dialogs = fresh_slicer
    calls = []

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None, **kwargs) -> None:
        calls.append((list(requirements), prompt_install, requester))
        installed["monai"] = True

    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    monkeypatch.setattr(slicer, "packaging", sys.modules["slicer.packaging"], raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("pip_install used beside pip_ensure"))
    dependencies.ensure_dependencies(ask=True)
    assert calls == [(["monai>=1.3"], False, "LiverSeg")]
    assert len(dialogs) == 1


def test_declined_consent_installs_nothing(fresh_slicer, monkeypatch):
    dependencies, installed, _ = fresh_slicer
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("installed without consent"))
    with pytest.raises(LiverSegError, match="installation declined"):
        dependencies.ensure_dependencies(ask=True)


def test_torch_comes_from_the_pytorch_extension_with_a_minimum_version(fresh_slicer, monkeypatch):
    import types

    dependencies, installed, dialogs = fresh_slicer
    installed["monai"] = True
    state = {"torch": False}
    monkeypatch.setattr(dependencies, "torch_needed", lambda: not state["torch"])
    asked = []

    class PyTorchUtilsLogic:  # the PyTorch extension's logic (PyTorchUtils.py), as far as LiverSeg calls it
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            asked.append((askConfirmation, torchVersionRequirement))
            state["torch"] = True
            return types.SimpleNamespace(__version__="2.5.0")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    dependencies.ensure_dependencies(ask=True)
    assert asked == [(False, ">=2.0")] and len(dialogs) == 1 and "torch>=2.0" in dialogs[0]


def test_self_test_skips_and_says_what_to_install_without_the_packages(scene, monkeypatch):
    import unittest

    from LiverSeg import LiverSegTest
    from LiverSegLib import dependencies

    monkeypatch.setattr(dependencies, "importable", lambda name: name not in ("torch", "monai"))
    with pytest.raises(unittest.SkipTest, match="install torch .*monai"):
        LiverSegTest().runTest()


@requires_bundled_model
def test_a_batch_case_leaves_no_node_behind(tmp_path, monkeypatch):
    """The batch's scene holds after each case exactly what it held before (labelmaps' color tables too)."""
    import importlib.util

    import SimpleITK as sitk

    from LiverSegExtension.geometry import image_from_array

    m = make_affine((3.0, 3.0, 5.0), (40, 100, 110), left_handed=True)
    ct, _ = phantom((40, 100, 110), m)
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    spec = importlib.util.spec_from_file_location("LiverSegBatch", ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    contexts = []
    original = batch.SceneContext.__init__

    def record(self) -> None:
        original(self)
        contexts.append((self, nodes_by_class(self.scene)))

    monkeypatch.setattr(batch.SceneContext, "__init__", record)
    assert batch.run(["--input", str(tmp_path / "ct.nii.gz"), str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"),
                      "--labelmap", "--device", "cpu"]) == 0
    ((ctx, before),) = contexts
    assert (tmp_path / "out" / "ct_2_liver.nii.gz").is_file()
    assert nodes_by_class(ctx.scene) == before


@pytest.mark.parametrize("error, said", [(MemoryError(), "out of memory; close other programs"),
                                         (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                          "the device ran out of memory; try the CPU")])
def test_running_out_of_memory_is_a_short_error_and_changes_nothing(scene, threshold_segmenter, monkeypatch,
                                                                   error, said):
    """The engine turns allocation failures into a user error, for every door (here the logic's)."""
    from LiverSeg import LiverSegLogic

    def predict(stage, volume):
        raise error

    monkeypatch.setattr(threshold_segmenter, "predict", predict)
    logic = LiverSegLogic()
    logic._segmenters[("", "cpu")] = threshold_segmenter
    volume = add_ct("ct", shape=(40, 80, 80))
    before = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match=f"ct: {said}"):
        logic.process(volume, None, device="cpu")
    assert scene.GetNumberOfNodes() == before
