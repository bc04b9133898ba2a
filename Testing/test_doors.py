"""The doors agree: the same CT gives the same mask, names and records through the CLI, the batch script
and the module's logic (slicer-core's real MRML and readers); reruns keep the records; evaluate, dataset
and view read what segment writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, requires_bundled_model
from synthetic import make_affine, phantom, rotation

from LiverSegExtension import cli
from LiverSegExtension.data.metrics import dice
from LiverSegExtension.geometry import ijk_to_ras_of, image_from_array, same_grid

BATCH = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"


def run(*args, **kw) -> subprocess.CompletedProcess:
    """``python ARGS``: the CLI (``-m LiverSegExtension.cli ...``) in this process, as test_cli runs it; anything
    else (the batch script) as a process of its own."""
    if args[:2] == ("-m", "LiverSegExtension.cli") and not kw:
        from test_cli import run_cli

        return run_cli(*args[2:])
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_ct(path: Path, shape=(44, 96, 104), spacing=(2.0, 2.6, 4.0), rot=(0.2, -0.15, 0.3), left_handed=True):
    m = make_affine(spacing, shape, rotation(*rot), left_handed=left_handed)
    ct, truth = phantom(shape, m)
    sitk.WriteImage(image_from_array(ct, m), str(path))
    return m, truth


@pytest.mark.process
@requires_bundled_model
def test_cli_batch_and_module_logic_give_one_mask_on_the_input_grid(tmp_path, scene):
    pytest.importorskip("slicer")
    import slicer
    from LiverSegLib.logic import LiverSegLogic
    from LiverSegLib.mrml import segment_mask, volume_array_and_matrix

    src = tmp_path / "ct.nii.gz"
    write_ct(src)  # left-handed, oblique, anisotropic: Slicer loads it with K reversed
    grid = sitk.ReadImage(str(src))
    r = run("-m", "LiverSegExtension.cli", "segment", src, "-o", tmp_path / "cli", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    r = run(BATCH, "--input", src, "-o", tmp_path / "batch", "--labelmap", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    masks = {door: sitk.ReadImage(str(tmp_path / door / "ct_liver.nii.gz")) for door in ("cli", "batch")}
    assert (tmp_path / "batch" / "ct_liver.seg.nrrd").is_file()  # one naming rule: <name>_liver.<format>
    for door, image in masks.items():
        assert same_grid(image, grid) and image.GetPixelID() == sitk.sitkUInt8, door

    volume = slicer.util.loadVolume(str(src))
    node_matrix = volume_array_and_matrix(volume)[1]
    assert not np.allclose(node_matrix, ijk_to_ras_of(grid))  # Slicer reversed K: another index order
    run_ = LiverSegLogic().process(volume, None, device="cpu")
    on_node = image_from_array(segment_mask(run_.segmentation_node, run_.segment_id, volume), node_matrix)
    masks["logic"] = sitk.Resample(on_node, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    arrays = {door: sitk.GetArrayFromImage(image) > 0 for door, image in masks.items()}
    assert arrays["cli"].sum() > 1000
    for a in arrays:
        for b in arrays:
            assert dice(arrays[a], arrays[b]) >= 0.999, (a, b, dice(arrays[a], arrays[b]))
    [cli_row], [batch_row] = rows_of(tmp_path / "cli" / "summary.csv"), rows_of(tmp_path / "batch" / "summary.csv")
    assert cli_row["input"] == batch_row["input"] == str(src)
    assert cli_row["status"] == batch_row["status"] and cli_row["warning"] == batch_row["warning"]
    assert float(cli_row["liver_ml"]) == pytest.approx(float(batch_row["liver_ml"]), abs=0.5)
    assert float(batch_row["liver_ml"]) == pytest.approx(run_.liver_ml, abs=0.5)


@requires_bundled_model
@pytest.mark.parametrize("order", ["RAS", "PIL", "SLA"])
def test_the_engine_does_not_depend_on_the_index_order(order):
    """The same voxels in another index order give the same mask, voxel for voxel (no grid phase moves)."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    shape, spacing = (40, 90, 100), (1.9, 2.3, 3.7)
    m = make_affine(spacing, shape, rotation(0.15, 0.1, -0.25))
    ct, _ = phantom(shape, m)
    image = image_from_array(ct, m)
    turned = sitk.DICOMOrient(image, order)
    seg = LiverSegmenter(device="cpu")
    a = seg.segment_image(image).mask
    b = sitk.GetImageFromArray(seg.segment_image(turned).mask)
    b.CopyInformation(turned)
    b = sitk.GetArrayFromImage(sitk.Resample(b, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert a.sum() > 1000 and dice(a > 0, b > 0) >= 0.999


def test_reruns_keep_the_records_and_skip_what_is_done(tmp_path, tiny_model_dir):
    src_a, src_b = tmp_path / "a.nii.gz", tmp_path / "b.nrrd"
    write_ct(src_a, shape=(30, 48, 56), spacing=(4.0, 4.5, 6.0))
    write_ct(src_b, shape=(30, 48, 56), spacing=(4.0, 4.5, 6.0), left_handed=False)
    out = tmp_path / "out"
    seg = ("-m", "LiverSegExtension.cli", "segment", "-o", out, "--model", tiny_model_dir)
    assert run(*seg, src_a).returncode == 0
    first = rows_of(out / "summary.csv")
    made = (out / "a_liver.nii.gz").stat().st_mtime_ns
    r = run(*seg, src_a, src_b)  # a is done: skipped, with a note; b is new
    assert r.returncode == 0, r.stderr
    assert "a_liver.nii.gz: exists, kept (--overwrite replaces it)" in r.stderr and "skipped" in r.stderr
    rows = {row["input"]: row for row in rows_of(out / "summary.csv")}
    assert rows[str(src_a)] == first[0]  # the row that says how a's mask was made is kept
    assert rows[str(src_b)]["status"] in ("ok", "empty", "warning") and (out / "b_liver.nii.gz").is_file()
    assert (out / "a_liver.nii.gz").stat().st_mtime_ns == made
    r = run(*seg, src_a, src_b, "--skip-existing", "-q")
    assert r.returncode == 0 and r.stderr == ""
    # an output cut short is not "done": the case fails, saying so, and nothing is replaced
    (out / "b_liver.nii.gz").write_bytes((out / "b_liver.nii.gz").read_bytes()[:200])
    r = run(*seg, src_b, "--skip-existing")
    assert r.returncode == 1 and "exists but is incomplete or unreadable" in r.stderr
    assert len(rows_of(out / "summary.csv")) == 2
    assert run(*seg, src_b, "--skip-existing", "--overwrite").returncode == 2


def test_folders_shards_and_usage_errors(tmp_path, tiny_model_dir):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("c", "a", "b"):
        write_ct(folder / f"{name}.nii.gz", shape=(30, 48, 56), spacing=(4.0, 4.5, 6.0))
    base = ("-m", "LiverSegExtension.cli", "segment", "--model", tiny_model_dir)
    r = run(*base, folder, "-o", tmp_path / "all", "-q")
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr and "No Series" not in r.stderr  # ITK's own lines stay out without --debug
    assert sorted(p.name for p in (tmp_path / "all").glob("*_liver.nii.gz")) == ["a_liver.nii.gz", "b_liver.nii.gz",
                                                                              "c_liver.nii.gz"]
    files = [folder / f"{n}.nii.gz" for n in ("c", "b", "a")]  # given out of order: shards split the sorted list
    done = []
    for i in (1, 2):
        assert run(*base, *files, "-o", tmp_path / "shards", "--shard", f"{i}/2", "-q").returncode == 0
        done.append([Path(row["input"]).name for row in rows_of(tmp_path / "shards" / f"summary_shard{i}of2.csv")])
    assert done == [["a.nii.gz", "c.nii.gz"], ["b.nii.gz"]]
    for bad in ("0/2", "3/2", "x"):
        r = run(*base, folder, "-o", tmp_path / "x", "--shard", bad)
        assert r.returncode == 2 and "--shard" in r.stderr and "Traceback" not in r.stderr


def test_a_turned_header_gives_the_warning_status(tmp_path, threshold_segmenter, monkeypatch):
    """A small mask under a header that swaps left and right is said to be both; its status is `warning`."""
    m = make_affine((4.0, 4.0, 4.0), (40, 80, 90))
    ct, _ = phantom((40, 80, 90), m)
    sitk.WriteImage(image_from_array(ct, np.diag([-1.0, 1, 1, 1]) @ m), str(tmp_path / "mirrored.nrrd"))
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "right.nrrd"))
    from LiverSegExtension.cli import segment as segment_command

    monkeypatch.setattr(segment_command, "_segmenter", lambda args: threshold_segmenter)
    assert cli.main(["segment", str(tmp_path / "mirrored.nrrd"), str(tmp_path / "right.nrrd"), "-o", str(tmp_path / "o"),
                     "-q"]) == 0
    rows = {Path(row["input"]).name: row for row in rows_of(tmp_path / "o" / "summary.csv")}
    assert rows["right.nrrd"]["status"] == "ok" and rows["right.nrrd"]["warning"] == ""
    assert rows["mirrored.nrrd"]["status"] == "warning" and "swapped?" in rows["mirrored.nrrd"]["warning"]


