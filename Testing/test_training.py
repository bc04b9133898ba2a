"""A tiny training run proves the loop, the checkpoint, the resume and that the result segments."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ROOT
from synthetic import make_affine, phantom

from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.model.networks import LiverModel

pytestmark = pytest.mark.slow  # trains models, or runs processes


def make_dataset(folder, n=3, shape=(24, 64, 72), spacing=(5.0, 5.0, 6.0)):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for i in range(n):
        m = make_affine(spacing, shape)
        m[:3, 3] += np.random.default_rng(i).normal(0, 10, 3)
        ct, liver = phantom(shape, m, seed=i)
        sitk.WriteImage(image_from_array(ct, m), str(folder / "imagesTr" / f"case{i}.nii.gz"))
        sitk.WriteImage(image_from_array(liver, m), str(folder / "labelsTr" / f"case{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "synthetic", "labels": {"0": "background", "1": "liver"},
                                                     "training": entries}))
    return folder


def train_cli(*args):
    return subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "train", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_fine_tune_resume_finish_and_segment(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "model"
    # Small architecture: start from the tiny model's card (fine-tuning path), 2 then 4 iterations.
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 2,
                  "--seed", "1", "--device", "cpu", "--oversample", "case1=3")
    assert r.returncode == 0, r.stderr
    assert "(-0 s)" not in r.stderr and "[fine] 2/2 loss" in r.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["oversample"] == {"case1": 3}
    assert card["parent_model"] == "tiny-test v0.0.1" and card["version"] == "0.1.0"
    assert card["training"]["cases"] == ["case0", "case1"]
    assert card["validation"]["cases"][0]["case"] == "case2"
    ckpt_rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert ckpt_rows[-1]["stage"] == "fine" and ckpt_rows[-1]["iteration"] == "2"
    # The saved model is the moving average of the weights at the last iteration, not the raw ones.
    first = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    saved = LiverModel.load(out).networks["fine"].state_dict()
    name = next(k for k in saved if k.endswith("weight"))
    assert torch.equal(saved[name], first["ema"][f"module.{name}"])
    assert not torch.equal(saved[name], first["net_fine"][name])

    # Resuming under other settings (here: without the oversampling) is refused, and nothing is touched.
    before = (out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 4,
                  "--seed", "1", "--device", "cpu")
    assert r.returncode == 1 and "written by a run with other settings (oversample {'case1': 3} then, {} now)" in r.stderr
    assert "Traceback" not in r.stderr
    assert ((out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()) == before

    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 4,
                  "--seed", "1", "--device", "cpu", "--oversample", "case1=3")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    fine_iters = [int(r["iteration"]) for r in rows if r["stage"] == "fine"]
    assert fine_iters == [2, 4], "the resumed run must continue at iteration 3, not start over"

    # The average is carried across the resume (4 updates, not 2); the model is the average at iteration 4.
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert int(ckpt["ema"]["n_averaged"]) == 4
    assert json.loads((out / "card.json").read_text())["training"]["iterations_fine"] == 4
    saved = LiverModel.load(out).networks["fine"].state_dict()
    assert torch.equal(saved[name], ckpt["ema"][f"module.{name}"])

    # The same command again: the run is finished, so it says so and trains nothing.
    before = (out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 4,
                  "--seed", "1", "--device", "cpu", "--oversample", "case1=3")
    assert r.returncode == 0 and "already finished" in r.stderr, r.stderr
    assert ((out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()) == before

    seg = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", data / "imagesTr" / "case0.nii.gz",
                          "-o", tmp_path / "seg", "--model", out, "-q"], cwd=ROOT, capture_output=True, text=True)
    assert seg.returncode == 0, seg.stderr
    assert (tmp_path / "seg" / "case0_liver.nii.gz").is_file()


def test_training_with_validation_keeps_the_best_weights(tmp_path, tiny_model_dir):
    """Without the guard (training, not fine-tuning), validation every N iterations picks the weights kept."""
    from LiverSegExtension.training.config import TrainConfig
    from LiverSegExtension.training.loop import train

    data = make_dataset(tmp_path / "data")
    out = train(TrainConfig(data=[data], output=tmp_path / "m", init=tiny_model_dir, val_cases=["case2"],
                            iterations=4, val_every=2, device="cpu", seed=3))
    rows = [r for r in csv.DictReader(open(out / "training_log.csv")) if r["val_dice"]]
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    card = json.loads((out / "card.json").read_text())
    kept = next(r for r in rows if int(r["iteration"]) == card["training"]["iterations_fine"])
    assert float(kept["val_dice"]) >= max(float(r["val_dice"]) for r in rows) - 1e-4
    assert card["validation"]["mean"]["dice"] == pytest.approx(float(kept["val_dice"]), abs=1e-4)


def test_resume_refusal_names_only_what_differs():
    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.training.checkpoint import check_resume as _check_resume

    then = {"training cases": ["a", "b"], "seed": 1}
    with pytest.raises(LiverSegError) as err:
        _check_resume(Path("ckpt.pt"), then, {"training cases": ["a", "b", "liverseg_new"], "seed": 1})
    assert "training cases: liverseg_new added" in str(err.value) and "'a'" not in str(err.value)


def test_unknown_validation_case_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    r = train_cli("--data", data, "--output", tmp_path / "m", "--val", "nope", "--iterations", 1)
    assert r.returncode == 1 and "validation case(s) not in the dataset: nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_oversampling_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    r = train_cli("--data", data, "--output", tmp_path / "m", "--val", "case1", "--oversample", "case1=2")
    assert r.returncode == 1 and "oversampled case(s) not among the training cases: case1" in r.stderr
    r = train_cli("--data", data, "--output", tmp_path / "m", "--oversample", "case0=many")
    assert r.returncode == 2 and "expected CASE=K" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()


def test_train_fine_stage_only_keeps_the_coarse_net(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path / "data", n=2)
    r = train_cli("--data", data, "--output", tmp_path / "m", "--stages", "fine", "--iterations", 1)
    assert r.returncode == 1 and "training only the fine stage needs --init" in r.stderr
    r = train_cli("--data", data, "--output", tmp_path / "m", "--stages", "fin", "--iterations", 1)
    assert r.returncode == 2 and "--stages fin: expected one or more of coarse, fine" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()

    out = tmp_path / "fine-only"
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case1", "--stages", "fine",
                  "--iterations", 2, "--val-every", 2, "--seed", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    parent, child = LiverModel.load(tiny_model_dir), LiverModel.load(out)
    for stage, same in (("coarse", True), ("fine", False)):
        a, b = parent.networks[stage].state_dict(), child.networks[stage].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) == same, stage
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert {r["stage"] for r in rows} == {"fine"}
    assert json.loads((out / "card.json").read_text())["training"]["stages"] == ["fine"]


def test_fine_stage_trained_on_another_grid(tmp_path, tiny_model_dir, capsys):
    """--fine-spacing moves the fine stage's grid: the cases are prepared on it, the card says it, the coarse net is
    the parent's, a resume under another spacing is refused, and a spacing out of range or without the fine stage is
    a usage error."""
    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.training.config import TrainConfig
    from LiverSegExtension.training.loop import train

    data = make_dataset(tmp_path / "data", n=2)
    cfg = TrainConfig(data=[data], output=tmp_path / "m", init=tiny_model_dir, val_cases=["case1"], stages=["fine"],
                      iterations=2, val_every=2, device="cpu", seed=1, fine_spacing_mm=3.5)
    out = train(cfg)
    assert "[fine] preparing 1 training cases at [3.5, 3.5, 3.5] mm" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["stages"]["fine"]["spacing_mm"] == [3.5, 3.5, 3.5]
    parent, child = LiverModel.load(tiny_model_dir), LiverModel.load(out)
    assert card["stages"]["coarse"] == parent.card["stages"]["coarse"]
    a, b = parent.networks["coarse"].state_dict(), child.networks["coarse"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg.fine_spacing_mm, cfg.iterations = 3.0, 4
    with pytest.raises(LiverSegError, match="fine spacing mm"):
        train(cfg)

    for args in (("--stages", "coarse", "--fine-spacing", "2"), ("--fine-spacing", "7")):
        r = train_cli("--data", data, "--output", tmp_path / "x", *args)
        assert r.returncode == 2 and "expected 0.5 to 6 mm, with the fine stage trained" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
