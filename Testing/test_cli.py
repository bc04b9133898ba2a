"""The ``liverseg segment`` door: formats, bad input, no overwrite, devices, exit codes, summary.csv.

These run the real CLI in this process (``cli.main``; one test as a process of its own) with a tiny untrained
model (what is checked here is plumbing and geometry, not accuracy); the trained model is checked on real
data in test_real_data.py.
"""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom, rotation, write_dicom_series

from LiverSegExtension.geometry import ijk_to_ras_of, image_from_array

SHAPE, SPACING = (30, 48, 56), (4.0, 4.5, 6.0)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``liverseg ARGS`` in this process (``cli.main``), its exit code and what it printed."""
    import contextlib
    import io

    from LiverSegExtension.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["liverseg", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    """``liverseg ARGS`` as a process of its own, as a user runs it (the door's smoke test)."""
    return subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory):
    m = make_affine(SPACING, SHAPE, rotation(0.2, -0.1, 0.3), left_handed=True)
    ct, _ = phantom(SHAPE, m)
    return ct, m, tmp_path_factory.mktemp("inputs")


@pytest.mark.parametrize("kind", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "ct.mhd", "dicom", "dicom_rle", "dicom_j2k"])
def test_every_input_format_gives_a_mask_on_the_input_grid(kind, ct_case, tiny_model_dir, tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    ct, m, folder = ct_case
    if kind.startswith("dicom"):
        src = folder / kind
        write_dicom_series(src, ct, m, {"dicom": None, "dicom_rle": RLELossless, "dicom_j2k": JPEG2000Lossless}[kind])
    else:
        src = folder / kind
        sitk.WriteImage(image_from_array(ct, m), str(src))
    out = tmp_path / "out"
    r = run_cli("segment", src, "-o", out, "--model", tiny_model_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    [row] = summary(out)
    assert row["status"] in ("ok", "empty") and row["error"] == ""
    assert (row["status"] == "empty") == row["warning"].endswith("no liver found")
    mask = sitk.ReadImage(row["output"])
    ref = sitk.ReadImage(str(src)) if not kind.startswith("dicom") else None
    if ref is None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
        ref = reader.Execute()
        # Slicer and ITK sort a left-handed series along its normal: compare in RAS, not index order.
        assert np.linalg.det(np.array(ref.GetDirection()).reshape(3, 3)) > 0
        np.testing.assert_allclose(sitk.GetArrayFromImage(ref)[::-1], ct.clip(-1024), atol=0)
    assert mask.GetSize() == ref.GetSize()
    np.testing.assert_allclose(ijk_to_ras_of(mask), ijk_to_ras_of(ref), atol=1e-4)
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_output_formats_and_seg_nrrd_terminology(ct_case, tiny_model_dir, tmp_path):
    import slicerio

    ct, m, folder = ct_case
    src = folder / "fmt.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(src))
    for fmt in ("nrrd", "seg.nrrd"):
        out = tmp_path / fmt.replace(".", "_")  # a folder named like a mask file is refused
        r = run_cli("segment", src, "-o", out, "--model", tiny_model_dir, "--format", fmt, "-q")
        assert r.returncode == 0, r.stderr
        assert summary(out)[0]["output"].endswith(f"_liver.{fmt}")
    seg = slicerio.read_segmentation(str(tmp_path / "seg_nrrd" / "fmt_liver.seg.nrrd"))
    [segment] = seg["segments"]
    assert segment["name"] == "Liver"
    assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert segment["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert [round(c * 255) for c in segment["color"]] == [221, 130, 101]


def _bad_inputs(folder: Path, ct: np.ndarray, m: np.ndarray) -> dict[str, Path]:
    bad: dict[str, Path] = {}
    bad["missing"] = folder / "does_not_exist.nii.gz"
    (folder / "notes.nii.gz").write_text("this is not an image\n")
    bad["not_an_image"] = folder / "notes.nii.gz"
    good = folder / "whole.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(good))
    raw = gzip.decompress(good.read_bytes())
    (folder / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    bad["truncated"] = folder / "truncated.nii.gz"
    (folder / "cut.nii.gz").write_bytes(good.read_bytes()[:2000])
    bad["cut"] = folder / "cut.nii.gz"
    nrrd = folder / "whole.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(nrrd), useCompression=False)
    (folder / "cut.nrrd").write_bytes(nrrd.read_bytes()[:20000])
    nrrd.unlink()
    bad["cut_nrrd"] = folder / "cut.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(ct[10]), str(folder / "slice2d.nrrd"))
    bad["2d"] = folder / "slice2d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([image_from_array(ct, m)] * 2), str(folder / "series4d.nii.gz"))
    bad["4d"] = folder / "series4d.nii.gz"
    (folder / "empty_dicom").mkdir()
    bad["empty_folder"] = folder / "empty_dicom"
    mr = image_from_array((ct.astype(np.int32) + 1100).clip(0).astype(np.int16), m)
    sitk.WriteImage(mr, str(folder / "mr_like.nrrd"))
    bad["not_ct_intensity"] = folder / "mr_like.nrrd"
    absurd = image_from_array(ct, m)
    absurd.SetSpacing((0.001, 0.001, 0.001))
    sitk.WriteImage(absurd, str(folder / "absurd_spacing.nrrd"))
    bad["absurd_spacing"] = folder / "absurd_spacing.nrrd"
    return bad


def test_bad_inputs_fail_alone_with_one_clear_line(ct_case, tiny_model_dir, tmp_path):
    ct, m, _ = ct_case
    bad = _bad_inputs(tmp_path, ct, m)
    good = tmp_path / "whole.nii.gz"
    out = tmp_path / "out"
    r = run_cli("segment", *bad.values(), good, "-o", out, "--model", tiny_model_dir, "-q")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    rows = {Path(row["input"]).name: row for row in summary(out)}
    assert rows["whole.nii.gz"]["status"] in ("ok", "empty")
    expected_reason = {
        "missing": "no such file", "not_an_image": "Not a gzipped file", "truncated": "truncated", "cut": "truncated",
        "cut_nrrd": "truncated",
        "2d": "2D", "4d": "4D",
        "empty_folder": "no volume file or DICOM image series", "not_ct_intensity": "cannot be CT",
        "absurd_spacing": "absurd voxel spacing",
    }
    for kind, path in bad.items():
        row = rows[path.name]
        assert row["status"] == "failed", kind
        assert row["error"].startswith(str(path)), (kind, row["error"])
        assert expected_reason[kind] in row["error"], (kind, row["error"])
        assert "\n" not in row["error"] and len(row["error"]) < 300, (kind, row["error"])
        assert f"liverseg: error: {row['error']}" in r.stderr
    # Only the good case produced a file (plus the summary): nothing half-written.
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "whole_liver.json", "whole_liver.nii.gz"]


@pytest.mark.process
def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    r = run_cli_process("segment", tmp_path / "nothing.nii.gz", "-o", tmp_path / "o", "--model", tiny_model_dir, "-q",
                        "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_existing_output_is_never_overwritten_without_flag(ct_case, tiny_model_dir, tmp_path):
    ct, m, _ = ct_case
    src = tmp_path / "case.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(src))
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "case_liver.nii.gz"
    existing.write_bytes(b"precious")
    r = run_cli("segment", src, "-o", out, "--model", tiny_model_dir, "-q")
    # nothing says it was made from this input: not skipped as done, not replaced either
    assert r.returncode == 1 and "no record" in r.stderr and "--overwrite" in r.stderr
    assert existing.read_bytes() == b"precious"
    r = run_cli("segment", src, "-o", out, "--model", tiny_model_dir, "-q", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sitk.ReadImage(str(existing)).GetSize() == SHAPE[::-1]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_device_and_usage_errors_exit_2(tiny_model_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        r = run_cli("segment", "x.nii.gz", "-o", tmp_path, "--model", tiny_model_dir, "--device", "cuda")
        assert r.returncode == 2 and "no CUDA GPU is available" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("segment", "x.nii.gz", "-o", tmp_path, "--model", tiny_model_dir, "--device", "tpu")
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr
    assert run_cli("segment").returncode == 2
    assert run_cli("segment", "x.nii.gz", "-o", tmp_path, "--model", tmp_path / "no_model").returncode == 2
    # -o names a folder: a mask file's name there is refused before anything is made, not turned into a folder.
    r = run_cli("segment", "x.nii.gz", "-o", tmp_path / "liver.nii.gz", "--model", tiny_model_dir)
    assert r.returncode == 2 and "liver.nii.gz: --output-dir names a folder, not a mask file" in r.stderr
    assert not (tmp_path / "liver.nii.gz").exists()


def test_resolve_device():
    import torch

    from LiverSegExtension.errors import LiverSegError
    from LiverSegExtension.model.devices import available_devices, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert str(resolve_device("auto")) == available_devices()[0]
    with pytest.raises(LiverSegError, match="cuda:99"):  # no machine has 100 GPUs: absent either way
        resolve_device("cuda:99")
    with pytest.raises(LiverSegError, match="unknown device"):
        resolve_device("gpu")


def test_dicom_folder_with_two_series_gives_two_cases(ct_case, tiny_model_dir, tmp_path):
    ct, m, _ = ct_case
    write_dicom_series(tmp_path / "study" / "a", ct, m)
    write_dicom_series(tmp_path / "study" / "b", ct[:20], m)
    out = tmp_path / "out"
    r = run_cli("segment", tmp_path / "study", "-o", out, "--model", tiny_model_dir, "-q")
    assert r.returncode == 0, r.stderr
    rows = summary(out)
    assert len(rows) == 2
    assert {sitk.ReadImage(r["output"]).GetSize()[2] for r in rows} == {30, 20}
    assert list(rows[0]) == ["input", "output", "status", "liver_ml", "uncertainty", "seconds", "error", "warning",
                             "runtime", "input_path", "model"]
    assert all(float(r["seconds"]) > 0 for r in rows)