def test_evaluate_reads_what_segment_writes(tmp_path, tiny_model_dir):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    m = make_affine((3.0, 3.0, 4.0), (30, 48, 56), rotation(0.1, 0.2, 0.0), left_handed=True)
    _, truth = phantom((30, 48, 56), m)
    from LiverSegExtension.io import write_mask

    reference = image_from_array(truth.astype(np.uint8), m)
    for name in ("a", "b", "c"):
        sitk.WriteImage(reference, str(ref_dir / f"{name}.nii.gz"))
    write_mask(truth, reference, pred_dir / "a_liver.seg.nrrd")  # segment --format seg.nrrd
    # the same voxels in Slicer's index order (K reversed), as the batch's .seg.nrrd holds them
    sitk.WriteImage(sitk.DICOMOrient(reference, "RAS"), str(pred_dir / "b_liver.nrrd"))
    base = ("-m", "LiverSegExtension.cli", "evaluate", "--pred", pred_dir, "--ref", ref_dir)
    r = run(*base, "--output", tmp_path / "report.csv")
    assert r.returncode == 0, r.stderr
    assert "| a | 1.000 |" in r.stdout and "| b | 1.000 |" in r.stdout and "| c |" not in r.stdout
    assert r.stderr.count("without a prediction") == 1 and "1 reference(s) without a prediction" in r.stderr
    r = run(*base, "--cases", "b")
    assert r.returncode == 0 and "| b |" in r.stdout and "| a |" not in r.stdout and "without" not in r.stderr
    r = run(*base, "--cases", "zz")
    assert r.returncode == 1 and "no reference for case(s) zz" in r.stderr
    r = run(*base, "--output", tmp_path / "missing" / "r.csv")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_dataset_check_counts_and_add_refuses_a_duplicate(tmp_path):
    m = make_affine((3.0, 3.0, 4.0), (30, 48, 56))
    ct, truth = phantom((30, 48, 56), m)
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(image_from_array(truth.astype(np.uint8), m), str(tmp_path / "mask.nrrd"))
    ds = tmp_path / "ds"
    add = ("-m", "LiverSegExtension.cli", "dataset", "add", "--dataset", ds, "--image", tmp_path / "ct.nrrd",
           "--label", tmp_path / "mask.nrrd")
    assert run(*add).returncode == 0
    r = run(*add)
    assert r.returncode == 1 and "already case liverseg_" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in ds.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "provenance"]  # no lock left
    r = run("-m", "LiverSegExtension.cli", "dataset", "check", ds)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"{ds}: 1 case(s), OK")
    meta = json.loads((ds / "dataset.json").read_text())
    for broken, reason in ((["x"], "expected a JSON object"), ({"training": "abc"}, "must be a list"),
                           ({"training": [{"image": "x"}]}, "has no \"image\" and \"label\""),
                           ({"training": [{"image": "../../ct.nrrd", "label": "../../mask.nrrd"}]}, "outside the dataset")):
        (ds / "dataset.json").write_text(json.dumps(broken))
        for cmd in (("dataset", "check", ds), add[2:]):
            r = run("-m", "LiverSegExtension.cli", *cmd)
            assert r.returncode == 1 and reason in r.stdout + r.stderr and "Traceback" not in r.stderr, (broken, cmd)
    (ds / "dataset.json").write_text(json.dumps(meta))
    (ds / "imagesTr" / ".orphan.nii.gz").write_bytes(b"x")  # what a killed export leaves
    r = run("-m", "LiverSegExtension.cli", "dataset", "check", ds)
    assert r.returncode == 1 and "unfinished temporary file" in r.stdout


