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


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
def test_debris_of_a_dead_writer_is_cleaned_and_live_work_is_not(tmp_path):
    from LiverSegExtension.io.files import _HOST, TEMP_MARK, clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a_liver.nii.gz{TEMP_MARK}{_HOST}-{int(dead.stdout)}-abcd.nii.gz"
    live = tmp_path / f".b_liver.nii.gz{TEMP_MARK}{_HOST}-{os.getpid()}-abcd.nii.gz"
    other_host = tmp_path / f".c_liver.nii.gz{TEMP_MARK}elsewhere-1-abcd.nii.gz"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other_host.exists()  # another host's file goes only once a day old


@pytest.mark.process
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

    from LiverSegExtension.model.networks import LiverModel

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

    from LiverSegExtension.training.checkpoint import load_checkpoint

    for content in ({"weights": torch.zeros(2)}, [1, 2, 3]):
        torch.save(content, tmp_path / "checkpoint.pt")
        with pytest.raises(LiverSegError, match="not a LiverSeg training checkpoint"):
            load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(LiverSegError, match="not a LiverSeg training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


WIDE_CASES = [(ext, compress) for ext in (".nii", ".nrrd", ".mha") for compress in (False, True)] + [(".mhd", False)]


@pytest.mark.parametrize(("ext", "compress"), WIDE_CASES)
def test_wide_voxel_types_are_read_in_chunks_exactly_as_itk_reads_them(tmp_path, ext, compress, monkeypatch):
    """float64, int32... are decoded chunk by chunk into int16 (whole HU) or float32 (fractions): the same
    values and grid as ITK's whole read, and a chunk boundary that splits voxels changes nothing."""
    from LiverSegExtension.io import compact_read, read_image
    from LiverSegExtension.io.formats import raw_layout

    monkeypatch.setattr(compact_read, "CHUNK_BYTES", 4099)  # many chunks, none a whole number of voxels
    rng = np.random.default_rng(0)
    whole = rng.integers(-1024, 2000, size=(9, 11, 13)).astype(np.float64)
    m = make_affine((0.7, 0.8, 2.5), (9, 11, 13))
    for values, pixel, expect in ((whole, sitk.sitkFloat64, np.int16), (whole + 0.25, sitk.sitkFloat64, np.float32),
                                  (whole + 0.5, sitk.sitkFloat32, np.float32), (whole, sitk.sitkInt32, np.int16),
                                  (np.where(whole > 1500, 40000.0, whole), sitk.sitkInt32, np.float32)):
        image = sitk.Cast(image_from_array(values, m), pixel)
        path = tmp_path / f"ct_{pixel}{'_gz' if compress else ''}{ext}"
        sitk.WriteImage(image, str(path), compress)
        assert raw_layout(path) is not None  # the chunked reader, not ITK's fallback
        got, ref = read_image(path), sitk.ReadImage(str(path))
        assert sitk.GetArrayViewFromImage(got).dtype == expect
        np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(ref).astype(expect))
        assert (got.GetOrigin(), got.GetSpacing(), got.GetDirection()) == (ref.GetOrigin(), ref.GetSpacing(),
                                                                          ref.GetDirection())


def test_big_endian_nrrd_and_scaled_nifti_are_read_as_itk_reads_them(tmp_path):
    import struct

    from LiverSegExtension.io import read_image

    values = np.arange(-600, 600, dtype=">f8").reshape(6, 10, 20)
    path = tmp_path / "big_endian.nrrd"
    header = ("NRRD0004\ntype: double\ndimension: 3\nspace: left-posterior-superior\nsizes: 20 10 6\n"
              "space directions: (0.5,0,0) (0,0.5,0) (0,0,2)\nencoding: raw\nendian: big\nspace origin: (1,2,3)\n\n")
    path.write_bytes(header.encode() + values.tobytes())
    got = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert sitk.GetArrayViewFromImage(got).dtype == np.int16 and got.GetSpacing() == (0.5, 0.5, 2.0)
    nifti = tmp_path / "scaled.nii"
    sitk.WriteImage(sitk.Cast(image_from_array(values.astype(np.float64), np.diag([2.0, 2.0, 2.0, 1.0])),
                              sitk.sitkFloat64), str(nifti))
    data = bytearray(nifti.read_bytes())
    data[112:120] = struct.pack("<2f", 0.5, -1024.0)  # scl_slope, scl_inter: ITK applies them
    nifti.write_bytes(bytes(data))
    got, ref = read_image(nifti), sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(ref))
    assert float(sitk.GetArrayViewFromImage(got).min()) == -1324.0


