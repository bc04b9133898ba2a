"""LiverSegBatch.py run as a subprocess with plain Python and slicer-core (no stand-ins): real readers,
real writers, summary, exit code, --skip-existing and --shard."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, SHARED
from synthetic import make_affine, phantom, rotation, write_dicom_series

from LiverSegExtension.geometry import ijk_to_ras_of, image_from_array, same_grid

pytestmark = pytest.mark.slow  # trains models, or runs processes

pytest.importorskip("slicer")
BATCH = ROOT / "LiverSegModule" / "Scripts" / "LiverSegBatch.py"


def run_batch(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # plain Python: no test stand-ins
    return subprocess.run([sys.executable, str(BATCH), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Synthetic NIfTI and DICOM (oblique, left-handed), real ones from ../shared/data when present, a bad file."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    shape, spacing = (36, 64, 72), (4.0, 4.5, 6.0)
    m = make_affine(spacing, shape, rotation(0.2, -0.15, 0.1), left_handed=True)
    ct, _ = phantom(shape, m)
    sitk.WriteImage(image_from_array(ct, m), str(folder / "synthetic.nii.gz"))
    write_dicom_series(folder / "synthetic_dicom", ct, m)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti at all")
    paths = [folder / "synthetic.nii.gz", folder / "synthetic_dicom", folder / "broken.nii.gz"]
    real_nifti = SHARED / "liver-train" / "imagesTr" / "ts_a.nii.gz"
    real_dicom = SHARED / "dicom" / "chaos_ct3"
    if real_nifti.is_file() and real_dicom.is_dir():
        paths += [real_nifti, real_dicom]
    return paths


def reference_image(path):
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def test_batch_outputs_summary_resume_and_shards(inputs, tiny_model_dir, tmp_path):
    import slicerio
    from conftest import bundled_model

    # The trained model when it is there (non-empty masks make the RAS comparison bite), else the tiny one.
    trained = bundled_model() is not None
    model = [] if trained else ["--model", tiny_model_dir]
    out = tmp_path / "out"
    r = run_batch("--", "--input", *inputs, "--output-dir", out, "--labelmap", *model, "--device", "cpu")
    assert r.returncode == 1, r.stdout + r.stderr  # because of broken.nii.gz
    rows = {row["input"]: row for row in rows_of(out / "summary.csv")}
    assert len(rows) == len(inputs)
    assert list(rows_of(out / "summary.csv")[0]) == ["input", "output", "status", "liver_ml", "uncertainty", "seconds",
                                                     "error", "warning", "runtime", "input_path", "model"]
    bad = rows[str(inputs[2])]
    assert bad["status"] == "failed" and bad["error"].startswith(str(inputs[2])) and "Traceback" not in r.stdout + r.stderr
    assert f"[3/{len(inputs)}] failed" in r.stdout
    for src in inputs[:2] + inputs[3:]:
        row = rows[str(src)]
        assert row["status"] in ("ok", "warning") and (row["status"] == "warning") == bool(row["warning"]), row
        ref = reference_image(src)
        seg = slicerio.read_segmentation(row["output"])
        [segment] = seg["segments"]
        assert segment["name"] == "Liver"
        assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert segment["terminology"]["type"] == ["SCT", "10200004", "Liver"]
        assert row["output"].endswith("_liver.seg.nrrd")  # the CLI's naming rule
        labelmap = sitk.ReadImage(row["output"].replace(".seg.nrrd", ".nii.gz"))
        # Slicer loads a left-handed volume with K reversed; the labelmap is written on the file's own grid.
        assert same_grid(labelmap, ref) and labelmap.GetPixelID() == sitk.sitkUInt8
        seg_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"], dtype=float)
        seg_size = seg["voxels"].shape[:3]
        assert corner_points(seg_ras, seg_size) == corner_points(ijk_to_ras_of(ref), ref.GetSize())
        # The labelmap and the segmentation hold the same voxels, in RAS.
        lab = sitk.GetArrayFromImage(labelmap)
        assert lab.any() or not trained, f"{src}: empty liver with the trained model"
        seg_kji = seg["voxels"].transpose(2, 1, 0)  # slicerio gives [i, j, k]
        assert centroid(lab, ijk_to_ras_of(labelmap)) == pytest.approx(centroid(seg_kji, seg_ras), abs=0.01)

    # Resume: nothing is redone, the failed case is tried again (and fails again).
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".nrrd", ".gz")}
    first = rows_of(out / "summary.csv")
    r2 = run_batch("--input", *inputs, "--output-dir", out, "--labelmap", "--skip-existing", *model)
    assert r2.returncode == 1
    assert r2.stdout.count("] skipped ") == len(inputs) - 1 and r2.stdout.count("] failed ") == 1
    # the summary keeps the rows that say how each output was made (the failed case's row is the new one)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows_of(out / "summary.csv")] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in first]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".nrrd", ".gz")}
    assert after == before

    # A missing labelmap is made from the .seg.nrrd that is there (perhaps corrected by hand), which is kept.
    lab0 = out / "synthetic_liver.nii.gz"
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(lab0)))
    lab0.unlink()
    r3 = run_batch("--input", inputs[0], "--output-dir", out, "--labelmap", "--skip-existing", *model)
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert (out / "synthetic_liver.seg.nrrd").stat().st_mtime_ns == before["synthetic_liver.seg.nrrd"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(lab0))), expected)
    assert float(rows_of(out / "summary.csv")[0]["liver_ml"]) == pytest.approx(float(rows[str(inputs[0])]["liver_ml"]), rel=0.01)
    # The other way round: a missing .seg.nrrd is made again, the labelmap that is there is left alone.
    (out / "synthetic_liver.seg.nrrd").unlink()
    lab_mtime = lab0.stat().st_mtime_ns
    r4 = run_batch("--input", inputs[0], "--output-dir", out, "--labelmap", "--skip-existing", *model)
    assert r4.returncode == 0, r4.stdout + r4.stderr
    assert (out / "synthetic_liver.seg.nrrd").is_file() and lab0.stat().st_mtime_ns == lab_mtime

    # Two shards cover every case exactly once.
    shard_out = tmp_path / "shards"
    done, codes = [], []
    for shard in ("1/2", "2/2"):
        rs = run_batch("--input", *inputs, "--output-dir", shard_out, "--shard", shard, "--model", tiny_model_dir)
        codes.append(rs.returncode)
        done += [row["input"] for row in rows_of(shard_out / f"summary_shard{shard[0]}of2.csv")]
    assert sorted(done) == sorted(map(str, inputs))
    assert sorted(codes) == [0, 1]  # the bad file fails its own shard alone


def corner_points(ijk_to_ras, size):
    """The RAS positions of a grid's 8 corner voxels, as a set (independent of axis direction)."""
    corners = [(i, j, k, 1) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return {tuple(np.round((ijk_to_ras @ c)[:3], 2)) for c in corners}


def centroid(mask_kji, ijk_to_ras):
    kji = np.argwhere(mask_kji > 0).mean(axis=0) if mask_kji.any() else np.zeros(3)
    return (ijk_to_ras @ [*kji[::-1], 1.0])[:3]


def test_batch_usage_errors(tmp_path):
    assert run_batch("--output-dir", tmp_path).returncode == 2
    r = run_batch("--input", "x", "--output-dir", tmp_path, "--shard", "3/2")
    assert r.returncode == 2 and "1 <= I <= N" in r.stderr
    r = run_batch("--input", "x", "--output-dir", tmp_path, "--model", tmp_path / "nope")
    assert r.returncode == 2 and "model folder not found" in r.stderr


def test_batch_refuses_a_broken_series_names_an_mr_label_and_stops_cleanly_on_ctrl_c(tmp_path, tiny_model_dir):
    """The batch checks slice layout and modality as the CLI does; Ctrl-C (a real SIGINT) exits 130 with one
    line, keeps the finished cases' rows, leaves no temporary behind, and a rerun goes on from there."""
    import shutil
    import signal

    m = make_affine((4.0, 4.5, 6.0), (30, 48, 56))
    ct, _ = phantom((30, 48, 56), m)
    files = write_dicom_series(tmp_path / "duplicated", ct, m)
    shutil.copy(files[10], files[10].with_name("copy_of_slice10.dcm"))
    write_dicom_series(tmp_path / "labelled_mr", ct, m, modality="MR")
    collinear = tmp_path / "collinear.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(collinear))
    header, data = collinear.read_bytes().split(b"\n\n", 1)
    header = b"\n".join(b"space directions: (4,0,0) (0,0,4.5) (0,0,6)" if ln.startswith(b"space directions") else ln
                        for ln in header.splitlines())
    collinear.write_bytes(header + b"\n\n" + data)
    out = tmp_path / "out"
    r = run_batch("--input", tmp_path / "duplicated", tmp_path / "labelled_mr", collinear, "--output-dir", out,
                  "--model", tiny_model_dir, "--device", "cpu")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    rows = {row["input"]: row for row in rows_of(out / "summary.csv")}
    assert rows[str(tmp_path / "duplicated")]["status"] == "failed"
    assert "two slices at the same position" in rows[str(tmp_path / "duplicated")]["error"]
    mr = rows[str(tmp_path / "labelled_mr")]
    assert mr["status"] == "warning" and "the series' Modality is MR, not CT" in mr["warning"], mr
    assert "axes j and k are the same line" in rows[str(collinear)]["error"]  # not ITK's "0 0 1"

    cases = []
    for n in range(5):
        cases.append(tmp_path / f"ct{n}.nrrd")
        sitk.WriteImage(image_from_array(ct + n, m), str(cases[-1]))
    out = tmp_path / "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    batch_args = ["--input", *map(str, cases), "--output-dir", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    args = [sys.executable, str(BATCH), *batch_args]
    # The interrupt comes at a point the test chooses, whatever the machine's speed: the second case's mask is
    # held while its temporary exists (os.link puts it in place) until Ctrl-C arrives.
    # A job started in the background by a shell inherits SIGINT ignored, and Python then installs no handler of its
    # own: the batch is given the one a terminal's Ctrl-C meets, whoever runs the tests.
    hold = ("import os, runpy, signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "link = os.link\n"
            "def held(src, dst, *a, **k):\n"
            "    if os.path.basename(dst).startswith('ct1_liver'):\n"
            "        print('HELD', flush=True); time.sleep(600)\n"
            "    return link(src, dst, *a, **k)\n"
            "os.link = held\n"
            f"sys.argv = [{str(BATCH)!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({str(BATCH)!r}, run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, *batch_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    first = proc.stdout.readline()
    assert first.startswith("[1/5] ok"), first + proc.stderr.read()
    assert proc.stdout.readline().strip() == "HELD"
    assert any(p.name.startswith(".ct1_liver") for p in out.iterdir())  # interrupted while writing
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "LiverSegBatch: interrupted" and "Traceback" not in stderr, stderr
    assert "terminate called" not in stderr
    done = rows_of(out / "summary.csv")
    assert len(done) == 1 and done[0]["status"] == "ok", done
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary, no lock left
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    statuses = {row["input"]: row["status"] for row in rows_of(out / "summary.csv")}
    assert sorted(statuses) == sorted(map(str, cases)) and set(statuses.values()) == {"ok"}, statuses
    assert r.stdout.count(" skipped ") == len(done)  # the finished cases are not redone; their rows stay