def test_view_draws_the_three_planes(tmp_path):
    from PIL import Image

    m = make_affine((2.5, 2.5, 3.0), (50, 100, 110), rotation(0.1, 0.0, 0.2), left_handed=True)
    ct, truth = phantom((50, 100, 110), m)
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(image_from_array(truth.astype(np.uint8), m), str(tmp_path / "mask.nii.gz"))
    r = run("-m", "LiverSegExtension.cli", "view", tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", "-o",
            tmp_path / "pic.png", "--height", "240")
    assert r.returncode == 0, r.stderr
    picture = np.asarray(Image.open(tmp_path / "pic.png").convert("RGB"))
    assert picture.shape[0] == 240 and 3 * 120 < picture.shape[1] < 3 * 480
    outline = np.all(picture == (255, 215, 0), axis=-1)
    thirds = np.array_split(outline, 3, axis=1)
    assert all(part.sum() > 50 for part in thirds)  # the liver's outline shows in each panel
    r = run("-m", "LiverSegExtension.cli", "view", tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", "-o", tmp_path / "pic.png")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert run("-m", "LiverSegExtension.cli", "view").returncode == 2


def test_shard_summaries_merge_into_one(tmp_path, tiny_model_dir):
    """A job array's shards (docs/slurm_array.sh) give one summary.csv with every case, through `summary merge`;
    a missing shard is said and exits 1."""
    from LiverSegExtension.cli import main

    m = make_affine((4.5, 4.5, 6.0), (30, 72, 80))
    ct, _ = phantom((30, 72, 80), m)
    for name in ("a", "b", "c"):
        sitk.WriteImage(image_from_array(ct, m), str(tmp_path / f"{name}.nrrd"))
    out = tmp_path / "out"
    for i in (1, 2):
        assert main(["segment", str(tmp_path), "-o", str(out), "--model", str(tiny_model_dir), "--shard", f"{i}/2",
                     "-q"]) == 0
    assert main(["summary", "merge", str(out)]) == 0
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["input"]).name for r in rows) == ["a.nrrd", "b.nrrd", "c.nrrd"]
    (out / "summary_shard2of2.csv").unlink()
    assert main(["summary", "merge", str(out)]) == 1
    assert len(rows_of(out / "summary.csv")) == 3  # the record is kept
    assert "#SBATCH" in (ROOT / "docs" / "slurm_array.sh").read_text()
