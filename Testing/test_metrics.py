"""Metrics on masks with known answers, in physical units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LiverSegExtension.data.metrics import case_metrics, dice, surface_dice, surface_metrics


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_dice_known_values():
    a = cube((10, 10, 10), (0, 0, 0), (4, 10, 10))
    b = cube((10, 10, 10), (2, 0, 0), (6, 10, 10))
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_shifted_cube_distances_are_in_mm():
    """A cube shifted by 2 voxels along z (3 mm spacing): faces perpendicular to z are 6 mm apart."""
    ref = cube((30, 30, 30), (5, 5, 5), (20, 20, 20))
    pred = cube((30, 30, 30), (7, 5, 5), (22, 20, 20))
    hd95, msd = surface_metrics(pred, ref, (3.0, 1.0, 1.0))
    assert hd95 == pytest.approx(6.0)
    assert 0 < msd < 6.0
    same_hd, same_msd = surface_metrics(ref, ref, (3.0, 1.0, 1.0))
    assert same_hd == 0.0 and same_msd == 0.0


def test_surface_dice_of_shifted_cube():
    """A 15^3 cube shifted by one 3 mm voxel along z (1 mm in-plane): NSD@2mm counts out, on each mask, the
    face that moved away (3 mm from the other surface) and the part of the other face, now inside the other
    cube, that lies more than 2 mm in-plane from its walls; at 3 mm every surface voxel is in."""
    ref = cube((30, 30, 30), (5, 5, 5), (20, 20, 20))
    pred = cube((30, 30, 30), (6, 5, 5), (21, 20, 20))
    spacing = (3.0, 1.0, 1.0)
    # Surface voxels of a 15^3 cube: 15^3 - 13^3 = 1178; a z face is 15 x 15 = 225 of them, and the voxels of
    # a face more than 2 mm from its rim are 9 x 9 = 81 (the walls, 0 mm apart, are all in).
    out = 2 * (225 + 81)
    assert surface_dice(pred, ref, spacing) == pytest.approx(1 - out / (2 * 1178))
    assert surface_dice(pred, ref, spacing, tolerance_mm=3.0) == 1.0
    assert surface_dice(ref, ref, spacing) == 1.0
    assert case_metrics(pred, ref, spacing)["nsd_2mm"] == pytest.approx(surface_dice(pred, ref, spacing))


def test_surface_dice_in_mm_not_voxels():
    """The same one-voxel shift along an axis of 1.5 mm voxels stays within 2 mm: NSD 1.0; Dice is not 1."""
    ref = cube((30, 30, 30), (5, 5, 5), (20, 20, 20))
    pred = cube((30, 30, 30), (6, 5, 5), (21, 20, 20))
    assert surface_dice(pred, ref, (1.5, 1.0, 1.0)) == 1.0
    assert dice(pred, ref) < 1.0


def test_surface_dice_empty_masks():
    ref = cube((10, 10, 10), (2, 2, 2), (8, 8, 8))
    empty = np.zeros_like(ref)
    assert surface_dice(empty, empty, (1.0, 1.0, 1.0)) == 1.0
    assert surface_dice(empty, ref, (1.0, 1.0, 1.0)) == 0.0
    assert case_metrics(ref, empty, (1.0, 1.0, 1.0))["nsd_2mm"] == 0.0


def test_surface_dice_agrees_with_monai():
    """Irregular blobs, anisotropic voxels: the same figure as MONAI's compute_surface_dice (surface voxels)."""
    monai_metrics = pytest.importorskip("monai.metrics")
    torch = pytest.importorskip("torch")
    from scipy import ndimage

    a = ndimage.binary_dilation(np.random.default_rng(0).random((40, 50, 45)) > 0.995, iterations=4)
    b = ndimage.shift(a.astype(float), (1, 2, 0), order=0) > 0.5
    spacing = (2.0, 1.5, 1.0)
    theirs = monai_metrics.compute_surface_dice(torch.tensor(a[None, None]), torch.tensor(b[None, None]),
                                                class_thresholds=[2.0], spacing=spacing, include_background=True)
    ours = surface_dice(a, b, spacing)
    assert 0.5 < ours < 0.99 and ours == pytest.approx(float(theirs.item()), abs=1e-6)


def test_volume_error_and_empty_cases():
    ref = cube((10, 10, 10), (0, 0, 0), (5, 10, 10))  # 500 voxels of 2 mm^3 = 1 mL
    pred = cube((10, 10, 10), (0, 0, 0), (6, 10, 10))
    m = case_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert m["ref_ml"] == pytest.approx(1.0) and m["pred_ml"] == pytest.approx(1.2)
    assert m["volume_error_pct"] == pytest.approx(20.0)
    empty = case_metrics(np.zeros_like(ref), ref, (1.0, 1.0, 1.0))
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95_mm"])


def test_evaluate_folders_report(tmp_path):
    import SimpleITK as sitk

    from LiverSegExtension.data.evaluation import evaluate_folders, write_report

    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref = cube((20, 20, 20), (5, 5, 5), (15, 15, 15)).astype(np.uint8)
    for name, pred in {"a": ref, "b": np.zeros_like(ref)}.items():
        for folder, arr in (("ref", ref), ("pred", pred)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((1.5, 1.5, 2.0))
            sitk.WriteImage(img, str(tmp_path / folder / (f"{name}_liver.nii.gz" if folder == "pred" else f"{name}.nii.gz")))
    rows, missing = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert [r["case"] for r in rows] == ["a", "b"] and missing == []
    assert rows[0]["dice"] == 1.0 and rows[1]["note"] == "empty prediction"
    md = write_report(rows, tmp_path / "report.csv")
    assert "| a | 1.000 |" in md and (tmp_path / "report.md").is_file()
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("case,dice,nsd_2mm,hd95_mm")
