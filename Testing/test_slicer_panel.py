"""The Slicer panel and its engine process, on slicer-core's real MRML with the Qt stand-in.

The panel is built as Slicer builds it (setup, enter, exit, cleanup), once in a Python where torch, monai
and safetensors cannot be imported (a fresh Slicer), and once driving the real engine process with the
bundled model: progress, nodes fixed at the start, cancel, a killed engine, dependencies, no leaked nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, alive, close_panel, gone_within, open_panel, requires_bundled_model
from synthetic import make_affine, phantom

from LiverSegExtension.data.metrics import dice
from LiverSegExtension.errors import LiverSegError

slicer = pytest.importorskip("slicer")
TESTING = ROOT / "Testing"

BLOCKER = r"""
import os, sys
BLOCKED = tuple(os.environ.get("LIVERSEG_BLOCKED", "torch,monai,safetensors").split(","))

class Blocker:  # importing any of these fails, as in a Slicer where they were never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Blocker())
"""

PANEL_WITHOUT_TORCH = r"""
import json, sys, time
sys.path[:0] = PATHS
import slicer_app
slicer_app.install(testing=True)
import numpy as np
import slicer
from conftest import close_panel, open_panel
from synthetic import make_affine, phantom

out = {}
module, widget = open_panel()
ui = widget.ui
out["models"] = [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)]
out["card"] = ui.modelCardLabel.text
out["devices"] = [ui.deviceComboBox.model().item(i).isEnabled() for i in range(ui.deviceComboBox.count)]
out["apply_before"] = bool(ui.applyButton.enabled)
m = make_affine((3.0, 3.0, 5.0), (50, 110, 120))
ct, _ = phantom((50, 110, 120), m)
volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=m, name="CT")
ui.inputVolumeSelector.setCurrentNode(volume)
out["apply_after"] = bool(ui.applyButton.enabled)
out["parameter"] = widget._parameterNode.inputVolume.GetID() == volume.GetID()
ui.applyButton.click()
end = time.monotonic() + 240
while widget._timer.isActive() and time.monotonic() < end:
    widget._timer.timeout()
    time.sleep(0.05)
out["status"] = ui.statusLabel.text
seg = widget._parameterNode.outputSegmentation
out["segment"] = bool(seg and seg.GetSegmentation().GetSegmentIdBySegmentName("Liver"))
out["ready"] = widget.logic._engine.ready
# A GPU picked: PyTorch is installed (here by a stand-in pip, behind the launcher) in processes, never here.
slicer.app._testing = False
slicer.util.confirmOkCancelDisplay = lambda *args, **kwargs: True
widget._parameterNode.device = "cuda"
ui.applyButton.click()
while widget._timer.isActive() and time.monotonic() < end:
    widget._timer.timeout()
    time.sleep(0.05)
