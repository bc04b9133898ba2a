"""Training on a lent GPU (scripts/device_train.py): a pack made here, the run where SimpleITK and nibabel cannot be
imported, stopped and resumed, and a model folder finished here that the segmenter runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ROOT
from safetensors.torch import load_file
from synthetic import make_affine, phantom

from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.model.networks import LiverModel
from LiverSegExtension.training.packed.run import load_checkpoint

pytestmark = pytest.mark.slow  # trains models

SCRIPT = ROOT / "scripts" / "device_train.py"
MIB = 2**20
BLOCKER = '''import sys


class _NotHere:
    """The lent machine has neither: importing them must fail as it would there."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("SimpleITK", "nibabel"):
            raise ImportError(f"No module named {name!r} (not on the lent machine)")
        return None


sys.meta_path.insert(0, _NotHere())
'''


@pytest.fixture(scope="module")
def on_grid_data(tmp_path_factory) -> Path:
    """Three cases on an axis-aligned 2.5 mm grid, the fine stage's: resampled onto it they keep their integer HU,
    so the pack's int16 holds exactly what ``liverseg train`` trains on."""
    folder = tmp_path_factory.mktemp("on-grid")
    entries = []
    for i in range(3):
        m = make_affine((2.5, 2.5, 2.5), (48, 104, 104))  # even sizes: the covering grid is the image's own
        arrays = dict(zip(("imagesTr", "labelsTr"), phantom((48, 104, 104), m, seed=i)))
        for sub, arr in arrays.items():
            (folder / sub).mkdir(exist_ok=True)
            sitk.WriteImage(image_from_array(arr, m), str(folder / sub / f"case{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "on-grid", "labels": {"0": "background", "1": "liver"},
                                                     "training": entries}))
    return folder


def device_train(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture()
def lent_machine_env(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import SimpleITK or nibabel (a meta-path blocker in sitecustomize)."""
    site = tmp_path / "not-here"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    for module in ("SimpleITK", "nibabel"):
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
        assert r.returncode != 0 and "not on the lent machine" in r.stderr, f"{module} still importable"
    return env


def script():
    """scripts/device_train.py as a module."""
    spec = importlib.util.spec_from_file_location("device_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_tensors(path: Path, stage: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(f"{stage}.")}


@pytest.mark.process
def test_packed_run_trains_exactly_as_liverseg_train(tmp_path, on_grid_data, tiny_model_dir, lent_machine_env):
    """The same fine-tune by the packed runner and by ``liverseg train``'s loop: the same weights to the bit (the same
    samples, augmentation, loss, optimiser, schedule and moving average)."""
    from LiverSegExtension.model.catalog import read_card
    from LiverSegExtension.training.finetune import plan, recipe
    from LiverSegExtension.training.loop import train

    pack = tmp_path / "pack"
    r = device_train("pack", "--data", on_grid_data, "--out", pack, "--init", tiny_model_dir, "--val", "case2",
                     "--stages", "fine", "--iterations", 3, "--lr", 0.01, "--seed", 4, "--oversample", "case1=2")
    assert r.returncode == 0, r.stderr
    r = device_train("run", "--pack", pack, "--out", tmp_path / "run", "--device", "cpu", env=lent_machine_env)
    assert r.returncode == 0, r.stderr
    assert "finished" in r.stdout

    cfg = recipe([on_grid_data], tmp_path / "loop", tiny_model_dir, iterations=3, stages=["fine"], lr=0.01,
                 val_cases=["case2"], seed=4, oversample={"case1": 2}, device="cpu")
    p = plan(read_card(tiny_model_dir), [on_grid_data], ["case2"], "auto", None, 4)
    cfg.oversample = {**p.oversample, **cfg.oversample}
    train(cfg, split=(p.train, []))

    packed = load_file(str(tmp_path / "run" / "weights.safetensors"))
    looped = load_file(str(tmp_path / "loop" / "model.safetensors"))
    parent = load_file(str(tiny_model_dir / "model.safetensors"))
    assert packed.keys() == looped.keys() == parent.keys()
    assert all(torch.equal(packed[k], looped[k]) for k in packed)
    assert max(float((packed[k] - parent[k]).abs().max()) for k in packed if k.startswith("fine.")) > 1e-3  # it trained


@pytest.mark.process
def test_pack_run_stop_resume_finish_and_segment(tmp_path, on_grid_data, tiny_model_dir, lent_machine_env):
    pack, first, resumed, again = (tmp_path / n for n in ("pack", "first", "resumed", "again"))
    r = device_train("pack", "--data", on_grid_data, "--out", pack, "--init", tiny_model_dir, "--val", "case2",
                     "--stages", "coarse,fine", "--iterations", 4, "--seed", 2)
    assert r.returncode == 0, r.stderr
    assert "pip download monai==" in r.stdout and "device_train.py run --pack" in r.stdout
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["cases"] == ["case0", "case1"] and manifest["mode"] == "fine-tune"
    assert manifest["init"]["travels_in"] == "pack" and (pack / "init.safetensors").is_file()  # outside the repository
    with np.load(pack / "cases.npz") as z:
        assert z["0_fine_image"].dtype == np.int16 and z["0_fine_label"].dtype == np.uint8

    # 3 iterations (coarse 2 of 2, fine 1 of 4), stopped; the run's files fit what comes back from a lent machine.
    r = device_train("run", "--pack", pack, "--out", first, "--device", "cpu", "--stop-after", 3, env=lent_machine_env)
    assert r.returncode == 0, r.stderr
    info = json.loads((first / "run.json").read_text())
    assert info["stands_at"] == {"stage": "fine", "iteration": 1} and not info["finished"]
    assert [info["stages"][s]["iterations"] for s in ("coarse", "fine")] == [2, 1]
    files = [f for f in first.iterdir() if f.is_file()]
    assert len(files) <= 8 and all(f.stat().st_size < 16 * MIB for f in files)
    # As if stopped after the checkpoint and run.json named the new weights, before they replaced the old ones:
    # the resumes below must take the new ones, not the file still under the final name.
    (first / "weights.safetensors").rename(first / "weights.safetensors.next")
    (first / "weights.safetensors").write_bytes(b"the weights before")

    # Resumed: it goes on at fine iteration 2, and twice from the same checkpoint gives the same weights.
    for out in (resumed, again):
        r = device_train("run", "--pack", pack, "--out", out, "--resume", first / "checkpoint.pt", "--device", "cpu",
                         env=lent_machine_env)
        assert r.returncode == 0, r.stderr
        assert "stage fine, iteration 1" in r.stdout and "[coarse]" not in r.stdout
    info = json.loads((resumed / "run.json").read_text())
    assert info["finished"] and info["stages"]["fine"]["iterations"] == 4
    assert info["calls"][-1]["stage"] == "fine" and info["calls"][-1]["iteration"] == 1
    assert info["calls"][-1]["iterations"] == 3
    assert (resumed / "weights.safetensors").read_bytes() == (again / "weights.safetensors").read_bytes()
    assert (resumed / "weights.safetensors").read_bytes() != (first / "weights.safetensors.next").read_bytes()
    # One more iteration from the checkpoint: the optimiser and the moving average go on from it (2 steps, 2 updates).
    r = device_train("run", "--pack", pack, "--out", tmp_path / "partial", "--resume", first / "checkpoint.pt",
                     "--device", "cpu", "--stop-after", 1, env=lent_machine_env)
    assert r.returncode == 0, r.stderr
    ckpt, tensors = load_checkpoint(tmp_path / "partial" / "checkpoint.pt")
    assert (ckpt["stage_index"], ckpt["iteration"]) == (1, 2)
    steps = {float(t) for k, t in tensors.items() if k.startswith("optim.") and k.endswith(".step")}
    assert steps == {2.0} and int(tensors["ema.n_averaged"]) == 2

    # The weights file is LiverModel's: a card of the pack's architecture beside it makes a model folder.
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((resumed / "weights.safetensors").read_bytes())
    from LiverSegExtension.model.catalog import sha256_of

    card = {**manifest["architecture"], "weights_sha256": sha256_of(folder / "model.safetensors")}
    (folder / "card.json").write_text(json.dumps(card))
    bare = LiverModel.load(folder)
    expected = stage_tensors(resumed / "weights.safetensors", "fine")
    assert all(torch.equal(bare.networks["fine"].state_dict()[k[5:]], v) for k, v in expected.items())

    model = tmp_path / "model"
    (resumed / "weights.safetensors").rename(resumed / "weights.safetensors.next")  # finish takes them too
    (resumed / "weights.safetensors").write_bytes(b"the weights before")
    r = device_train("finish", "--pack", pack, "--weights", resumed, "--output", model, "--device", "cpu")
    assert r.returncode in (0, 1) and "error" not in r.stderr, r.stderr
    card = json.loads((model / "card.json").read_text())
    assert card["verdict"]["accepted"] == (r.returncode == 0)  # the fine-tuning guard's verdict, as it marks it
    assert {row["case"] for row in card["comparison_with_parent"]} == {"case0", "case1", "case2"}
    assert (model / "comparison.csv").is_file() and card["onnx"]["max_abs_logit_diff"] >= 0
    assert card["training"]["iterations_fine"] == 4 and card["parent_model"] == "tiny-test v0.0.1"
    loaded = LiverModel.load(model)
    assert all(torch.equal(loaded.networks["fine"].state_dict()[k[5:]], v) for k, v in expected.items())

    from LiverSegExtension.inference.segmenter import LiverSegmenter

    image = sitk.ReadImage(str(on_grid_data / "imagesTr" / "case0.nii.gz"))
    result = LiverSegmenter(model, device="cpu", runtime="onnxruntime").segment_image(image)
    assert result.mask.shape == sitk.GetArrayViewFromImage(image).shape


@pytest.mark.process
def test_a_checkpoint_of_another_pack_is_refused(tmp_path, on_grid_data, tiny_model_dir, lent_machine_env):
    packs = []
    for seed in (1, 2):
        packs.append(tmp_path / f"pack{seed}")
        r = device_train("pack", "--data", on_grid_data, "--out", packs[-1], "--init", tiny_model_dir, "--val",
                         "case2", "--iterations", 2, "--seed", seed)
        assert r.returncode == 0, r.stderr
    r = device_train("run", "--pack", packs[0], "--out", tmp_path / "a", "--device", "cpu", "--stop-after", 1,
                     env=lent_machine_env)
    assert r.returncode == 0, r.stderr
    r = device_train("run", "--pack", packs[1], "--out", tmp_path / "b", "--resume", tmp_path / "a" / "checkpoint.pt",
                     "--device", "cpu", env=lent_machine_env)
    assert r.returncode == 1 and "written by a run with other settings (seed 1 then, 2 now)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b" / "weights.safetensors").exists()
    r = device_train("finish", "--pack", packs[1], "--weights", tmp_path / "a", "--output", tmp_path / "m", "--device",
                     "cpu")
    assert r.returncode == 1 and "a run of another pack" in r.stderr and not (tmp_path / "m").exists()


@pytest.mark.process  # asks git what the repository carries
def test_a_pack_over_the_limit_is_cropped_then_refused(tmp_path, on_grid_data, tiny_model_dir, capsys, monkeypatch):
    from LiverSegExtension.training.packed import pack

    device_train_module = script()
    monkeypatch.setattr(pack, "PACK_LIMIT", 1000)  # bytes: nothing fits
    code = device_train_module.main(["pack", "--data", str(on_grid_data), "--out", str(tmp_path / "pack"), "--init",
                                     str(tiny_model_dir), "--val", "case2", "--iterations", "2"])
    out = capsys.readouterr()
    assert code == 1 and "cropping the air" in out.out and "over the 0.0 MiB that may travel" in out.err
    assert not (tmp_path / "pack" / "cases.npz").exists() and not (tmp_path / "pack" / "manifest.json").exists()
    # liverseg train's own option checks: a name that would make a path is refused before anything is read
    code = device_train_module.main(["pack", "--data", str(on_grid_data), "--out", str(tmp_path / "p2"), "--init",
                                     str(tiny_model_dir), "--name", "../elsewhere"])
    assert code == 1 and "--name '../elsewhere'" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_checkpoint_tensors_spread_over_files_and_come_back(tmp_path, monkeypatch):
    from LiverSegExtension.training.packed import run as module

    monkeypatch.setattr(module, "SHARD_BYTES", 1000)  # 2 tensors of 400 bytes a file
    tensors = {f"t{i}": torch.randn(100) for i in range(5)}
    module.save_checkpoint(tmp_path, {"stage_index": 1, "iteration": 7, "note": "x"}, tensors)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint-1-7-1.pt", "checkpoint-1-7-2.pt", "checkpoint.pt"]
    ckpt, back = module.load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["note"] == "x" and back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    module.save_checkpoint(tmp_path, {"stage_index": 1, "iteration": 8}, {"t0": tensors["t0"]})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.pt"]  # the files of iteration 7 went with it
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(module.LiverSegError, match="not a whole packed-run checkpoint"):
        module.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.process
def test_a_pack_without_init_trains_from_scratch_and_validates(tmp_path, on_grid_data, lent_machine_env):
    """Without --init: the default architecture drawn from the seed, both stages, no guard; finish validates."""
    pack, run, model = tmp_path / "pack", tmp_path / "run", tmp_path / "model"
    r = device_train("pack", "--data", on_grid_data, "--out", pack, "--val", "case2", "--iterations", 2)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["mode"] == "train" and manifest["init"] is None and manifest["validation_cases"] == ["case2"]
    r = device_train("run", "--pack", pack, "--out", run, "--device", "cpu", env=lent_machine_env)
    assert r.returncode == 0, r.stderr
    r = device_train("finish", "--pack", pack, "--weights", run, "--output", model, "--device", "cpu")
    assert r.returncode == 0 and "case2 Dice" in r.stdout, r.stderr
    card = json.loads((model / "card.json").read_text())
    assert card["parent_model"] is None and "verdict" not in card
    assert [row["case"] for row in card["validation"]["cases"]] == ["case2"]
    assert card["training"]["cases"] == ["case0", "case1"] and card["training"]["iterations_fine"] == 2
