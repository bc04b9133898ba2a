"""The runtimes: ONNX Runtime gives PyTorch's logits and masks; the engine's sliding window is MONAI's; the
runtime is chosen as documented; ONNX files are checked and loaded as data."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SHARED, requires_bundled_model, requires_shared

from LiverSegExtension.errors import LiverSegError


@pytest.mark.parametrize("shape, roi", [((33, 50, 47), (48, 64, 48)), ((64, 64, 64), (64, 64, 64)),
                                        ((200, 90, 170), (160, 96, 160)), ((170, 170, 30), (160, 160, 32)),
                                        ((17, 300, 31), (32, 160, 32))])
def test_sliding_window_is_monai_s(shape, roi):
    """One window or many, padded or not: the engine's numpy sliding window equals MONAI's gaussian inferer."""
    from monai.inferers import sliding_window_inference

    from LiverSegExtension.model.runtimes import sliding_window
    from LiverSegExtension.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(1, 2, [4, 8, 8], [2, 2]).eval()
    x = torch.rand(1, 1, *shape)
    with torch.inference_mode():
        expected = sliding_window_inference(x, list(roi), 1, net, overlap=0.25, mode="gaussian").numpy()

        def predict(window: np.ndarray) -> np.ndarray:
            return net(torch.from_numpy(window)).numpy()

        got = sliding_window(x.numpy(), roi, predict)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_gaussian_weights_are_monai_s():
    from monai.data.utils import compute_importance_map

    from LiverSegExtension.model.runtimes import gaussian_importance

    for roi in [(160, 96, 160), (32, 48, 16), (17, 5, 64)]:
        np.testing.assert_allclose(gaussian_importance(roi), compute_importance_map(roi, "gaussian").numpy(),
                                   rtol=1e-6, atol=1e-7)


def test_saved_models_carry_an_onnx_twin_checked_against_torch(tiny_model_dir):
    """Every model saved writes model.onnx; the card records its sha256, opset and the check's difference,
    and ONNX Runtime gives torch's logits on inputs of any size the network takes."""
    from LiverSegExtension.model.networks import LiverModel
    from LiverSegExtension.model.runtimes import OnnxRuntime, TorchRuntime

    card = json.loads((tiny_model_dir / "card.json").read_text())
    info = card["onnx"]
    assert info["file"] == "model.onnx" and info["opset"] >= 17 and info["max_abs_logit_diff"] < 1e-3
    assert len(info["sha256"]) == 64
    ort, pt = OnnxRuntime(tiny_model_dir), TorchRuntime(LiverModel.load(tiny_model_dir), "cpu")
    rng = np.random.default_rng(3)
    for stage, shape in (("coarse", (16, 24, 40)), ("fine", (32, 48, 16)), ("fine", (64, 16, 32))):
        x = rng.random((1, 1, *shape), dtype=np.float32)
        np.testing.assert_allclose(ort.logits(stage, x), pt.logits(stage, x), atol=1e-4)


def test_onnx_file_is_checked_before_it_is_read(tiny_model_dir, tmp_path):
    from LiverSegExtension.model.runtimes import OnnxRuntime

    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(LiverSegError, match="model.onnx: checksum mismatch"):
        OnnxRuntime(bad)
    (bad / "model.onnx").unlink()
    with pytest.raises(LiverSegError, match="has no model.onnx"):
        OnnxRuntime(bad)


def test_runtime_choice(monkeypatch):
    """CPU and auto: ONNX Runtime; GPUs: torch, or a clear error without it; no torch import to decide."""
    from LiverSegExtension.model import runtimes

    assert runtimes.choose("auto") == ("onnxruntime", "cpu")
    assert runtimes.choose("cpu") == ("onnxruntime", "cpu")
    assert runtimes.choose("cpu", "torch") == ("torch", "cpu")
    assert runtimes.choose("auto", has_onnx=False) == ("torch", "cpu")
    with pytest.raises(LiverSegError, match="runs through PyTorch"):
        runtimes.choose("cuda", "onnxruntime")
    with pytest.raises(LiverSegError, match="unknown device 'gpu'"):
        runtimes.choose("gpu")
    monkeypatch.setattr(runtimes, "installed", lambda name: name != "torch")
    with pytest.raises(LiverSegError, match="device 'cuda' needs PyTorch, which is not installed"):
        runtimes.choose("cuda")
    with pytest.raises(LiverSegError, match="no model.onnx and PyTorch is not installed"):
        runtimes.choose("auto", has_onnx=False)
    monkeypatch.setattr(runtimes, "installed", lambda name: False)
    with pytest.raises(LiverSegError, match="no runtime to run the model"):
        runtimes.choose("cpu")


