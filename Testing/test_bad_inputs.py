"""Inputs and faults that used to give a wrong result, an output taken for an input, a path out of its folder,
a memory bomb or a crash: each made here, each answered in one line (or the right mask) by every door."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, SHARED, requires_bundled_model
from synthetic import make_affine, phantom, write_dicom_series

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array

BATCH = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, **kwargs)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def small_ct():
    """A small synthetic CT (body, air around it, a liver-like blob) and its IJK-to-RAS matrix."""
    m = make_affine((4.5, 4.5, 6.0), (30, 72, 80))
    return phantom((30, 72, 80), m), m


def blank_uids_and_scramble(files, folder, transfer_syntax=None):
    """The series again with empty SOPClassUID and SeriesInstanceUID (as some converters write them), each file
    under a random name, so that neither the names nor the UIDs give the order."""
    import pydicom

    folder.mkdir(parents=True)
    rng = random.Random(3)
    for file in files:
        ds = pydicom.dcmread(file)
        ds.SOPClassUID = ""
        ds.file_meta.MediaStorageSOPClassUID = ""
        ds.SeriesInstanceUID = ""
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        ds.save_as(folder / f"IM{rng.randrange(10**8):08d}.dcm")
    return folder


# -- 1. a series the batch used to stack in a scrambled order ---------------------------------------------------
@pytest.mark.process
@requires_bundled_model
def test_a_series_without_uids_in_scrambled_files_gives_one_mask_in_both_doors(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    from LiverSegExtension.data.metrics import dice

    shared = SHARED / "dicom" / "chaos_ct3"
    if shared.is_dir():  # chaos_ct3's slices, every other one (4 mm apart), as the report had it
        import pydicom

        files = sorted(shared.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                             .ImagePositionPatient[2]))[20:60:2]
    else:
        m = make_affine((0.8, 0.8, 4.0), (24, 200, 220))
        files = write_dicom_series(tmp_path / "plain", phantom((24, 200, 220), m)[0], m)
    try:
        series = blank_uids_and_scramble(files, tmp_path / "series", JPEG2000Lossless)
    except (RuntimeError, NotImplementedError):  # no JPEG 2000 encoder installed: the order is what matters
        series = blank_uids_and_scramble(files, tmp_path / "series2")
    assert cli("segment", series, "-o", tmp_path / "cli").returncode == 0
    batch = subprocess.run([sys.executable, str(BATCH), "--input", str(series), "-o", str(tmp_path / "batch"),
                            "--labelmap", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert batch.returncode == 0, batch.stdout + batch.stderr
    a = sitk.ReadImage(str(next((tmp_path / "cli").glob("*_liver.nii.gz"))))
    b = sitk.ReadImage(str(next((tmp_path / "batch").glob("*_liver.nii.gz"))))
    assert a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    assert sitk.GetArrayViewFromImage(a).any()
    assert dice(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)) >= 0.999
    assert rows_of(tmp_path / "cli" / "summary.csv")[0]["liver_ml"] == rows_of(tmp_path / "batch" / "summary.csv")[0]["liver_ml"]


def test_a_grid_another_reader_made_wrongly_is_refused(tmp_path):
    """What Slicer's archetype reader made of such a series (the slices at the wrong spacing) is caught."""
    from LiverSegExtension.io import check_loaded_grid, expand_inputs, series_files_in_order

    m = make_affine((0.8, 0.8, 4.0), (12, 40, 48))
    write_dicom_series(tmp_path / "s", phantom((12, 40, 48), m)[0], m)
    (case,) = expand_inputs([tmp_path / "s"])
    image = sitk.ReadImage(series_files_in_order(case))
    from LiverSegExtension.geometry import ijk_to_ras_of

    matrix = ijk_to_ras_of(image)
    check_loaded_grid(case, matrix, sitk.GetArrayViewFromImage(image).shape)  # the right grid passes
    flipped = matrix @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 11], [0, 0, 0, 1.0]])
    check_loaded_grid(case, flipped, (12, 40, 48))  # K reversed, as Slicer loads left-handed volumes
    squeezed = matrix.copy()
    squeezed[:3, 2] *= 1.47 / 4.0
    with pytest.raises(LiverSegError, match="stacked the series on another grid than its headers give"):
        check_loaded_grid(case, squeezed, (12, 40, 48))


