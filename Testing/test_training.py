"""A tiny training run proves the loop, the checkpoint, the resume and that the result segments."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
import torch
from conftest import ROOT
from synthetic import make_affine, phantom

from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.model import LiverModel


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


def test_train_resume_and_segment(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "model"
    # Small architecture: start from the tiny model's card (fine-tuning path), 2 then 4 iterations.
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 2,
                  "--val-every", 2, "--seed", "1", "--device", "cpu", "--oversample", "case1=3")
    assert r.returncode == 0, r.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["oversample"] == {"case1": 3}
    assert card["parent_model"] == "tiny-test v0.0.1" and card["version"] == "0.1.0"
    assert card["training"]["cases"] == ["case0", "case1"]
    assert card["validation"]["cases"][0]["case"] == "case2"
    ckpt_rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert ckpt_rows[-1]["stage"] == "fine" and ckpt_rows[-1]["iteration"] == "2"
    # The saved model is the moving average of the weights (its only validation: iteration 2), not the raw ones.
    first = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    saved = LiverModel.load(out).networks["fine"].state_dict()
    name = next(k for k in saved if k.endswith("weight"))
    assert torch.equal(saved[name], first["ema"][f"module.{name}"])
    assert not torch.equal(saved[name], first["net_fine"][name])

    # Resuming under other settings (here: without the oversampling) is refused, and nothing is touched.
    before = (out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()
    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 4,
                  "--val-every", 2, "--seed", "1", "--device", "cpu")
    assert r.returncode == 1 and "written by a run with other settings (oversample {'case1': 3} then, {} now)" in r.stderr
    assert "Traceback" not in r.stderr
    assert ((out / "checkpoint.pt").read_bytes(), (out / "training_log.csv").read_text()) == before

    r = train_cli("--data", data, "--output", out, "--init", tiny_model_dir, "--val", "case2", "--iterations", 4,
                  "--val-every", 2, "--seed", "1", "--device", "cpu", "--oversample", "case1=3")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    fine_iters = [int(r["iteration"]) for r in rows if r["stage"] == "fine"]
    assert fine_iters == [2, 4], "the resumed run must continue at iteration 3, not start over"

    # The average is carried across the resume (4 updates, not 2); the best of the two validations is kept.
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert int(ckpt["ema"]["n_averaged"]) == 4
    best = json.loads((out / "card.json").read_text())["training"]["iterations_fine"]
    saved = LiverModel.load(out).networks["fine"].state_dict()
    assert torch.equal(saved[name], (ckpt if best == 4 else first)["ema"][f"module.{name}"])

    seg = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", data / "imagesTr" / "case0.nii.gz",
                          "-o", tmp_path / "seg", "--model", out, "-q"], cwd=ROOT, capture_output=True, text=True)
    assert seg.returncode == 0, seg.stderr
    assert (tmp_path / "seg" / "case0_liver.nii.gz").is_file()


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