@pytest.mark.parametrize("build, expected", [("None", ["False", "['cpu']", "False"]),
                                             ("'12.1'", ["True", "['cpu']", "True"])])
@pytest.mark.process
def test_the_gpu_probe_imports_torch_only_for_a_build_that_can_reach_one(tmp_path, build, expected):
    """A torch laid out by the test (whatever build this machine has): a CPU build is not imported to look for a
    GPU; a CUDA build is (and, with no GPU here, gives the CPU alone)."""
    import platform
    import subprocess
    import sys

    if platform.system() == "Darwin" and platform.machine() == "arm64":
        pytest.skip("on Apple silicon every torch build may reach a GPU (MPS)")
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "version.py").write_text(f"__version__ = '2.13.0'\ncuda = {build}\nhip = None\n")
    (fake / "__init__.py").write_text("class cuda:\n    is_available = staticmethod(lambda: False)\n"
                                      "    device_count = staticmethod(lambda: 0)\n"
                                      "class backends:\n    mps = None\n")
    code = ("import sys; from LiverSegExtension.model.environment import available_devices, torch_may_reach_gpu; "
            "print(torch_may_reach_gpu(), available_devices(), 'torch' in sys.modules, sys.modules.get('torch'))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{__import__('conftest').ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=str(tmp_path)).stdout.split(maxsplit=3)
    assert out[:3] == expected
    if expected[2] == "True":
        assert str(fake) in out[3]  # the torch laid out here, not the machine's


def _oblique_cases():
    from synthetic import make_affine, phantom, rotation

    from LiverSegExtension.geometry import image_from_array

    for name, spacing, shape, rot, left in [("oblique left-handed", (0.8, 0.8, 2.5), (90, 260, 240),
                                             rotation(0.15, -0.1, 0.2), True),
                                            ("anisotropic", (0.6, 0.6, 5.0), (50, 300, 320), None, False),
                                            ("large, several windows", (1.0, 1.0, 1.0), (260, 300, 330), None, False)]:
        m = make_affine(spacing, shape, rot, left_handed=left)
        ct, _ = phantom(shape, m)
        yield name, image_from_array(ct, m)


@pytest.mark.slow
@requires_bundled_model
def test_onnx_runtime_and_torch_give_the_same_mask_on_synthetic_cts():
    from LiverSegExtension.data.metrics import dice
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    ort, pt = LiverSegmenter(device="cpu", runtime="onnxruntime"), LiverSegmenter(device="cpu", runtime="torch")
    for name, image in _oblique_cases():
        a, b = ort.segment_image(image), pt.segment_image(image)
        assert a.mask.any(), name
        # Real CTs must agree at 0.999 (the next test). On these phantoms the model is unsure of most of the image
        # (uncertainty 0.91), so one piece near the threshold can go either way in the clean-up: the oblique one
        # differs by a single 823-voxel piece (Dice 0.998) since the grids read its edges instead of air.
        assert dice(a.mask, b.mask) >= 0.995, name
        # Each stage's probabilities alike, wherever they lie: on a phantom the model is unsure of much of the
        # image, so the clean-up may keep a voxel in one runtime and drop it in the other, but the nets agree:
        # within 0.02 (5 of the map's 255 steps) where a window is 160 voxels wide, whose instance norms sum 4
        # million float32 values in another order in each runtime (v1.0.0: 0.005, v1.1.0: 0.010 at most here).
        volume = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))[::2, ::2, ::2]
        for stage in ("coarse", "fine"):
            differ = np.abs(ort.predict(stage, volume) - pt.predict(stage, volume))
            assert differ.max() < 0.02 and np.mean(differ > 1 / 255) < 0.005, (name, stage)


@pytest.mark.slow
@requires_bundled_model
@requires_shared
def test_onnx_runtime_and_torch_give_the_same_mask_on_every_real_ct():
    from LiverSegExtension.data.metrics import dice
    from LiverSegExtension.inference.segmenter import LiverSegmenter
    from LiverSegExtension.io import expand_inputs, read_case

    ort, pt = LiverSegmenter(device="cpu", runtime="onnxruntime"), LiverSegmenter(device="cpu", runtime="torch")
    files = sorted((SHARED / "liver-train" / "imagesTr").glob("*.nii.gz")) + sorted(SHARED.glob("unlabelled/*.nii.gz"))
    cases = expand_inputs([str(p) for p in files] + [str(SHARED / "dicom" / "chaos_ct3")])
    assert len(cases) >= 22
    for case in cases:
        image = read_case(case)
        a, b = ort.segment_image(image), pt.segment_image(image)
        assert dice(a.mask, b.mask) >= 0.999, case.label
        assert abs(a.liver_ml - b.liver_ml) <= max(1.0, 0.001 * b.liver_ml), case.label
