"""The mask of a known blob lands on the input grid and in the same RAS place, whatever the grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import LIVER_CENTER_RAS, LIVER_RADII, make_affine, phantom, ras_grid, rotation

from LiverSegExtension.data.metrics import dice
from LiverSegExtension.geometry import Grid, ijk_to_ras_of, image_from_array, resample_to_grid
from LiverSegExtension.inference.postprocess import spine_warning
from LiverSegExtension.io import read_image, write_mask

GRIDS = {
    "axial_identity": dict(spacing=(3.0, 3.0, 3.0), rot=None, left_handed=False),
    "anisotropic": dict(spacing=(0.9, 1.3, 5.0), rot=None, left_handed=False),
    "oblique": dict(spacing=(2.5, 2.5, 3.5), rot=rotation(0.35, -0.25, 0.5), left_handed=False),
    "left_handed_oblique_anisotropic": dict(spacing=(1.6, 2.2, 4.5), rot=rotation(-0.3, 0.2, 0.15), left_handed=True),
}


def centroid_ras(mask: np.ndarray, m: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask).mean(axis=0)
    return (m @ np.array([*kji[::-1], 1.0]))[:3]


def shape_for(spacing) -> tuple[int, int, int]:
    # ~330 x 260 x 220 mm field of view whatever the spacing
    return tuple(int(np.ceil(e / s)) for e, s in zip((220.0, 260.0, 330.0), spacing[::-1]))


@pytest.mark.parametrize("name", GRIDS)
def test_mask_lands_on_input_grid_in_ras(name, threshold_segmenter):
    g = GRIDS[name]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, truth = phantom(shape, m)
    result = threshold_segmenter.segment_array(ct, m)
    assert result.mask.shape == ct.shape and result.mask.dtype == np.uint8
    assert dice(result.mask, truth) > 0.96, name
    assert np.linalg.norm(centroid_ras(result.mask, m) - LIVER_CENTER_RAS) < 1.0
    expected_ml = truth.sum() * np.prod(g["spacing"]) / 1000
    assert result.liver_ml == pytest.approx(expected_ml, rel=0.05)


def test_ijk_to_ras_round_trip_through_sitk():
    m = make_affine((1.6, 2.2, 4.5), (10, 12, 14), rotation(-0.3, 0.2, 0.15), left_handed=True)
    image = image_from_array(np.zeros((10, 12, 14), np.int16), m)
    np.testing.assert_allclose(ijk_to_ras_of(image), m, atol=1e-9)
    assert np.linalg.det(m[:3, :3]) < 0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_written_mask_keeps_input_geometry(tmp_path, suffix, threshold_segmenter):
    """Through files: read an oblique left-handed CT, segment, write, read back: same grid, same place."""
    g = GRIDS["left_handed_oblique_anisotropic"]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, truth = phantom(shape, m)
    src = tmp_path / "ct.nrrd"
    sitk.WriteImage(image_from_array(ct, m), str(src))
    image = read_image(src)
    result = threshold_segmenter.segment_image(image)
    out = tmp_path / f"mask{suffix}"
    write_mask(result.mask, image, out)
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(ijk_to_ras_of(back), ijk_to_ras_of(image), atol=1e-4)
    back_mask = sitk.GetArrayFromImage(back)
    # The same voxels in RAS: compare through physical positions, not array order alone.
    ras_truth = ras_grid(shape, m)[truth > 0].mean(axis=0)
    ras_back = ras_grid(back.GetSize()[::-1], ijk_to_ras_of(back))[back_mask > 0].mean(axis=0)
    assert np.linalg.norm(ras_back - ras_truth) < 1.0
    assert dice(back_mask, truth) > 0.96


def test_grid_covering_is_centred_and_spans_the_box():
    grid = Grid.covering(np.array([0.0, 0.0, 0.0]), np.array([10.0, 7.0, 3.0]), 2.0)
    assert grid.size == (6, 5, 3)
    last = grid.index_to_physical(np.array(grid.size) - 1)
    np.testing.assert_allclose((np.array(grid.origin) + last) / 2, [5.0, 3.5, 1.5])
    assert np.all(np.array(grid.origin) <= 0) and np.all(last >= [10.0, 7.0, 3.0])


@pytest.mark.parametrize("spacing", [(0.57, 0.57, 2.0), (0.3, 0.3, 0.3)])
def test_resampling_reads_the_scan_out_to_its_edge_not_air(spacing):
    """A grid covering a small scan's voxel centres reaches past them (and past what BinShrink keeps): those
    points lie inside the scanned body and must read its tissue, not the default air (-1024); only points
    more than a voxel outside the scan do."""
    size = [int(round(40 / s)) + 1 for s in spacing]  # 40 mm plus a remainder BinShrink drops
    image = sitk.Image(size, sitk.sitkInt16) + 40
    image.SetSpacing(spacing)
    corners = np.array(image.TransformIndexToPhysicalPoint([n - 1 for n in size]))
    grid = Grid.covering(np.zeros(3), corners, 2.5)
    assert np.any(grid.index_to_physical(np.array(grid.size) - 1) > corners)  # the grid reaches past the centres
    hu = sitk.GetArrayFromImage(resample_to_grid(image, grid, pixel_type=sitk.sitkFloat32))
    np.testing.assert_allclose(hu, 40.0)
    outside = Grid(tuple(float(v) for v in corners + 10.0), (2.5, 2.5, 2.5), (2, 2, 2))
    assert np.all(sitk.GetArrayFromImage(resample_to_grid(image, outside, pixel_type=sitk.sitkFloat32)) == -1024)


@pytest.mark.parametrize("name", ["axial_identity", "left_handed_oblique_anisotropic"])
def test_network_sees_the_liver_on_the_patients_right(name, tiny_model_dir):
    """The model grid is LPS-aligned (x index grows towards the patient's left), so the liver must sit
    at low x indices whatever the input's orientation. A mirrored conversion would show it the other way."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    seen = {}

    class Spy(LiverSegmenter):
        def predict(self, stage, volume):
            seen[stage] = np.asarray(volume).copy()
            return (np.asarray(volume) > 95).astype(np.float32)

    g = GRIDS[name]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, _ = phantom(shape, m)
    Spy(tiny_model_dir, device="cpu").segment_array(ct, m)
    coarse = seen["coarse"]
    liver_x = np.argwhere(coarse > 95)[:, 2].mean()
    body_x = np.argwhere(coarse > 0)[:, 2].mean()
    assert liver_x < body_x - 5


def test_fine_box_grows_when_the_coarse_stage_cuts_the_liver(tiny_model_dir):
    """The coarse stage sees only the top of the liver: the fine box must grow to catch the rest."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    class HalfBlindCoarse(LiverSegmenter):
        def predict(self, stage, volume):
            found = (np.asarray(volume) > 95).astype(np.float32)
            if stage == "coarse":
                rows = np.argwhere(found)[:, 0]
                found[: int(np.percentile(rows, 85)) if rows.size else 0] = 0  # keep only the top 15 % (z is axis 0)
            return found

    ct, truth, m, _ = oblique_phantom()
    result = HalfBlindCoarse(tiny_model_dir, device="cpu").segment_array(ct, m)
    assert dice(result.mask, truth) > 0.96


def oblique_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(CT, liver, ijk-to-RAS matrix, RAS of every voxel) of the phantom on the oblique grid."""
    g = GRIDS["oblique"]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, liver = phantom(shape, m)
    return ct, liver, m, ras_grid(shape, m)


def test_fine_box_never_grows_towards_the_head(tiny_model_dir):
    """A thick leak from the liver's dome into the heart reaches the top of the fine box. Growing the box
    there only let the fine net paint more heart (CORT: 100 mL became 270 mL on some checkpoints), and no
    labelled scan needs it (the coarse stage finds the dome), so the box grows every way but up."""
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    class LeakyFine(LiverSegmenter):
        def predict(self, stage, volume):  # the coarse stage sees the liver only; the fine one the heart too
            return (np.asarray(volume) > (140 if stage == "coarse" else 95)).astype(np.float32)

    ct, liver, m, ras = oblique_phantom()
    top = LIVER_CENTER_RAS[2] + LIVER_RADII[2]
    heart = (np.linalg.norm(ras[..., :2] - LIVER_CENTER_RAS[:2], axis=-1) <= 25) & (ras[..., 2] > top - 15)
    ct[heart & ~liver.astype(bool)] = 120
    assert ras[heart, 2].max() > top + 26 + 40  # the heart reaches beyond the box and any growth of it

    mask = LeakyFine(tiny_model_dir, device="cpu").segment_array(ct, m).mask.astype(bool)
    assert mask[liver.astype(bool)].mean() > 0.98
    # The box's top: the coarse liver's top plus the fine margin (20 mm) and a coarse voxel (6 mm).
    assert ras[mask, 2].max() < top + 26 + 6


def _rod(ras: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment a-b (RAS)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((ras - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(ras - (a + t[..., None] * (b - a)), axis=-1) <= radius


def test_leak_through_a_thin_neck_is_cut_off_and_thin_liver_kept(threshold_segmenter):
    """A liver-bright blob joined to the liver by a 7 mm neck (a leak into the heart, say) is dropped,
    while a 7 mm thin tip of the liver itself, as thin but free-ended, is kept."""
    from LiverSegExtension.inference.postprocess import largest_component

    ct, liver, m, ras = oblique_phantom()
    c = LIVER_CENTER_RAS
    blob = np.linalg.norm(ras - (c + [-105, 0, 0]), axis=-1) <= 25
    neck = _rod(ras, c + [-80, 0, 0], c + [-50, 0, 0], 3.5) & ~blob
    tip = _rod(ras, c + [0, 40, 0], c + [0, 68, 0], 3.5) & ~liver.astype(bool)
    ct[blob | neck | tip] = 160
    # The neck really joins the blob to the liver: the largest component alone would keep the leak.
    assert largest_component(ct > 95)[blob].all()

    mask = threshold_segmenter.segment_array(ct, m).mask.astype(bool)
    assert mask[blob].mean() < 0.01
    assert mask[tip].mean() > 0.8
    assert dice(mask, liver.astype(bool) | tip) > 0.96


def test_liver_cut_in_two_by_a_band_of_slices_keeps_both_parts_and_drops_an_organ_beside_it(threshold_segmenter):
    """Metal streaks across a few slices can leave nothing marked there: the liver falls into an upper and a
    lower part. Both parts stay (the largest alone would lose a third of the liver); a liver-bright organ
    beside the liver, on the same slices (a spleen), is still dropped."""
    ct, liver, m, ras = oblique_phantom()
    c = LIVER_CENTER_RAS
    band = np.abs(ras[..., 2] - (c[2] - 5)) <= 7.5  # 15 mm of slices, below the liver's middle
    ct[band & liver.astype(bool)] = 30
    spleen = np.linalg.norm(ras - (c + [-150, 0, 0]), axis=-1) <= 30
    ct[spleen] = 160
    expected = liver.astype(bool) & ~band
    lower = expected & (ras[..., 2] < c[2] - 5)
    assert 0.1 < lower.sum() / expected.sum() < 0.5  # the part that the largest component alone would lose

    mask = threshold_segmenter.segment_array(ct, m).mask.astype(bool)
    assert mask[lower].mean() > 0.95
    assert mask[spleen].mean() < 0.01
    assert dice(mask, expected) > 0.96


def test_liver_on_the_patients_left_is_warned_about(threshold_segmenter):
    """The same voxels under a header that swaps left and right put the liver on the patient's left:
    the mask follows the header (so it is wrong without any other sign), and a warning says so."""
    g = GRIDS["anisotropic"]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, liver = phantom(shape, m)
    right = threshold_segmenter.segment_array(ct, m)
    assert right.warnings == [] and dice(right.mask, liver) > 0.96
    swapped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ m  # RAS x negated: the liver now lies on the left
    left = threshold_segmenter.segment_image(image_from_array(ct, swapped), source="scan.nrrd")
    assert dice(left.mask, liver) > 0.96  # the same voxels: nothing else betrays the swap
    [warning] = left.warnings
    assert warning.startswith("scan.nrrd: the liver found lies on the patient's left") and "orientation" in warning


def with_spine(ct: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The phantom with a spine: a bone column (400 HU, radius 12 mm) through every slice, behind the liver
    and on its left (RAS x 10, y -50; the liver's centre lies at x 70, y 10)."""
    ras = ras_grid(ct.shape, m)
    out = ct.copy()
    out[(ras[..., 0] - 10.0) ** 2 + (ras[..., 1] + 50.0) ** 2 <= 12.0**2] = 400
    return out


def test_a_header_that_turns_or_mirrors_the_anatomy_is_warned_about_by_the_spine(threshold_segmenter):
    """The spine lies behind the liver and on its left. A header that turns the image 180 degrees in-plane,
    or mirrors front and back, puts it in front of the liver found; on a crop around the liver, whose side
    no body can tell, one that swaps left and right puts the liver on the spine's left. The mask follows
    the header each time (the same voxels), so the warning is the only sign."""
    g = GRIDS["left_handed_oblique_anisotropic"]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, liver = phantom(shape, m)
    ct = with_spine(ct, m)
    right = threshold_segmenter.segment_array(ct, m)
    assert right.warnings == [] and dice(right.mask, liver) > 0.96
    for flip in ([-1.0, -1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0]):  # turned 180 degrees; front and back mirrored
        wrong = threshold_segmenter.segment_image(image_from_array(ct, np.diag(flip) @ m), source="scan.nrrd")
        assert dice(wrong.mask, liver) > 0.96
        [warning] = wrong.warnings
        assert warning.startswith("scan.nrrd: the spine lies in front of the liver found (") and "orientation" in warning
    # A 140 mm wide crop around the liver (and the spine's edge): no body to judge the side by.
    crop_m = make_affine((2.0, 2.0, 2.0), (60, 100, 70))
    crop_m[0, 3] += 70.0
    crop, crop_liver = phantom((60, 100, 70), crop_m)
    crop = with_spine(crop, crop_m)
    assert threshold_segmenter.segment_array(crop, crop_m).warnings == []
    swapped = threshold_segmenter.segment_array(crop, np.diag([-1.0, 1.0, 1.0, 1.0]) @ crop_m)
    assert dice(swapped.mask, crop_liver) > 0.96
    [warning] = swapped.warnings
    assert warning.startswith("input: the liver found lies on the patient's left of the spine (")
    # Without the spine nothing is judged on a crop: the check needs bone that runs through the slices.
    bare = phantom((60, 100, 70), crop_m)[0]
    assert threshold_segmenter.segment_array(bare, np.diag([-1.0, 1.0, 1.0, 1.0]) @ crop_m).warnings == []


def test_spine_check_measures_each_axis_in_its_own_spacing():
    """On an anisotropic grid (x 1 mm, y 3 mm), 10 voxels front to back are 30 mm: beyond the 20 mm limit."""
    volume = np.full((20, 40, 60), 30.0, dtype=np.float32)
    liver = np.zeros(volume.shape, dtype=bool)
    liver[:, 5:15, 5:35] = True  # centre: y 9.5, x 19.5
    volume[:, 18:22, 18:30] = 400.0  # the spine: y 19.5, x 23.5, behind the liver and on its left
    assert spine_warning(volume, liver, (1.0, 3.0, 2.0), "s") is None
    turned = spine_warning(volume[:, ::-1], liver[:, ::-1], (1.0, 3.0, 2.0), "s")  # front-back mirrored
    assert turned == ("s: the spine lies in front of the liver found (30 mm); check the image's orientation "
                      "(front and back swapped, or the image turned?)")
    mirrored = spine_warning(volume[:, :, ::-1], liver[:, :, ::-1], (4.0, 3.0, 2.0), "s")  # x 4 mm
    assert mirrored is not None and "left of the spine (16 mm)" in mirrored  # 4 voxels of 4 mm


def test_a_scan_with_part_of_the_liver_or_none_is_warned_about(threshold_segmenter, monkeypatch):
    """Less than a whole liver (a scan of the chest or pelvis, or one cut through the liver) is still
    segmented but comes with a warning; a header that misstates the anatomy is said first, also on a small
    mask (a turned header often makes the mask small); no liver is said too."""
    g = GRIDS["anisotropic"]
    shape = shape_for(g["spacing"])
    m = make_affine(g["spacing"], shape, g["rot"], g["left_handed"])
    ct, liver = phantom(shape, m)
    voxel_ml = float(np.prod(g["spacing"])) / 1000
    k = int(np.searchsorted(np.cumsum(liver.sum(axis=(1, 2))) * voxel_ml, 60.0))  # the liver's lowest slices
    cut = threshold_segmenter.segment_array(ct[:k].copy(), m)
    assert 20 < liver[:k].sum() * voxel_ml < 60 and dice(cut.mask, liver[:k]) > 0.9
    [warning] = cut.warnings
    assert warning.startswith(f"input: only {cut.liver_ml:.0f} mL found, less than an adult's whole liver")
    # the same cut under a header that swaps left and right: "swapped?" first, then the size
    swapped = image_from_array(ct[:k].copy(), np.diag([-1.0, 1, 1, 1]) @ m)
    orientation, size = threshold_segmenter.segment_image(swapped).warnings
    assert "patient's left" in orientation and "swapped?" in orientation and size == warning
    none = ct.copy()
    none[liver > 0] = ct[liver == 0].max()  # body only
    empty = threshold_segmenter.segment_image(image_from_array(none, m), source="pelvis.nrrd")
    assert empty.liver_ml == 0 and not empty.mask.any() and empty.warnings == ["pelvis.nrrd: no liver found"]
