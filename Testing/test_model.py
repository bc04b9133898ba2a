"""Model folders: safe weights, checksum, card, round trip."""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import pytest
import torch
from conftest import bundled_model, requires_bundled_model

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.model.networks import LiverModel


def test_round_trip_gives_identical_outputs(tiny_model_dir):
    a = LiverModel.load(tiny_model_dir)
    b = LiverModel.load(tiny_model_dir)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.networks["fine"](x), b.networks["fine"](x))
    card = json.loads((tiny_model_dir / "card.json").read_text())
    assert card["weights_sha256"] and card["stages"]["fine"]["spacing_mm"] == [2.5, 2.5, 2.5]


def test_saved_model_is_readable_by_others(tiny_model_dir, tmp_path):
    """A model saved into a shared folder (an institute's model store) must load for every user."""
    LiverModel.load(tiny_model_dir).save(tmp_path / "copy")
    for name in ("model.safetensors", "card.json"):
        assert stat.S_IMODE((tmp_path / "copy" / name).stat().st_mode) & 0o044 == 0o044, name
    assert LiverModel.load(tmp_path / "copy").card["weights_sha256"]


def test_checksum_mismatch_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LiverSegError, match="checksum mismatch"):
        LiverModel.load(bad)


def test_pickle_weights_are_not_a_model(tiny_model_dir, tmp_path):
    """A pickled torch file under the weights' name is never unpickled: the checksum or the
    safetensors parser refuses it first."""
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    torch.save({"x": torch.zeros(1)}, bad / "model.safetensors")
    with pytest.raises(LiverSegError):
        LiverModel.load(bad)
    card = json.loads((bad / "card.json").read_text())
    from LiverSegExtension.model.networks import sha256_of

    card["weights_sha256"] = sha256_of(bad / "model.safetensors")
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(LiverSegError, match="unreadable weights"):
        LiverModel.load(bad)


def test_missing_and_invalid_model_folders(tmp_path):
    with pytest.raises(LiverSegError, match="not found"):
        LiverModel.load(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text("{not json")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(LiverSegError, match="invalid model card"):
        LiverModel.load(tmp_path / "m")


def test_no_trained_model_is_said_plainly(monkeypatch, tmp_path):
    from LiverSegExtension.inference import segmenter

    monkeypatch.setattr(segmenter, "default_model_dir", lambda: None)
    with pytest.raises(LiverSegError, match="no trained LiverSeg model is installed"):
        segmenter.LiverSegmenter(None, device="cpu")


def test_segment_array_progress_and_cancel(tiny_model_dir):
    from synthetic import make_affine, phantom

    from LiverSegExtension.errors import CancelledError
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    m = make_affine((4.5, 4.5, 6.0), (30, 72, 80))
    ct, _ = phantom((30, 72, 80), m)
    seg = LiverSegmenter(tiny_model_dir, device="cpu")
    seen: list[tuple[float, str]] = []
    result = seg.segment_array(ct, m, progress=lambda f, s: seen.append((f, s)))
    assert seen[0][0] == 0.0 and seen[-1] == (1.0, "done")
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert result.mask.shape == ct.shape and set(np.unique(result.mask)) <= {0, 1}
    calls = []
    with pytest.raises(CancelledError):
        seg.segment_array(ct, m, cancel=lambda: calls.append(1) or len(calls) > 1)


def test_user_models_folder_is_listed(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from LiverSegExtension.model.catalog import list_models

    shutil.copytree(tiny_model_dir, tmp_path / "tiny-test-v0.0.1")
    (tmp_path / "not-a-model").mkdir()
    monkeypatch.setenv("LIVERSEG_MODELS_DIR", str(tmp_path))
    listed = list_models()
    assert tmp_path / "tiny-test-v0.0.1" in listed and tmp_path / "not-a-model" not in listed


@pytest.mark.parametrize("channels, strides, units", [([8, 16, 32, 64], [2, 2, 2], 1),
                                                      ([16, 32, 64, 128, 192], [2, 2, 2, 2], 1), ([4, 8, 8], [2, 1], 2)])
def test_the_engine_unet_is_monai_unet(channels, strides, units):
    """The engine's UNet (built without importing MONAI) has MONAI's modules and names: MONAI's weights load
    into it strictly and give the same output, in training and in evaluation mode."""
    from monai.networks.nets import UNet as MonaiUNet

    from LiverSegExtension.model.unet import UNet

    torch.manual_seed(0)
    theirs = MonaiUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels, strides=strides,
                       num_res_units=units)
    ours = UNet(1, 2, channels, strides, units)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 48, 64)
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        with torch.no_grad():
            assert torch.equal(theirs(x), ours(x)), mode


def test_hole_filling_is_monai_s():
    """The engine's hole filling gives what MONAI's FillHoles gives."""
    from monai.transforms import FillHoles
    from scipy import ndimage

    from LiverSegExtension.inference.segmenter import LiverSegmenter

    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    rng = np.random.default_rng(1)
    for holes in (0.0, 0.02, 0.1):
        shell = (r < 15) & (r > 5) & ~(rng.random(r.shape) < holes)
        filled = np.asarray(FillHoles(applied_labels=[1])(shell.copy()[None])[0]) > 0  # (MONAI fills in place)
        assert (filled != shell).sum() > 100
        assert np.array_equal(ndimage.binary_fill_holes(shell, structure=np.ones((3, 3, 3), bool)), filled)
        prob = shell.astype(np.float32)
        cleaned = LiverSegmenter.clean(prob, shell)  # holes raised to 1 there
        assert np.array_equal(cleaned >= 0.5, filled)


def _finalize_card():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("finalize_card", ROOT / "scripts" / "finalize_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_bundled_model
def test_the_readme_validation_table_is_the_bundled_cards(tmp_path):
    """README.md's validation table is what ``scripts/finalize_card.py --readme`` makes from the bundled model's card:
    a model shipped without remaking it fails here."""
    from conftest import ROOT

    module = _finalize_card()
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(module.BEGIN) + len(module.BEGIN), readme.index(module.END)
    card = json.loads((bundled_model() / "card.json").read_text())
    assert readme[start:end].strip() == module.readme_table(card)

    copy = tmp_path / "README.md"
    copy.write_text(readme.replace("| **mean** |", "| **mean, edited by hand** |"))
    module.write_readme(copy, card)
    assert copy.read_text() == readme