out["gpu_status"] = ui.statusLabel.text
close_panel(module)
out["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "monai", "safetensors"})
out["blocked"] = any(type(f).__name__ == "Blocker" for f in sys.meta_path)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.process
@requires_bundled_model
def test_panel_segments_without_torch(tmp_path, slicer_launcher):
    """A fresh Slicer: torch, monai and safetensors cannot be imported, in the panel's process or the engine's.
    The panel opens, lists the bundled model with its card, and a click segments through the engine process
    (behind the launcher) with ONNX Runtime; nothing of torch is imported in the panel's process."""
    paths = [str(TESTING / "StandIns"), str(ROOT / "LiverSegModule"), str(ROOT), str(TESTING)]
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)  # every Python started below: panel and engine
    script = PANEL_WITHOUT_TORCH.replace("PATHS", repr(paths), 1)
    (tmp_path / "panel.py").write_text(script)
    env = {**os.environ, "LIVERSEG_MODELS_DIR": str(tmp_path / "none"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(fake_installers(tmp_path))]),
           "LIVERSEG_FAKE_PIP_LOG": str(tmp_path / "pip.log")}
    proc = subprocess.run([sys.executable, str(tmp_path / "panel.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    from LiverSegExtension.model.catalog import bundled_model_name

    assert out["models"] == [bundled_model_name()]  # the bundled model, whichever version ships
    assert out["card"].startswith(f"{bundled_model_name()}, validation Dice 0.9")
    assert out["devices"] == [True, True, False, False]  # no GPU here, and none reachable
    assert out["apply_before"] is False and out["apply_after"] is True and out["parameter"] is True
    assert out["status"].startswith("Liver: ") and "onnxruntime" in out["status"] and "on cpu" in out["status"]
    assert out["segment"] is True
    assert out["ready"]["runtimes"]["torch"] is None and out["ready"]["runtimes"]["onnxruntime"]
    assert out["ready"]["devices"] == ["cpu"]
    commands = logged(tmp_path / "pip.log")
    assert [(c["module"], c["args"][0]) for c in commands] == [("pip", "install"), ("light_the_torch", "install"),
                                                              ("pip", "install")]
    assert out["gpu_status"] == "Installation failed."  # the stand-in pip installed nothing
    assert out["loaded"] == [] and out["blocked"] is True


# -- the real engine process -----------------------------------------------------------------------------
def add_ct(name: str, shape=(50, 110, 120), spacing=(3.0, 3.0, 5.0), left_handed=False):
    """A synthetic CT node (body, liver-like blob) on a left-handed, oblique grid when asked."""
    from synthetic import rotation

    m = make_affine(spacing, shape, rotation(0.1, -0.05, 0.2) if left_handed else None, left_handed=left_handed)
    ct, _ = phantom(shape, m)
    return slicer.util.addVolumeFromArray(ct, ijkToRAS=m, name=name)


@pytest.fixture()
def panel(scene, slicer_launcher):
    """The panel as Slicer builds it (setup, then enter), its engine behind CTK's launcher as in Slicer;
    cleaned up as Slicer does when it closes."""
    module, widget = open_panel()
    yield widget
    close_panel(module)


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


def wait_ready(run, timeout_s: float = 60.0) -> None:
    """Poll until the engine has said who it is (its pid behind the launcher)."""
    end = time.monotonic() + timeout_s
    while run.engine.ready is None and not run.done:
        assert time.monotonic() < end, "the engine never said ready"
        run.poll()
        run.engine.wait_for_output(50)


@pytest.mark.process
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
    import slicer

    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    when_shown = []

    def watch(_seen) -> None:  # the tick the segment is shown: its 3D surface comes one tick later
        node = panel._parameterNode.outputSegmentation
        if panel._run is None and not when_shown and node is not None:
            when_shown.append(node.GetSegmentation().ContainsRepresentation(surface))

    seen = poll_until_done(panel, during=watch)
    assert when_shown == [False]
    assert panel._parameterNode.outputSegmentation.GetSegmentation().ContainsRepresentation(surface)
    assert any(0 < value < 100 for value, _ in seen), seen  # progress arrived before the end
    assert any("Segmenting the liver" in text for _, text in seen)
    seg = panel._parameterNode.outputSegmentation
    assert seg is not None and seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == first.GetID()
    assert panel.ui.statusLabel.text.startswith("Liver: ") and "onnxruntime" in panel.ui.statusLabel.text
    assert panel.ui.applyButton.enabled and panel.ui.inputVolumeSelector.enabled
    engine = panel.logic._engine.engine_pid
    assert engine not in (None, pid) and alive(engine)  # the engine runs behind the launcher
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
    assert gone_within(pid) and gone_within(engine)


@pytest.mark.process
@requires_bundled_model
def test_cancel_mid_run_leaves_the_scene_unchanged_and_no_engine(scene, panel):
    volume = add_ct("ct")
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    before = scene.GetNumberOfNodes()
    panel.ui.applyButton.click()
    pid = panel.logic._engine.pid
    stages, engines = [], []

    def cancel_while_segmenting(seen) -> None:  # at the engine's first step of this run
        if panel._run is not None and panel._run.stage in ("loading the model", "locating the liver"):
            stages.append(panel._run.stage)
            engines.append(panel._run.engine.engine_pid)
            panel.ui.cancelButton.click()

    poll_until_done(panel, during=cancel_while_segmenting)
    assert stages, "the run ended before any step of it was seen"
    assert panel.ui.statusLabel.text == "Cancelled; the scene was not changed."
    assert scene.GetNumberOfNodes() == before
    assert engines[0] not in (None, pid)
    assert gone_within(pid) and gone_within(engines[0])  # the launcher and the engine behind it
    assert panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled


@pytest.mark.process
@requires_bundled_model
def test_a_killed_engine_gives_an_error_and_leaves_the_scene_unchanged(scene, slicer_launcher):
    from LiverSeg import LiverSegLogic

    volume = add_ct("ct")
    logic = LiverSegLogic()
    before = scene.GetNumberOfNodes()
    try:
        run = logic.start(volume, None, "cpu")
        wait_ready(run)
        pid = logic._engine.pid
        os.kill(logic._engine.engine_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        assert run.wait(60)
        # Behind the launcher the crash is only "exit code 1": the protocol tells it (no answer came).
        with pytest.raises(LiverSegError, match=r"ct: the LiverSeg engine crashed or was killed \(out of memory\?\) "
                                                r"before it finished \(exit code 1"):
            logic.finish(run)
        assert scene.GetNumberOfNodes() == before
        assert not run.workdir.exists()  # the private CT copy is gone
        # The next run starts a new engine and works.
        run = logic.start(volume, None, "cpu")
        assert run.wait(300) and logic._engine.pid != pid
        assert logic.finish(run).segmentation_node is not None
    finally:
        logic.shutdown()


@pytest.mark.process
@requires_bundled_model
@requires_bundled_model
def test_a_killed_launcher_takes_the_engine_with_it(scene, slicer_launcher):
    """CTK's launcher does not end its child when it is killed: the engine ends itself when its parent goes."""
    from LiverSeg import LiverSegLogic

    logic = LiverSegLogic()
    try:
        run = logic.start(add_ct("ct"), None, "cpu")
        wait_ready(run)
        engine = logic._engine.engine_pid
        os.kill(logic._engine.pid, signal.SIGKILL)
        assert gone_within(engine)
        assert run.wait(30) and run.error is not None
    finally:
        logic.shutdown()


@pytest.mark.process
def test_an_engine_of_another_protocol_is_refused(scene, tmp_path):
    """A worker that answers with another protocol version is refused with a clear message and ended."""
    from LiverSegLib.engine import EngineProcess, SegmentRun

    fake = tmp_path / "old_worker.py"
    fake.write_text("import json, os, sys, time\n"
                    "print(json.dumps({'event': 'ready', 'protocol': 1, 'pid': os.getpid()}), flush=True)\n"
                    "time.sleep(60)\n")
    engine = EngineProcess(sys.executable).start([str(fake)])
    run = SegmentRun(engine, {"id": 1, "output": str(tmp_path / "m.nrrd")}, tmp_path / "work", scene, "", None, "ct")
    assert run.wait(30)
    assert "speaks protocol 1, this panel 2" in str(run.error)
    assert not engine.running


@pytest.mark.process
def test_a_volume_removed_during_the_run_is_an_error_not_a_crash(scene, slicer_launcher):
    from LiverSeg import LiverSegLogic

    volume = add_ct("ct")
    logic = LiverSegLogic()
    try:
        run = logic.start(volume, None, "cpu")
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

    logic = LiverSegLogic(segmenterFactory=lambda model_path, device: threshold_segmenter)
    volume = add_ct("ct", left_handed=True)
    run = logic.process(volume, None, device="cpu")
    before = nodes_by_class(scene)
    for _ in range(2):
        assert segment_mask(run.segmentation_node, run.segment_id, volume).any()
    logic.exportForTraining(volume, run.segmentation_node, tmp_path / "dataset")
    assert nodes_by_class(scene) == before


# -- dependencies ------------------------------------------------------------------------------------------
FAKE_INSTALLER = r"""
import json, os, sys, time
arguments = sys.argv[1:]
constraints = arguments[arguments.index("--constraint") + 1] if "--constraint" in arguments else None
with open(os.environ["LIVERSEG_FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps({"module": __spec__.name.split(".")[0], "args": arguments, "pid": os.getpid(),
                          "path0": sys.path[0], "constraints": open(constraints).read() if constraints else None}) + "\n")
print("Collecting " + (arguments[arguments.index("--constraint") - 1] if constraints else arguments[-1]), flush=True)
if os.environ.get("LIVERSEG_FAKE_PIP_STAY"):  # as on Windows: nothing ends this process when its launcher goes
    os._exit = lambda code: None
time.sleep(float(os.environ.get("LIVERSEG_FAKE_PIP_SLEEP", "0")))
sys.exit(int(os.environ.get("LIVERSEG_FAKE_PIP_EXIT", "0")))
"""


def fake_installers(folder):
    """``pip`` and ``light_the_torch`` that log what they were asked (arguments, constraints, pid, first
    ``sys.path`` entry) and install nothing: put first on PYTHONPATH, they are what ``python -m`` runs."""
    root = folder / "fake-installers"
    for name in ("pip", "light_the_torch"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text("")
        (root / name / "__main__.py").write_text(FAKE_INSTALLER)
    return root


@pytest.fixture()
def fresh_slicer(scene, monkeypatch, tmp_path, slicer_launcher):
    """Not in testing mode, with packages missing until the (recorded) installer has run: what a user sees on
    the first click. Installs run as in Slicer (PythonSlicer, its child running LiverSeg's installer), with a
    pip and a light-the-torch that log their arguments."""
    from LiverSegLib import dependencies

    log = tmp_path / "pip.log"
    monkeypatch.setenv("LIVERSEG_FAKE_PIP_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", str(fake_installers(tmp_path)))
    monkeypatch.setattr(slicer.app, "_testing", False)
    absent = {"onnxruntime", "torch", "monai", "onnx", "safetensors"}

    def installed(name: str) -> bool:
        return name not in absent or log.exists()  # there once the installer ran

    monkeypatch.setattr(dependencies, "installed", installed)
    dialogs: list[str] = []

    def confirm(text, *args, **kwargs) -> bool:
        dialogs.append(text)
        return True

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    return dependencies, log, dialogs


def logged(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_what_each_use_needs(fresh_slicer):
    dependencies, _, _ = fresh_slicer
    assert dependencies.missing_packages("auto") == ["onnxruntime>=1.16"]
    assert dependencies.missing_packages("cpu") == ["onnxruntime>=1.16"]
    for device, training in (("cuda", False), ("mps", False), ("cpu", True)):
        assert dependencies.missing_packages(device, training) == [
            "torch>=2.0", "onnxruntime>=1.16", "monai>=1.3", "safetensors>=0.4", "onnx>=1.15"]


@pytest.mark.process
@requires_bundled_model
def test_first_click_installs_onnxruntime_in_a_process_then_segments(fresh_slicer, panel):
    """One dialog, onnxruntime alone, pip in a process (progress on the panel, Slicer not blocked), a
    constraints file that keeps Slicer's numpy and pip; then the run starts by itself."""
    dependencies, log, dialogs = fresh_slicer
    panel.ui.inputVolumeSelector.setCurrentNode(add_ct("ct"))
    panel.ui.applyButton.click()
    assert panel._installRun is not None and panel._run is None
    assert not panel.ui.applyButton.enabled and panel.ui.cancelButton.enabled
    assert panel.ui.statusLabel.text == "Installing onnxruntime>=1.16..."
    install = panel._installRun
    poll_until_done(panel)
    assert len(dialogs) == 1 and "onnxruntime>=1.16" in dialogs[0] and "torch" not in dialogs[0]
    (pip,) = logged(log)
    assert pip["module"] == "pip" and pip["args"][:3] == ["install", "onnxruntime>=1.16", "--constraint"]
    assert "numpy==" in pip["constraints"] and "pip==" in pip["constraints"]
    assert install.done and install.stage.startswith("Collecting onnxruntime")  # pip's last line, shown as progress
    assert install.child == pip["pid"]  # the installer behind the launcher said who it is
    assert not install.folder.exists()  # constraints removed
    assert panel.ui.statusLabel.text.startswith("Liver: ")


@pytest.mark.process
def test_a_gpu_installs_torch_with_light_the_torch_leaving_slicer_s_pip_alone(fresh_slicer):
    """Picking CUDA installs torch with light-the-torch (the CUDA build for the driver), which is installed
    into a private folder with the pip it requires (light-the-torch 0.8.1 wants pip < 26.1, Slicer 5.10 ships
    26.1), then MONAI and the rest with Slicer's pip, each command in a process (that the panel's process
    never imports torch is checked with torch blocked, in test_panel_segments_without_torch)."""
    dependencies, log, dialogs = fresh_slicer
    run = dependencies.InstallRun(dependencies.missing_packages("cuda"))
    private = run.folder / "light-the-torch"
    assert run.wait(60) and run.error is None and run.still_missing() == []
    ltt_install, ltt, rest = logged(log)
    assert ltt_install["module"] == "pip" and ltt_install["args"] == ["install", "--target", str(private),
                                                                      "light-the-torch>=0.5"]
    assert ltt_install["constraints"] is None  # its own pip may be older than Slicer's: it stays in that folder
    assert ltt["module"] == "light_the_torch" and ltt["args"][:2] == ["install", "torch>=2.0"]
    assert ltt["path0"] == str(private)  # light-the-torch runs with the pip in that folder
    assert rest["module"] == "pip" and rest["args"][:4] == ["install", "onnxruntime>=1.16", "monai>=1.3",
                                                            "safetensors>=0.4"]
    for command in (ltt, rest):
        assert "pip==" in command["constraints"] and "numpy==" in command["constraints"]
    assert not run.folder.exists()  # the private folder and the constraints are gone


@pytest.mark.process
def test_an_old_torch_is_upgraded_not_pinned(fresh_slicer, monkeypatch):
    """torch older than the engine needs: what installs torch leaves it out of its constraints (pinning the
    old one would make ``torch>=2.0`` unresolvable); the commands after it keep torch as it then is."""
    dependencies, log, _ = fresh_slicer
    installed_version = dependencies.version
    monkeypatch.setattr(dependencies, "version",
                        lambda dist: "1.13.1" if dist == "torch" else installed_version(dist))
    monkeypatch.setattr(dependencies, "installed", lambda name: name == "torch" or log.exists())
    packages = dependencies.missing_packages("cuda")
    assert packages[0] == "torch>=2.0"
    run = dependencies.InstallRun(packages)
    assert run.wait(60) and run.error is None
    _, ltt, rest = logged(log)
    assert "torch==" not in ltt["constraints"] and "numpy==" in ltt["constraints"]
    assert "torch==1.13.1" in rest["constraints"]


@pytest.mark.process
def test_a_cancelled_install_ends_pip_behind_the_launcher(fresh_slicer, monkeypatch, panel):
    """Cancel, and Slicer quitting, kill pip too: it runs behind CTK's launcher, which leaves its child
    running when killed (here pip stays, as on Windows, where nothing ends it when its launcher goes)."""
    dependencies, log, _ = fresh_slicer
    monkeypatch.setenv("LIVERSEG_FAKE_PIP_SLEEP", "120")
    monkeypatch.setenv("LIVERSEG_FAKE_PIP_STAY", "1")
    children = []
    try:
        for stop in ("cancel", "quit"):
            panel.ui.inputVolumeSelector.setCurrentNode(add_ct(stop, shape=(20, 40, 40)))
            panel.ui.applyButton.click()
            install = panel._installRun
            launcher = int(install._process.processId())
            while not logged(log):  # pip has started (a test of the cancel, not of its timing)
                assert not install.poll(), install.error
                install._process.waitForReadyRead(100)
            children.append(logged(log)[-1]["pid"])
            assert alive(children[-1]) and children[-1] != launcher
            if stop == "cancel":
                panel.ui.cancelButton.click()
                panel.onPoll()
                assert panel.ui.statusLabel.text == "Installation cancelled."
                assert panel.ui.applyButton.enabled and panel._installRun is None
            else:
                slicer.app.quit()  # aboutToQuit: the panel stops everything
            assert gone_within(launcher) and gone_within(children[-1]), stop
            assert not install.folder.exists()
            log.unlink()
            children.clear()
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.process
def test_a_failed_install_says_so_with_pip_s_output(fresh_slicer, monkeypatch):
    dependencies, log, _ = fresh_slicer
    monkeypatch.setenv("LIVERSEG_FAKE_PIP_EXIT", "1")
    run = dependencies.InstallRun(["onnxruntime>=1.16"])
    assert run.wait(60)
    assert "could not install onnxruntime>=1.16: pip ended with exit code 1" in str(run.error)
    assert "Collecting onnxruntime" in run.details


@pytest.mark.process
def test_a_real_pip_run_of_what_is_there_goes_through(tmp_path, monkeypatch):
    """The installer with the real pip (nothing to download: already satisfied), list arguments and a
    constraints file in a folder whose name has spaces (as under C:\\Users\\John Smith)."""
    from LiverSegLib import dependencies
    from LiverSegLib.dependencies import InstallRun

    spaced = tmp_path / "John Smith" / "Temp"
    spaced.mkdir(parents=True)
    monkeypatch.setattr(dependencies.tempfile, "tempdir", str(spaced))
    run = InstallRun(["onnxruntime>=1.16"], python=sys.executable)
    assert run.started[0][-1].startswith(str(spaced))  # the constraints file, one argument whole
    assert run.wait(120), "pip did not finish"
    assert run.error is None, run.details


def test_declined_consent_installs_nothing_and_is_no_error(fresh_slicer, monkeypatch, panel):
    """A user who says no is told so on the status line: no error dialog, the buttons as before."""
    dependencies, log, _ = fresh_slicer
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False)
    assert dependencies.ask_to_install(dependencies.missing_packages("auto")) is False
    panel.ui.inputVolumeSelector.setCurrentNode(add_ct("ct", shape=(20, 40, 40)))
    panel.ui.applyButton.click()
    assert panel.ui.statusLabel.text.startswith("Not installed: this needs onnxruntime>=1.16")
    assert errors == [] and panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled
    assert panel._installRun is None and panel._run is None and not log.exists()


def test_no_python_slicer_is_said_never_a_second_slicer(scene, monkeypatch, tmp_path):
    """Inside Slicer the engine and the installs need PythonSlicer; ``sys.executable`` there is no Python to
    start (Slicer sets it to PythonSlicer or ""; embedded, it is the application). Outside Slicer: this Python."""
    from LiverSegLib.dependencies import InstallRun
    from LiverSegLib.engine import EngineProcess, python_executable

    monkeypatch.setenv("PATH", str(tmp_path))  # no PythonSlicer there
    for make in (EngineProcess, lambda: InstallRun(["onnxruntime>=1.16"])):
        with pytest.raises(LiverSegError, match="PythonSlicer, Slicer's Python launcher, was not found on PATH"):
            make()
    monkeypatch.delattr(slicer, "app")  # plain Python with slicer-core: the batch's own Python
    assert python_executable() == sys.executable


def test_a_user_error_from_a_button_is_one_line_and_the_panel_goes_on(scene, monkeypatch, tmp_path):
    """No PythonSlicer on PATH, Segment Liver clicked, in a Slicer outside testing mode: the message in one line
    (status line and a dialog without details), nothing out of the slot (PythonQt would print its traceback),
    the buttons updated. A bug (any other exception) is shown with its traceback, and still stays in the slot."""
    import qt

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    monkeypatch.setattr(slicer.app, "_testing", False)  # tryWithErrorDisplay shows what it catches
    module, widget = open_panel()
    try:
        widget.ui.inputVolumeSelector.setCurrentNode(add_ct("ct", shape=(20, 40, 40)))
        monkeypatch.setenv("PATH", str(tmp_path))  # no PythonSlicer there
        widget.ui.applyButton.click()
        assert qt.take_slot_errors() == []
        said = "PythonSlicer, Slicer's Python launcher, was not found on PATH"
        assert len(shown) == 1 and shown[0][0].startswith(said) and shown[0][1] == {}  # no traceback as details
        assert widget.ui.statusLabel.text.startswith(said) and "\n" not in widget.ui.statusLabel.text
        assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled and widget._run is None
        shown.clear()

        def bug(*args, **kwargs):
            raise KeyError("a bug")

        monkeypatch.setattr(widget.logic, "start", bug)
        widget.ui.applyButton.click()
        assert qt.take_slot_errors() == []
        assert len(shown) == 1 and "Traceback" in shown[0][1]["detailedText"]  # a bug keeps its traceback
        assert widget.ui.applyButton.enabled
    finally:
        close_panel(module)


@pytest.mark.process
def test_a_stale_engine_pid_is_not_killed(scene, tmp_path):
    """Once the launcher has ended, the pid its child had may name another process: kill() leaves it alone,
    whether Qt has noticed the end yet or not."""
    from LiverSegLib.engine import EngineProcess

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = tmp_path / "worker.py"
    worker.write_text("import json, sys\n"  # says ready with another process's pid, ends when told
                      f"print(json.dumps({{'event': 'ready', 'protocol': 2, 'pid': {bystander.pid}}}), flush=True)\n"
                      "sys.stdin.readline()\n")
    try:
        for noticed in (True, False):
            engine = EngineProcess(sys.executable).start([str(worker)])
            while engine.ready is None:
                engine.read()
                engine.wait_for_output(100)
            launcher = engine.pid
            engine.send({"cmd": "quit"})
            if noticed:
                engine._process.waitForFinished(-1)
            else:
                while alive(launcher):  # ended, not yet collected by Qt
                    time.sleep(0.05)
            assert engine.engine_pid == bystander.pid
            engine.kill()
            assert bystander.poll() is None, noticed
    finally:
        bystander.kill()
        bystander.wait()


def run_unit_test():
    """As ``slicer.testing.runUnitTest`` does: the module's test_* methods loaded and run by unittest."""
    import io
    import unittest

    suite = unittest.TestLoader().loadTestsFromName("LiverSeg")
    return unittest.TextTestRunner(stream=io.StringIO(), verbosity=2).run(suite)


def test_self_test_without_the_packages_is_skipped_as_slicer_runs_it(scene, monkeypatch, caplog):
    """Without onnxruntime each test_* is skipped, saying what to install. The SelfTests module and "Reload and
    Test" call the module's ``runTest`` (no unittest result): a skip is shown there, never raised."""
    import logging

    import LiverSeg
    from LiverSegLib import dependencies

    monkeypatch.setattr(dependencies, "installed", lambda name: name != "onnxruntime")
    result = run_unit_test()
    assert result.wasSuccessful() and result.testsRun == 1
    assert len(result.skipped) == 1 and "install onnxruntime>=1.16" in result.skipped[0][1]
    caplog.set_level(logging.INFO)
    LiverSeg.LiverSeg(None)  # as the module manager makes it: its runTest goes into slicer.selfTests
    slicer.selfTests["LiverSeg"]()  # the SelfTests module's call
    assert "LiverSeg self-test skipped: install onnxruntime>=1.16" in caplog.text


@pytest.mark.process
@requires_bundled_model
def test_self_test_runs_as_slicer_runs_it(scene, slicer_launcher, request):
    """With the packages, each test_* runs (through the engine process) and passes."""
    if request.config.getoption("--fast"):
        pytest.skip("starts the engine process: slow tier, run without --fast")
    result = run_unit_test()
    assert result.wasSuccessful() and result.testsRun == 1 and not result.skipped, result.errors


RELOAD = r"""
import json, sys
sys.path[:0] = PATHS
import slicer_app
slicer_app.install(testing=False)
import qt
import slicer
from conftest import close_panel, open_panel

errors = []
slicer.util.errorDisplay = lambda text, **kwargs: errors.append(text)
out = {}
module, widget = open_panel()
before = {name: m for name, m in sys.modules.items() if name.split(".")[0] in ("LiverSegLib", "LiverSegExtension")}
widget.onReload()  # the Reload button
out["new_widget"] = module.widget is not widget and slicer.modules.LiverSegWidget is module.widget
out["fresh_class"] = type(module.widget) is sys.modules["LiverSegLib.widget"].LiverSegWidget
out["stale"] = sorted(name for name, m in before.items() if sys.modules.get(name) is m)
out["reloaded"] = len([name for name in before if name in sys.modules])
out["set_up"] = module.widget.ui.applyButton.enabled is False and module.widget._timer is not None
module.widget.onReloadAndTest()  # "Reload and Test" without onnxruntime: the skip is shown, not an error
slicer.selfTests["LiverSeg"](msec=100)  # the SelfTests module's call: no exception either
out["dialogs"] = qt.QDialog.shown
out["errors"] = errors
close_panel(module)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.process
def test_reload_executes_the_module_s_code_anew_and_reload_and_test_shows_a_skip(tmp_path):
    """Reload re-executes LiverSeg.py alone; the panel's and the engine's modules are executed anew too, the
    panel set up again from them. "Reload and Test" where onnxruntime is missing shows the skip (a message,
    as delayDisplay does), and no error dialog (a Slicer outside testing mode, in a process of its own)."""
    paths = [str(TESTING / "StandIns"), str(ROOT / "LiverSegModule"), str(ROOT), str(TESTING)]
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "reload.py").write_text(RELOAD.replace("PATHS", repr(paths), 1))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker"), "LIVERSEG_BLOCKED": "onnxruntime"}
    proc = subprocess.run([sys.executable, str(tmp_path / "reload.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["new_widget"] and out["fresh_class"] and out["set_up"]
    assert out["stale"] == [] and out["reloaded"] > 10
    skip = "LiverSeg self-test skipped: install onnxruntime>=1.16"
    assert len(out["dialogs"]) == 1 and out["dialogs"][0].startswith(skip), out["dialogs"]  # Reload and Test
    assert out["errors"] == []


def test_error_dialogs_show_no_none_details(scene, monkeypatch):
    from LiverSegLib.progress import show_error

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    show_error("bad", "")
    show_error("worse", "Traceback ...")
    assert shown == [("bad", {}), ("worse", {"detailedText": "Traceback ..."})]


def test_about_to_quit_is_connected_once_and_disconnected_on_cleanup(scene):
    module, widget = open_panel()
    quits = [s for s, _ in slicer.app.__dict__.get("slots", []) if s.startswith("aboutToQuit")]
    assert len(quits) == 1
    close_panel(module)
    assert not [s for s, _ in slicer.app.__dict__.get("slots", []) if s.startswith("aboutToQuit")]


def test_dataset_count_is_read_again_only_when_dataset_json_changes(tmp_path):
    from pathlib import Path

    from LiverSeg import LiverSegLogic

    reads = []
    logic = LiverSegLogic(readText=lambda path: reads.append(path) or Path(path).read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{}, {}]}))
    assert logic.datasetCaseCount(tmp_path) == 2
    assert reads == [tmp_path / "dataset.json"]
    for _ in range(50):  # keystrokes
        assert logic.datasetCaseCount(tmp_path) == 2
    assert len(reads) == 1
    time.sleep(0.01)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{}, {}, {}]}))
    assert logic.datasetCaseCount(tmp_path) == 3
    assert len(reads) == 2


@requires_bundled_model
def test_a_batch_case_leaves_no_node_behind(tmp_path, monkeypatch):
    """The batch's scene holds after each case exactly what it held before (labelmaps' color tables too)."""
    import importlib.util

    import SimpleITK as sitk

    from LiverSegExtension.geometry import image_from_array

    m = make_affine((3.0, 3.0, 5.0), (40, 100, 110), left_handed=True)
    ct, _ = phantom((40, 100, 110), m)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image_from_array(ct, m), str(tmp_path / folder / "ct.nii.gz"))
    spec = importlib.util.spec_from_file_location("LiverSegBatch", ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    contexts = []
    original = batch.SceneContext.__init__

    def record(self) -> None:
        original(self)
        contexts.append((self, nodes_by_class(self.scene)))

    monkeypatch.setattr(batch.SceneContext, "__init__", record)
    assert batch.run(["--input", str(tmp_path / "a" / "ct.nii.gz"), str(tmp_path / "b" / "ct.nii.gz"), "-o",
                      str(tmp_path / "out"), "--labelmap", "--device", "cpu"]) == 0
    ((ctx, before),) = contexts
    assert len(list((tmp_path / "out").rglob("*_liver.nii.gz"))) == 2  # one labelmap per case
    assert nodes_by_class(ctx.scene) == before


@pytest.mark.parametrize("error, device, said", [
    (MemoryError(), "cpu", r"not enough memory \(needed about 1 GB\); close other programs"),
    (RuntimeError("onnxruntime: Failed to allocate memory for requested buffer of size 4194304"), "cpu",
     r"not enough memory \(needed about 1 GB\)"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "cuda:0", "the device ran out of memory; try the CPU")])
def test_running_out_of_memory_is_a_short_error_and_changes_nothing(scene, threshold_segmenter, monkeypatch,
                                                                   error, device, said):
    """The engine turns allocation failures into a user error, for every door (here the logic's)."""
    from LiverSeg import LiverSegLogic

    def predict(stage, volume):
        raise error

    monkeypatch.setattr(threshold_segmenter, "predict", predict)
    monkeypatch.setattr(threshold_segmenter.runtime, "device", device)
    logic = LiverSegLogic(segmenterFactory=lambda model_path, device: threshold_segmenter)
    volume = add_ct("ct", shape=(40, 80, 80))
    before = scene.GetNumberOfNodes()
    with pytest.raises(LiverSegError, match=f"ct: {said}"):
        logic.process(volume, None, device="cpu")
    assert scene.GetNumberOfNodes() == before
