"""Never a silently wrong result or a half-written output: files cut short on writing, damaged compressed
input, NaN voxels, folders that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array


def test_a_mask_cut_short_by_a_file_size_limit_never_takes_its_name(tmp_path):
    """ITK writes a .nii.gz cut short at the limit without an error: the read-back check must refuse it."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, SimpleITK as sitk
        from LiverSegExtension.errors import LiverSegError
        from LiverSegExtension.io import write_mask
        reference = sitk.Image([120, 120, 120], sitk.sitkInt16)
        mask = (np.random.default_rng(0).random((120, 120, 120)) > 0.5).astype(np.uint8)  # does not compress
        resource.setrlimit(resource.RLIMIT_FSIZE, (40960, 40960))
        try:
            write_mask(mask, reference, {str(tmp_path / 'mask.nii.gz')!r})
        except LiverSegError as exc:
            print(exc)
            sys.exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "could not be written" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []  # neither the mask nor a temporary file


def test_damaged_compressed_input_and_nan_voxels_are_refused(tmp_path, threshold_segmenter):
    from LiverSegExtension.io import read_image

    m = make_affine((4.0, 4.0, 4.0), (40, 80, 90))
    ct, _ = phantom((40, 80, 90), m)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(LiverSegError, match="corrupt compressed data"):
        read_image(path)
    floats = ct.astype(np.float32)
    floats[20, 40, 45] = np.nan  # one voxel: a sampled check would miss it
    nan_path = tmp_path / "nan.nrrd"
    sitk.WriteImage(image_from_array(floats, m), str(nan_path))
    with pytest.raises(LiverSegError, match=r"1 voxel\(s\) are NaN or infinite"):
        threshold_segmenter.segment_image(read_image(nan_path), source=str(nan_path))


def test_an_output_folder_that_cannot_be_written_is_a_usage_error(tmp_path, tiny_model_dir):
    m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
    ct, _ = phantom((30, 48, 56), m)
    src = tmp_path / "ct.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(src))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "out", tmp_path / "dangling"):
        if out.name == "dangling":
            out.symlink_to(tmp_path / "nowhere" / "deeper")
        r = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", str(src), "-o", str(out),
                            "--model", str(tiny_model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"liverseg: error: {out}"), r.stderr


@pytest.mark.parametrize("fault", ["duplicate", "missing", "uneven"])
def test_dicom_series_with_a_wrong_slice_layout_are_refused(tmp_path, fault):
    """ITK would stack these on a grid of the average spacing (a duplicated slice even flips z): refused."""
    import shutil

    from synthetic import write_dicom_series

    from LiverSegExtension.io import expand_inputs, read_case

    m = make_affine((3.0, 3.0, 2.0), (30, 64, 64))
    ct, _ = phantom((30, 64, 64), m)
    files = write_dicom_series(tmp_path / "series", ct, m)
    [good] = expand_inputs([tmp_path / "series"])
    assert read_case(good).GetSize() == (64, 64, 30)
    if fault == "duplicate":
        shutil.copy(files[10], files[10].with_name("copy_of_slice10.dcm"))
        match = "two slices at the same position"
    elif fault == "missing":
        files[12].unlink()
        match = "uneven slice spacing"
    else:  # 2 mm, then 4 mm: every other slice of the upper half gone
        for f in files[16::2]:
            f.unlink()
        match = "uneven slice spacing"
    [case] = expand_inputs([tmp_path / "series"])
    with pytest.raises(LiverSegError, match=match):
        read_case(case)