def test_damaged_wide_files_are_refused_not_zero_filled(tmp_path):
    from LiverSegExtension.io import read_image

    m = make_affine((2.0, 2.0, 2.0), (20, 40, 40))
    ct, _ = phantom((20, 40, 40), m)
    image = sitk.Cast(image_from_array(ct, m), sitk.sitkFloat64)
    raw, gz, mha = tmp_path / "ct.nrrd", tmp_path / "ct.nii.gz", tmp_path / "ct.mha"
    sitk.WriteImage(image, str(raw), False)
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(LiverSegError, match="truncated"):
        read_image(raw)
    sitk.WriteImage(image, str(gz), True)
    data = bytearray(gz.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    gz.write_bytes(bytes(data))
    with pytest.raises(LiverSegError, match="corrupt compressed data"):
        read_image(gz)
    sitk.WriteImage(image, str(mha), True)
    mha.write_bytes(mha.read_bytes()[:-500])
    with pytest.raises(LiverSegError, match="truncated|corrupt"):
        read_image(mha)


@pytest.mark.process
def test_a_float64_ct_is_never_held_whole_in_memory(tmp_path):
    """The chunked reader holds the int16 result (and its copy into ITK), never the float64 buffer: its
    peak stays under the file's size, where ITK's read-and-cast needs 1.5 times it."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    m = make_affine((1.0, 1.0, 1.0), (1000, 256, 256))
    ct = np.full((1000, 256, 256), -1000.0)
    ct[100:900, 60:200, 60:200] = 40.0
    path = tmp_path / "ct_float64.nii"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    del ct
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import SimpleITK as sitk
        from LiverSegExtension.io import read_image
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
        before = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        image = read_image({str(path)!r})
        print(status("VmHWM:") - before, sitk.GetPixelIDValueAsString(image.GetPixelID()))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    added, kind = r.stdout.split(maxsplit=1)
    assert kind.strip() == "16-bit signed integer"
    size = path.stat().st_size
    assert int(added) < size, f"reading took {int(added) / 2**20:.0f} MB for a {size / 2**20:.0f} MB file"


@pytest.mark.process
def test_a_symlink_loop_gives_each_series_once_and_an_mr_label_is_named(tmp_path, tiny_model_dir):
    """A link back up and a second link to one series: each series and file is one case, under its real
    name; a series labelled MR whose values look like CT is segmented with a warning, not silently."""
    from synthetic import write_dicom_series

    from LiverSegExtension.io import expand_inputs

    m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
    ct, _ = phantom((30, 48, 56), m)
    data = tmp_path / "data"
    write_dicom_series(data / "series", ct, m, modality="MR")
    (data / "series" / "up").symlink_to("..")
    (data / "again").symlink_to("series")
    sitk.WriteImage(image_from_array(ct, m), str(data / "ct.nrrd"))
    (data / "same.nrrd").symlink_to("ct.nrrd")
    cases = expand_inputs([data])
    assert sorted(c.label for c in cases) == sorted([str(data / "ct.nrrd"), str(data / "series")])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "LiverSegExtension.cli", "segment", str(data), "-o", str(out),
                        "--model", str(tiny_model_dir), "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    import csv

    with open(out / "summary.csv", newline="") as f:
        rows = {row["input"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(c.label for c in cases)
    mr = "the series' Modality is MR, not CT"
    assert mr in rows[str(data / "series")]["warning"] and rows[str(data / "series")]["status"] == "warning"
    assert mr not in rows[str(data / "ct.nrrd")]["warning"]
    assert f"liverseg: warning: {data / 'series'}: {mr}" in r.stderr


def test_collinear_directions_and_an_odd_slice_are_named_not_itks_last_line(tmp_path):
    """ITK says only "0 0 1" (its matrix's last row) and "Size: [32, 32, 1]": name the axes and the file."""
    from synthetic import write_dicom_series

    from LiverSegExtension.io import check_series_layout, expand_inputs, read_case, read_image

    m = make_affine((3.0, 3.0, 2.5), (12, 64, 64))
    ct, _ = phantom((12, 64, 64), m)
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    header, data = path.read_bytes().split(b"\n\n", 1)
    lines = [b"space directions: (3,0,0) (6,0,0) (0,0,2.5)" if ln.startswith(b"space directions") else ln
             for ln in header.splitlines()]
    path.write_bytes(b"\n".join(lines) + b"\n\n" + data)
    with pytest.raises(LiverSegError, match=r"ct\.nrrd: the header's directions for axes i and j are the same line"):
        read_image(path)

    import pydicom

    files = write_dicom_series(tmp_path / "series", ct, m)
    small = write_dicom_series(tmp_path / "small", ct[:, ::2, ::2], m)
    odd, big = pydicom.dcmread(small[5]), pydicom.dcmread(files[5])
    big.Rows, big.Columns, big.PixelData = odd.Rows, odd.Columns, odd.PixelData  # a localizer-sized slice
    big.save_as(files[5])
    [case] = expand_inputs([tmp_path / "series"])
    says = r"slice slice0005\.dcm is 32x32 pixels, the others 64x64"
    with pytest.raises(LiverSegError, match=says):
        read_case(case)  # the CLI's reader
    with pytest.raises(LiverSegError, match=says):
        check_series_layout(case)  # the batch's header check before Slicer reads the series