# -- 2. a tilted gantry ---------------------------------------------------------------------------------------
@pytest.mark.process
def test_a_tilted_gantry_series_is_refused_by_both_doors(tmp_path):
    m = make_affine((0.9, 0.9, 3.0), (16, 48, 56))
    ct, _ = phantom((16, 48, 56), m)
    sheared = m.copy()
    sheared[:3, 2] += m[:3, 1] / np.linalg.norm(m[:3, 1]) * 3.0 * np.tan(np.radians(15))  # each slice 15 deg on
    write_dicom_series(tmp_path / "tilted", ct, sheared)
    r = cli("segment", tmp_path / "tilted", "-o", tmp_path / "out", "-q")
    assert r.returncode == 1
    error = rows_of(tmp_path / "out" / "summary.csv")[0]["error"]
    assert "gantry tilt of 15.0 degrees" in error and "Traceback" not in r.stderr
    batch = subprocess.run([sys.executable, str(BATCH), "--input", str(tmp_path / "tilted"), "-o",
                            str(tmp_path / "batch"), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert batch.returncode == 1 and "gantry tilt of 15.0 degrees" in rows_of(tmp_path / "batch" / "summary.csv")[0]["error"]


# -- 4, 5. outputs taken for inputs, one file named twice --------------------------------------------------------
@pytest.mark.process
def test_a_rerun_into_a_folder_inside_the_inputs_does_not_take_masks_for_cts(tmp_path, tiny_model_dir):
    from LiverSegExtension.io import expand_inputs

    scans = tmp_path / "scans"
    scans.mkdir()
    (ct, _), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(scans / "ct.nii.gz"))
    for out in (scans / "out", scans):
        for _ in range(2):
            r = cli("segment", scans, "-o", out, "--model", tiny_model_dir, "--format", "seg.nrrd",
                    "--probabilities", "-q")
            assert r.returncode == 0, r.stderr
            assert [row["input"] for row in rows_of(out / "summary.csv")] == [str(scans / "ct.nii.gz")]
    assert [c.source.name for c in expand_inputs([scans])] == ["ct.nii.gz"]


@pytest.mark.process
def test_the_same_file_named_twice_is_segmented_once(tmp_path, tiny_model_dir):
    (ct, _), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "ct.nii.gz")
    r = cli("segment", tmp_path / "ct.nii.gz", tmp_path / "ct.nii.gz", tmp_path / "link.nii.gz", "-o", tmp_path / "out",
            "--model", tiny_model_dir)
    assert r.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_liver.json", "ct_liver.nii.gz", "summary.csv"]
    assert len(rows_of(tmp_path / "out" / "summary.csv")) == 1
    assert r.stderr.count("the same input as") == 2 and "segmented once" in r.stderr


# -- 6. a soft label -------------------------------------------------------------------------------------------
@pytest.mark.process
def test_a_soft_label_is_refused_by_dataset_add(tmp_path):
    (ct, liver), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    blurred = sitk.SmoothingRecursiveGaussian(image_from_array(liver.astype(np.float32), m), 3.0)
    sitk.WriteImage(blurred, str(tmp_path / "soft.nii.gz"))
    r = cli("dataset", "add", "--dataset", tmp_path / "data", "--image", tmp_path / "ct.nii.gz", "--label",
            tmp_path / "soft.nii.gz")
    assert r.returncode == 1 and "soft.nii.gz: the label holds fractional values" in r.stderr
    assert not (tmp_path / "data" / "dataset.json").exists()
    sitk.WriteImage(image_from_array(np.zeros_like(liver, np.uint8), m), str(tmp_path / "empty.nii.gz"))
    r = cli("dataset", "add", "--dataset", tmp_path / "data", "--image", tmp_path / "ct.nii.gz", "--label",
            tmp_path / "empty.nii.gz")
    assert r.returncode == 1 and "empty.nii.gz: the label is empty" in r.stderr


# -- 8. names that would leave their folder ----------------------------------------------------------------------
@pytest.mark.process
def test_a_card_name_that_leaves_the_models_folder_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from LiverSegExtension.model.catalog import new_model_dir, read_card

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    card = json.loads((bad / "card.json").read_text())
    card["name"] = "../../../x"
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(LiverSegError, match="invalid model card: name must be letters"):
        read_card(bad)
    with pytest.raises(LiverSegError, match="cannot name a folder"):
        new_model_dir(card, tmp_path / "models")
    r = cli("train", "--init", tiny_model_dir, "--data", tmp_path, "--output", tmp_path / "o", "--name", "../x")
    assert r.returncode == 2 and "--name '../x'" in r.stderr