def test_sheared_grids_bad_nifti_spacing_and_padding(tmp_path, threshold_segmenter):
    import struct

    from LiverSegExtension.io import read_image

    m = make_affine((4.0, 4.0, 4.0), (40, 80, 90))
    ct, liver = phantom((40, 80, 90), m)
    sheared = image_from_array(ct, m)
    direction = np.array(sheared.GetDirection()).reshape(3, 3)
    direction[:, 2] = (direction[:, 2] + 0.3 * direction[:, 0]) / np.linalg.norm(direction[:, 2] + 0.3 * direction[:, 0])
    sheared.SetDirection(direction.ravel().tolist())
    with pytest.raises(LiverSegError, match="not perpendicular"):
        threshold_segmenter.segment_image(sheared)
    path = tmp_path / "ct.nii"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    data = bytearray(path.read_bytes())
    for bad in (0.0, float("nan"), -4.0):
        data[80:84] = struct.pack("<f", bad)  # pixdim[1]
        path.write_bytes(bytes(data))
        with pytest.raises(LiverSegError, match="is not a positive size in mm"):
            read_image(path)
    padded = ct.copy()
    padded[:, :6, :] = -32768  # outside the scanner's field of view
    result = threshold_segmenter.segment_array(padded, m)
    assert result.liver_ml > 0 and (result.mask > 0).sum() == pytest.approx(int(liver.sum()), rel=0.05)


def test_debris_of_a_dead_writer_is_cleaned_and_live_work_is_not(tmp_path):
    from LiverSegExtension.io import _HOST, TEMP_MARK, clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a_liver.nii.gz{TEMP_MARK}{_HOST}-{int(dead.stdout)}-abcd.nii.gz"
    live = tmp_path / f".b_liver.nii.gz{TEMP_MARK}{_HOST}-{os.getpid()}-abcd.nii.gz"
    other_host = tmp_path / f".c_liver.nii.gz{TEMP_MARK}elsewhere-1-abcd.nii.gz"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other_host.exists()  # another host's file goes only once a day old


def test_concurrent_runs_into_one_folder_lose_no_row(tmp_path, tiny_model_dir):
    inputs = []
    for n in range(4):
        m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
        ct, _ = phantom((30, 48, 56), m)
        inputs.append(tmp_path / f"ct{n}.nrrd")
        sitk.WriteImage(image_from_array(ct + n, m), str(inputs[-1]))
    out = tmp_path / "out"

    def start(src):
        return subprocess.Popen([sys.executable, "-m", "LiverSegExtension.cli", "segment", str(src), "-o", str(out),
                                 "--model", str(tiny_model_dir), "-q"], cwd=ROOT, stderr=subprocess.PIPE, text=True)

    procs = [start(src) for src in inputs]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    import csv

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["input"] for r in rows) == sorted(map(str, inputs))
    procs = [start(inputs[0]) for _ in range(4)]  # the same input four times: never a "failed" row
    [p.wait(timeout=300) for p in procs]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] != "failed" for r in rows), rows


@pytest.mark.parametrize("field, value, says", [
    ("intensity_window", "abc", "intensity_window"), ("intensity_window", [300, -200], "intensity_window"),
    ("spacing_mm", [0, 2.5, 2.5], "stages.fine.spacing_mm"), ("spacing_mm", [-1, 2.5, 2.5], "stages.fine.spacing_mm"),
    ("margin_mm", 1e9, "stages.fine.margin_mm"), ("channels", [16, 65536], "stages.fine.network.channels")])
def test_a_tampered_model_card_is_refused_naming_the_field(tmp_path, tiny_model_dir, field, value, says):
    import json
    import shutil

    from LiverSegExtension.model import LiverModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    if field == "intensity_window":
        card[field] = value
    elif field == "channels":
        card["stages"]["fine"]["network"]["channels"] = value
    else:
        card["stages"]["fine"][field] = value
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(LiverSegError, match=f"invalid model card: {says}"):
        LiverModel.load(folder)


def test_a_checkpoint_that_is_not_ours_is_refused(tmp_path):
    import torch

    from LiverSegExtension.training import load_checkpoint

    for content in ({"weights": torch.zeros(2)}, [1, 2, 3]):
        torch.save(content, tmp_path / "checkpoint.pt")
        with pytest.raises(LiverSegError, match="not a LiverSeg training checkpoint"):
            load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(LiverSegError, match="not a LiverSeg training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
