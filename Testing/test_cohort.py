"""Every patient's mask under their own name: cohorts whose files share names (one folder per patient, every
file ``ct.nii.gz``), run as parallel shards and as separate runs into one folder, spelt relative and absolute.

Each mask is checked to lie on its own input's grid: the patients here have different grids, so a row that
points at another patient's mask fails. The masks come from a tiny untrained model: what is checked is where
each output goes and what the summary says of it, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom, write_dicom_series
from test_cli import run_cli

from LiverSegExtension.geometry import image_from_array, same_grid
from LiverSegExtension.io.cases import InputCase, expand_inputs, output_names

#: four patients, each on a grid of its own
GRIDS = {"a": ((30, 48, 56), (4.0, 4.5, 6.0)), "b": ((30, 50, 56), (4.0, 4.6, 6.0)),
         "c": ((32, 48, 58), (4.1, 4.5, 6.0)), "d": ((28, 48, 56), (4.0, 4.5, 6.2))}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_input(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def assert_each_row_on_its_own_grid(summary: list[dict], cwd: Path) -> None:
    for row in summary:
        assert row["status"] in ("ok", "warning", "empty"), row
        mask, ct = sitk.ReadImage(str(cwd / row["output"])), read_input(cwd / row["input"])
        assert same_grid(mask, ct), (row["input"], row["output"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``cohort/a/ct.nii.gz``, ``cohort/b/ct.nii.gz``, ``cohort/c/ct.nrrd`` and ``cohort/d/`` (a DICOM series)."""
    root = tmp_path_factory.mktemp("site")
    for patient, (shape, spacing) in GRIDS.items():
        m = make_affine(spacing, shape)
        ct, _ = phantom(shape, m, seed=ord(patient))
        folder = root / "cohort" / patient
        folder.mkdir(parents=True)
        if patient == "d":
            write_dicom_series(folder, ct, m)
        else:
            sitk.WriteImage(image_from_array(ct, m), str(folder / ("ct.nrrd" if patient == "c" else "ct.nii.gz")))
    return root


# -- names ------------------------------------------------------------------------------------------------------
def test_names_mirror_the_folders_and_do_not_depend_on_order_or_shards(cohort):
    cases = expand_inputs([cohort / "cohort"])
    names = output_names(cases)
    assert sorted(names) == ["a/ct", "b/ct", "c/ct", "d"]
    for seed in range(5):  # any order of the inputs gives each case the same name
        shuffled = cases[:]
        random.Random(seed).shuffle(shuffled)
        assert dict(zip((c.source for c in shuffled), output_names(shuffled))) == dict(zip((c.source for c in cases), names))
    given = [cohort / "cohort" / p / "ct.nii.gz" for p in "ab"]  # files given themselves: flat unless they clash
    assert output_names(expand_inputs(given)) == ["a/ct", "b/ct"]
    assert output_names(expand_inputs(given[:1])) == ["ct"]
    same_folder = [InputCase(Path("/x/a/ct.nii.gz")), InputCase(Path("/x/a/ct.nrrd")), InputCase(Path("/x/a/CT.nii"))]
    assert output_names(same_folder) == ["ct_2", "ct_3", "CT"]  # ignoring case; numbered by resolved path
    assert output_names([InputCase(Path("/x/a/ct.nii.gz")), InputCase(Path("/y/a/ct.nii.gz"))]) == ["x/a/ct", "y/a/ct"]