# -- 12. the engine process under bad requests ------------------------------------------------------------------
@pytest.mark.process
def test_the_engine_answers_bad_requests_and_stays_usable(tmp_path):
    lines = ["[1, 2]", '{"cmd": "segment", "id": NaN, "input": "x", "output": "y"}', "not json",
             '{"cmd": "segment", "id": 7, "output": "y"}', '{"cmd": "fly", "id": 8}',
             json.dumps({"cmd": "segment", "id": 9, "input": str(tmp_path / "missing.nii.gz"), "output": "y"})]
    proc = subprocess.run([sys.executable, "-m", "LiverSegExtension.worker"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    messages = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON (no NaN echoed)
    assert messages[0]["event"] == "ready"
    errors = [m for m in messages if m["event"] == "error"]
    assert [e["id"] for e in errors] == [None, None, None, 7, 8, 9]
    assert "not a request (a JSON object per line)" in errors[0]["message"]
    assert errors[3]["message"] == "segment request without input"
    assert errors[4]["message"] == "unknown command 'fly'"
    assert errors[5]["message"].endswith("missing.nii.gz: no such file or folder") and errors[5]["user"] is True


# -- 7. headers that read their voxels from elsewhere ------------------------------------------------------------
@pytest.mark.process
def test_detached_data_outside_the_header_folder_is_refused(tmp_path):
    from LiverSegExtension.io import read_image

    (ct, _), m = small_ct()
    elsewhere, here = tmp_path / "elsewhere", tmp_path / "here"
    elsewhere.mkdir()
    here.mkdir()
    sitk.WriteImage(image_from_array(ct, m), str(elsewhere / "ct.nhdr"))  # ct.nhdr + ct.raw
    sitk.WriteImage(image_from_array(ct, m), str(elsewhere / "ct.mhd"))  # ct.mhd + (the same) ct.raw
    nhdr = (elsewhere / "ct.nhdr").read_text().replace("data file: ct.raw", f"data file: {elsewhere / 'ct.raw'}")
    (here / "ct.nhdr").write_text(nhdr)
    mhd = (elsewhere / "ct.mhd").read_text().replace("ElementDataFile = ct.raw", "ElementDataFile = ../elsewhere/ct.raw")
    (here / "ct.mhd").write_text(mhd)
    for header in (here / "ct.nhdr", here / "ct.mhd"):
        with pytest.raises(LiverSegError, match="outside the header's folder"):
            read_image(header)
    assert read_image(elsewhere / "ct.nhdr").GetSize() == (80, 72, 30)  # beside their header: read
    r = cli("dataset", "add", "--dataset", tmp_path / "data", "--image", here / "ct.mhd", "--label", here / "ct.mhd")
    assert r.returncode == 1 and "outside the header's folder" in r.stderr and not (tmp_path / "data").exists()
    batch = subprocess.run([sys.executable, str(BATCH), "--input", str(here / "ct.nhdr"), "-o", str(tmp_path / "b"),
                            "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert batch.returncode == 1 and "outside the header's folder" in rows_of(tmp_path / "b" / "summary.csv")[0]["error"]


# -- 9, 10. memory bombs, too little memory -------------------------------------------------------------------
def nifti_header(dims, bitpix=16, datatype=4) -> bytes:
    import struct

    header = bytearray(348)
    header[0:4] = struct.pack("<i", 348)
    header[40:56] = struct.pack("<8h", len(dims), *dims, *[1] * (7 - len(dims)))
    header[70:72] = struct.pack("<h", datatype)
    header[72:74] = struct.pack("<h", bitpix)
    header[76:108] = struct.pack("<8f", 1, 1, 1, 1, 1, 1, 1, 1)
    header[108:112] = struct.pack("<f", 352)
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0" * 4


@pytest.mark.process
def test_memory_bombs_are_refused_at_once_without_allocating(tmp_path):
    """A .nii.gz whose header claims tens of GB (a gzip bomb), and a tiny one whose claim wraps the gzip trailer's
    length (mod 2**32): refused in one line, in a process that never grows past 1 GB."""
    import gzip
    import zlib

    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(nifti_header([4096, 4096, 1024]))  # 32 GB of int16
        zeros = b"\0" * (1 << 24)
        for _ in range(64):  # 1 GB of zeros: about 1 MB compressed (the claim is what is refused)
            f.write(zeros)
    wrapped = tmp_path / "wrapped.nii.gz"
    body = nifti_header([1024, 1024, 2049])  # 2**32 + 2 MiB + 352 bytes claimed
    claimed = 352 + 1024 * 1024 * 2049 * 2
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = stream.compress(body + b"\0" * (claimed % (1 << 32) - 352)) + stream.flush()
    wrapped.write_bytes(data)  # its trailer says (claimed mod 2**32) bytes: what the stream holds
    code = ("import sys, time; from LiverSegExtension.io import read_image; "
            "from LiverSegExtension.errors import LiverSegError\n"
            "for path in sys.argv[1:]:\n"
            "    t = time.perf_counter()\n"
            "    try: read_image(path); print('read')\n"
            "    except LiverSegError as e: print(round(time.perf_counter() - t, 2), e)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    r = subprocess.run([sys.executable, "-c", code, str(bomb), str(wrapped)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    lines = r.stdout.splitlines()
    assert "the header claims 34.4 GB of voxels (4096x4096x1024)" in lines[0] and "not enough memory" in lines[0]
    assert "the header claims 4.3 GB of voxels (1024x1024x2049)" in lines[1] and "more than gzip can hold" in lines[1]
    assert all(float(line.split()[0]) < 5 for line in lines[:2])
    assert int(lines[2]) < 1 << 20  # peak under 1 GB (VmHWM in kB: ru_maxrss would count the forked parent)


def test_a_claim_that_the_stream_does_not_hold_is_refused_before_itk_allocates(tmp_path):
    import gzip

    path = tmp_path / "short.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(nifti_header([512, 512, 40]) + b"\1" * 1000)
    from LiverSegExtension.io import read_image

    with pytest.raises(LiverSegError, match="truncated or damaged file|more than gzip can hold"):
        read_image(path)


def test_running_out_of_memory_while_reading_says_so(tmp_path, monkeypatch):
    from LiverSegExtension import io

    (ct, _), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nrrd"))

    def fail(self):
        raise RuntimeError("/work/ITK/Modules/Core/Common/src/itkImportImageContainer.hxx:192: "
                           "Failed to allocate memory for image.")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", fail)
    with pytest.raises(LiverSegError, match=r"ct.nrrd: not enough memory \(needed about 1 GB\)$"):
        io.read_image(tmp_path / "ct.nrrd")


@pytest.mark.process
def test_too_little_memory_to_start_is_one_line():
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'numpy': raise ImportError('libopenblas.so: failed to map segment from shared object')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\nimport LiverSegExtension\nsys.exit(LiverSegExtension.console())")
    r = subprocess.run([sys.executable, "-c", code, "segment", "x", "-o", "y"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == "liverseg: error: not enough memory to start"


# -- 11. a file name that is not UTF-8 ---------------------------------------------------------------------------
@pytest.mark.process
def test_a_latin1_file_name_is_refused_and_the_other_cases_still_run(tmp_path, tiny_model_dir):
    import os

    (ct, _), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ok.nii.gz"))
    latin1 = os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.nii.gz")
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "tmp.nii.gz"))
    os.rename(tmp_path / "tmp.nii.gz", latin1)
    r = cli("segment", tmp_path, "-o", tmp_path / "out", "--model", tiny_model_dir, "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    rows = {row["input"]: row for row in rows_of(tmp_path / "out" / "summary.csv")}
    assert rows[str(tmp_path / "caf\\xe9.nii.gz")]["error"].endswith("the file name is not valid UTF-8 (bytes of "
                                                                      "another encoding); rename the file or folder")
    assert rows[str(tmp_path / "ok.nii.gz")]["status"] in ("ok", "warning", "empty")


# -- 13. a full disk, a dataset folder that is a broken link -----------------------------------------------------
def test_a_full_disk_while_writing_the_summary_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import errno

    from LiverSegExtension import cli as door
    from LiverSegExtension.io import files, summary

    (ct, _), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.csv").write_text("input,output,status\nold.nii.gz,old_liver.nii.gz,ok\n")
    real = files.atomic_write

    def full(path, write_to, overwrite=False):
        if Path(path).name == "summary.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write_to, overwrite)

    monkeypatch.setattr(summary, "atomic_write", full)  # what write_summary writes with
    assert door.main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"), "--model",
                      str(tiny_model_dir), "-q"]) == 1
    err = capsys.readouterr().err
    assert "summary.csv: could not be written (No space left on device)" in err and "Traceback" not in err
    assert "old.nii.gz" in (tmp_path / "out" / "summary.csv").read_text()  # the record as it was


@pytest.mark.process
def test_a_dataset_folder_that_is_a_broken_link_is_one_line(tmp_path):
    (ct, liver), m = small_ct()
    sitk.WriteImage(image_from_array(ct, m), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(image_from_array(liver.astype(np.uint8), m), str(tmp_path / "liver.nii.gz"))
    (tmp_path / "data").symlink_to(tmp_path / "unmounted" / "data")
    r = cli("dataset", "add", "--dataset", tmp_path / "data", "--image", tmp_path / "ct.nii.gz", "--label",
            tmp_path / "liver.nii.gz")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("which does not exist (a drive not mounted?)")


# -- 15. messages that point the right way ------------------------------------------------------------------------
def test_a_small_mask_is_explained_by_what_the_scan_shows():
    """A child-sized body is not "a scan of the chest or the pelvis"; nor is a scan too short for a liver."""
    from LiverSegExtension.inference.postprocess import body_extent, size_warning

    def body(width_mm: float, slices: int, spacing=(1.0, 1.0, 2.0)):
        ct = np.full((slices, 300, 400), -1000, np.int16)
        half = int(width_mm / spacing[0] / 2)
        ct[:, 100:200, 200 - half:200 + half] = 40
        image = sitk.GetImageFromArray(ct)
        image.SetSpacing(spacing)
        return image

    child, short, adult, crop = body(180, 120), body(330, 40), body(330, 120), body(400, 120)
    assert body_extent(child)[0] == pytest.approx(180, abs=8) and body_extent(short)[1] == 80
    assert body_extent(crop)[0] == 0 and body_extent(crop)[2] == 400
    assert "the field of view (400 mm across) cuts through the body" in size_warning(150.0, "c.nrrd", body_extent(crop))
    assert "the body is small (1" in size_warning(150.0, "kid.nrrd", body_extent(child))
    assert "a child?" in size_warning(150.0, "kid.nrrd", body_extent(child))
    assert "covers only 80 mm along the body" in size_warning(150.0, "s.nrrd", body_extent(short))
    assert "chest or the pelvis" in size_warning(150.0, "a.nrrd", body_extent(adult))
    assert size_warning(1500.0, "a.nrrd", body_extent(adult)) is None


# -- 3. a NIfTI whose qform and sform disagree ----------------------------------------------------------------
@pytest.mark.process
def test_disagreeing_qform_and_sform_are_named_and_kept_in_the_mask(tmp_path, tiny_model_dir):
    nib = pytest.importorskip("nibabel")
    (ct, _), m = small_ct()
    affine = m  # IJK to RAS, as NIfTI's transforms are
    image = nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), affine)
    shifted = affine.copy()
    shifted[:3, 3] += [12.0, -8.0, 20.0]
    image.set_qform(affine, code=2)
    image.set_sform(shifted, code=1)  # ITK reads the sform when its code is 1
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    r = cli("segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "out", "--model", tiny_model_dir, "--probabilities")
    assert r.returncode == 0, r.stderr
    row = rows_of(tmp_path / "out" / "summary.csv")[0]
    assert row["status"] == "warning"
    assert "the header's qform and sform disagree (up to 24.7 mm apart); the sform (code 1, scanner anatomy)" in row["warning"]
    for output in ("ct_liver.nii.gz", "ct_liver_prob.nii.gz"):
        mask = nib.load(str(tmp_path / "out" / output))
        assert np.allclose(mask.get_qform(), image.get_qform()) and np.allclose(mask.get_sform(), image.get_sform())
        assert int(mask.header["qform_code"]) == 2 and int(mask.header["sform_code"]) == 1
    agree = nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), affine)
    nib.save(agree, str(tmp_path / "agree.nii.gz"))
    from LiverSegExtension.io.formats.nifti import disagreement

    assert disagreement(tmp_path / "agree.nii.gz") is None


# -- 14. DICOM SEG of a series with empty UIDs ----------------------------------------------------------------------
def test_a_seg_of_a_series_with_an_empty_sop_class_is_valid_and_one_without_series_uid_is_refused(tmp_path):
    import pydicom

    from LiverSegExtension.io import expand_inputs, read_case
    from LiverSegExtension.io.dicom_seg import write_dicom_seg

    (ct, liver), m = small_ct()
    files = write_dicom_series(tmp_path / "src", ct, m)
    for file in files:
        ds = pydicom.dcmread(file)
        ds.SOPClassUID = ""
        ds.save_as(file)
    (case,) = expand_inputs([tmp_path / "src"])
    mask = np.zeros(sitk.GetArrayViewFromImage(read_case(case)).shape, np.uint8)
    mask[10:20, 20:40, 20:40] = 1
    notes = write_dicom_seg(mask, case.files, tmp_path / "seg.dcm", "liverseg", "1.0.0")
    assert notes == [f"{len(files)} source image(s) have an empty SOPClassUID: the SEG references them as CT Image "
                     "Storage, from their Modality"]
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    reference = seg.ReferencedSeriesSequence[0]
    assert reference.SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    assert {r.ReferencedSOPClassUID for r in reference.ReferencedInstanceSequence} == {"1.2.840.10008.5.1.4.1.1.2"}
    for file in files:
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = ""
        ds.save_as(file)
    (case,) = expand_inputs([tmp_path / "src"])
    with pytest.raises(LiverSegError, match="the source series has no SeriesInstanceUID; a DICOM SEG could not "
                                            "reference it"):
        write_dicom_seg(mask, case.files, tmp_path / "seg2.dcm", "liverseg", "1.0.0")
    assert not (tmp_path / "seg2.dcm").exists()


@pytest.mark.process
@requires_bundled_model
def test_the_batch_leaves_no_output_for_a_case_whose_seg_failed(tmp_path):
    import pydicom

    m = make_affine((0.8, 0.8, 4.0), (24, 200, 220))
    files = write_dicom_series(tmp_path / "src", phantom((24, 200, 220), m)[0], m)
    for file in files:
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = ""
        ds.save_as(file)
    batch = subprocess.run([sys.executable, str(BATCH), "--input", str(tmp_path / "src"), "-o", str(tmp_path / "out"),
                            "--dicom-seg", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert batch.returncode == 1
    (row,) = rows_of(tmp_path / "out" / "summary.csv")
    assert row["status"] == "failed" and "no SeriesInstanceUID" in row["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]


# -- 15. what DICOM messages name ---------------------------------------------------------------------------------
def test_an_enhanced_multiframe_ct_and_a_cut_slice_are_named_for_what_they_are(tmp_path):
    import pydicom

    from LiverSegExtension.io import expand_inputs, read_case

    (ct, _), m = small_ct()
    files = write_dicom_series(tmp_path / "classic", ct, m)
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.NumberOfFrames = ct.shape[0]
    ds.PixelData = (ct.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "ct.dcm")
    with pytest.raises(LiverSegError, match=r"an enhanced \(multi-frame\) DICOM image, 30 frames in one file"):
        read_case(expand_inputs([tmp_path / "enhanced"])[0])
    data = files[12].read_bytes()
    files[12].write_bytes(data[: len(data) // 3])  # a copy cut short
    with pytest.raises(LiverSegError, match="DICOM file slice0012.dcm in the series' folder is unreadable"):
        read_case(expand_inputs([tmp_path / "classic"])[0])


def test_the_doors_requests_are_the_protocols():
    """What the Slicer side builds is what the engine accepts, field for field."""
    from LiverSegExtension import protocol

    for request in (protocol.segment_request(1, "ct.nrrd", "mask.nrrd", attributes=True),
                    protocol.train_request(2, "model", ["data"], "new"),
                    protocol.export_request(3, "data", {"image": "ct.nrrd", "label": "l.nrrd"}, {"annotator": "a"})):
        assert protocol.parse_request(json.dumps(request)) == request
    with pytest.raises(protocol.BadRequest, match="export request without image, label"):
        protocol.parse_request(json.dumps({"cmd": "export", "id": 4, "dataset": "d"}))