# -- parallel shards -----------------------------------------------------------------------------------------------
@pytest.mark.process
def test_parallel_shards_of_a_cohort_sharing_file_names_each_write_their_own_patient(cohort, tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    shards = [subprocess.Popen([sys.executable, "-m", "LiverSegExtension.cli", "segment", str(cohort / "cohort"),
                                "-o", str(out), "--shard", f"{i}/3", "--model", str(tiny_model_dir), "-q"],
                               cwd=cohort, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in (1, 2, 3)]
    for proc in shards:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout + stderr
    r = run_cli("summary", "merge", out, cwd=cohort)
    assert r.returncode == 0, r.stderr
    merged = rows(out / "summary.csv")
    assert sorted(Path(r["output"]).relative_to(out).as_posix() for r in merged) == \
        ["a/ct_liver.nii.gz", "b/ct_liver.nii.gz", "c/ct_liver.nii.gz", "d_liver.nii.gz"]
    assert_each_row_on_its_own_grid(merged, cohort)
    assert {r["model"] for r in merged} == {"tiny-test v0.0.1"}  # what made each mask
    # a rerun of all shards skips every case, for its own input, and the merged summary keeps one row each
    for i in (1, 2, 3):
        assert run_cli("segment", "cohort", "-o", out, "--shard", f"{i}/3", "--model", tiny_model_dir, cwd=cohort
                       ).returncode == 0
    assert run_cli("summary", "merge", out, cwd=cohort).returncode == 0
    again = rows(out / "summary.csv")
    assert len(again) == 4 and {r["input_path"] for r in again} == {r["input_path"] for r in merged}
    assert all(r["liver_ml"] and r["model"] for r in again if r["status"] != "empty")


# -- separate runs into one folder ------------------------------------------------------------------------------------
def test_a_second_patient_with_the_same_file_name_is_refused_and_the_first_mask_kept(cohort, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    a, b = (cohort / "cohort" / p / "ct.nii.gz" for p in "ab")
    assert run_cli("segment", a, "-o", out, "--model", tiny_model_dir).returncode == 0
    first = (out / "ct_liver.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"], ["--skip-existing"]):  # never another input's output, even with --overwrite
        r = run_cli("segment", b, "-o", out, "--model", tiny_model_dir, *extra)
        assert r.returncode == 1, r.stderr
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("liverseg: error:")]
        assert str(b) in error and str(a) in error and "another input" in error, r.stderr
        assert (out / "ct_liver.nii.gz").read_bytes() == first
    by_input = {r["input"]: r for r in rows(out / "summary.csv")}
    assert by_input[str(a)]["status"] != "failed" and by_input[str(b)]["status"] == "failed"
    assert by_input[str(b)]["output"] == ""
    assert same_grid(sitk.ReadImage(str(out / "ct_liver.nii.gz")), sitk.ReadImage(str(a)))
    # both in one run: names that differ, each on its own grid
    both = tmp_path / "both"
    assert run_cli("segment", a, b, "-o", both, "--model", tiny_model_dir).returncode == 0
    assert_each_row_on_its_own_grid(rows(both / "summary.csv"), ROOT)


def test_one_file_spelt_two_ways_is_one_input_with_one_row(cohort, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("segment", "cohort/a/ct.nii.gz", "-o", out, "--model", tiny_model_dir, cwd=cohort).returncode == 0
    r = run_cli("segment", cohort / "cohort" / "a" / "ct.nii.gz", "-o", out, "--model", tiny_model_dir, cwd=ROOT)
    assert r.returncode == 0 and "kept" in r.stderr, r.stderr
    (row,) = rows(out / "summary.csv")
    assert row["status"] in ("ok", "warning", "empty") and row["input"] == "cohort/a/ct.nii.gz"
    assert row["input_path"] == os.path.realpath(cohort / "cohort" / "a" / "ct.nii.gz")
    skipped = run_cli("segment", "cohort/a/ct.nii.gz", "-o", out, "--model", tiny_model_dir, "--shard", "1/1",
                      cwd=cohort)
    assert " mL" in skipped.stderr or row["status"] == "empty", skipped.stderr  # a skip reports the recorded volume


def test_a_changed_input_or_an_unrecorded_output_is_not_taken_for_done(cohort, tiny_model_dir, tmp_path):
    import shutil

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(cohort / "cohort" / "a" / "ct.nii.gz", scans / "ct.nii.gz")
    assert run_cli("segment", scans / "ct.nii.gz", "-o", out, "--model", tiny_model_dir).returncode == 0
    shutil.copy(cohort / "cohort" / "b" / "ct.nii.gz", scans / "ct.nii.gz")  # another scan under the same path
    r = run_cli("segment", scans / "ct.nii.gz", "-o", out, "--model", tiny_model_dir)
    assert r.returncode == 1 and "changed since its outputs" in r.stderr, r.stderr
    assert run_cli("segment", scans / "ct.nii.gz", "-o", out, "--model", tiny_model_dir, "--overwrite").returncode == 0
    assert same_grid(sitk.ReadImage(str(out / "ct_liver.nii.gz")), sitk.ReadImage(str(scans / "ct.nii.gz")))
    (out / "ct_liver.json").unlink()  # an output nothing says the origin of (an older LiverSeg's, a copy)
    r = run_cli("segment", scans / "ct.nii.gz", "-o", out, "--model", tiny_model_dir)
    assert r.returncode == 1 and "no record" in r.stderr, r.stderr


@pytest.mark.process
def test_a_claim_left_by_a_killed_writer_frees_the_name(cohort, tiny_model_dir, tmp_path):
    from LiverSegExtension.io.files import _HOST

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = {"identity": {"input": "other.nii.gz", "key": "/elsewhere/other.nii.gz", "fingerprint": "0" * 32},
             "state": "writing", "writer": f"{_HOST}-{int(dead.stdout)}", "outputs": [], "row": {}}
    (out / "ct_liver.json").write_text(json.dumps(claim))
    a = cohort / "cohort" / "a" / "ct.nii.gz"
    assert run_cli("segment", a, "-o", out, "--model", tiny_model_dir).returncode == 0
    assert json.loads((out / "ct_liver.json").read_text())["identity"]["key"] == os.path.realpath(a)
    (out / "ct_liver.json").write_text(json.dumps({**claim, "writer": f"{_HOST}-1"}))  # a live writer keeps it
    r = run_cli("segment", a, "-o", out, "--model", tiny_model_dir, "--overwrite")
    assert r.returncode == 1 and "another input, /elsewhere/other.nii.gz" in r.stderr, r.stderr


# -- one case, one set of outputs -------------------------------------------------------------------------------------
def test_a_cases_outputs_are_written_kept_or_replaced_together(cohort, tiny_model_dir, tmp_path):
    a, out = cohort / "cohort" / "a" / "ct.nii.gz", tmp_path / "out"
    mask, prob = out / "ct_liver.nii.gz", out / "ct_liver_prob.nii.gz"
    assert run_cli("segment", a, "-o", out, "--model", tiny_model_dir).returncode == 0
    assert mask.exists() and not prob.exists()
    r = run_cli("segment", a, "-o", out, "--model", tiny_model_dir, "--probabilities")  # the missing one is made
    assert r.returncode == 0 and prob.exists(), r.stderr
    assert same_grid(sitk.ReadImage(str(prob)), sitk.ReadImage(str(a)))
    assert sorted(json.loads((out / "ct_liver.json").read_text())["outputs"]) == [mask.name, prob.name]
    r = run_cli("segment", a, "-o", out, "--model", tiny_model_dir, "--overwrite")  # the old map does not stay behind
    assert r.returncode == 0 and mask.exists() and not prob.exists(), r.stderr
    assert json.loads((out / "ct_liver.json").read_text())["outputs"] == [mask.name]


# -- the Slicer batch: the same runner, the same rules ------------------------------------------------------------------
@pytest.mark.slow
def test_the_slicer_batch_mirrors_the_cohort_and_refuses_another_patients_output(cohort, tiny_model_dir, tmp_path):
    pytest.importorskip("slicer")
    batch = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "out"

    def run(*inputs, extra=()):
        return subprocess.run([sys.executable, str(batch), "--input", *map(str, inputs), "--output-dir", str(out),
                               "--model", str(tiny_model_dir), "--device", "cpu", "--labelmap", *extra],
                              capture_output=True, text=True, env=env, timeout=900, cwd=cohort)

    r = run("cohort")
    assert r.returncode == 0, r.stdout + r.stderr
    made = rows(out / "summary.csv")
    assert sorted(Path(x["output"]).relative_to(out).as_posix() for x in made) == \
        ["a/ct_liver.seg.nrrd", "b/ct_liver.seg.nrrd", "c/ct_liver.seg.nrrd", "d_liver.seg.nrrd"]
    assert {r["model"] for r in made} == {"tiny-test v0.0.1"}
    for row in made:
        labelmap = Path(row["output"].replace(".seg.nrrd", ".nii.gz"))
        assert same_grid(sitk.ReadImage(str(labelmap)), read_input(cohort / row["input"])), row
    r = run(cohort / "cohort" / "b" / "ct.nii.gz", extra=("--overwrite",))  # would be out/ct_liver...: free
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(cohort / "cohort" / "a" / "ct.nii.gz")  # its flat name is now b's
    assert r.returncode == 1 and "another input" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_both_doors_decide_options_and_exit_codes_alike(cohort, tiny_model_dir, tmp_path):
    """One check of the options for both doors (usage errors exit 2) and one meaning for a summary that cannot
    be written (exit 1, the case's outputs kept)."""
    pytest.importorskip("slicer")
    batch = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    a = cohort / "cohort" / "a" / "ct.nii.gz"

    def both(out: Path, *extra: str) -> tuple[int, int]:
        cli = run_cli("segment", a, "-o", out / "cli", "--model", tiny_model_dir, *extra).returncode
        slicer_batch = subprocess.run([sys.executable, str(batch), "--input", str(a), "--output-dir", str(out / "batch"),
                                       "--model", str(tiny_model_dir), "--device", "cpu", *extra],
                                      capture_output=True, text=True, env=env, timeout=600).returncode
        return cli, slicer_batch

    assert both(tmp_path / "u", "--overwrite", "--skip-existing") == (2, 2)
    assert both(tmp_path / "s", "--shard", "3/2") == (2, 2)
    for door in ("cli", "batch"):  # a summary.csv that is a folder: the case is done, its row cannot be kept
        (tmp_path / "w" / door / "summary.csv").mkdir(parents=True)
    assert both(tmp_path / "w") == (1, 1)
