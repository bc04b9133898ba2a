"""Training augmentation: reconstructed-air artefacts, the field-of-view cut, contrast phases, metal, body
size, and patches of the right size from small or cropped scans."""

from __future__ import annotations

import numpy as np
import pytest

from LiverSegExtension.training.augment import RandAirArtefactd, RandFieldOfViewd, training_transforms


def blob_case(shape=(40, 50, 60), box=(slice(10, 30), slice(15, 35), slice(20, 45)), background=0.5, liver=0.8):
    image = np.full((1, *shape), background, dtype=np.float32)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[(0, *box)] = 1
    image[label > 0] = liver
    return {"image": image, "label": label}


def test_air_aliases_per_region_onto_water_or_one_wrap_higher():
    """Like the reconstructed IRCAD HU: each air region lands on water or, sometimes, bright (e19's lung)."""
    hu = np.full((1, 30, 40, 40), 40.0, dtype=np.float32)  # soft tissue
    hu[0, 2:12, 5:15, 5:15] = -850.0  # two separate "lungs"
    hu[0, 2:12, 25:35, 25:35] = -850.0
    t = RandAirArtefactd("image", "label", prob=1.0, bright=0.5)
    outcomes = set()
    for seed in range(40):
        t.set_random_state(seed)
        out = t({"image": hu, "label": np.zeros_like(hu, dtype=np.uint8)})
        if t._mode != "alias":
            continue
        img = out["image"]
        np.testing.assert_array_equal(img[hu > -200], hu[hu > -200])  # tissue untouched
        a, b = (float(np.median(img[0, 2:12, o:o + 10, o:o + 10])) for o in (5, 25))
        for m in (a, b):  # -850 HU wraps to -82 HU, or one wrap higher to 174 HU
            assert m == pytest.approx(-82, abs=10) or m == pytest.approx(174, abs=10)
        outcomes.add((a > 50, b > 50))
    assert (True, False) in outcomes and (False, True) in outcomes, "regions must wrap independently"


def test_field_of_view_keeps_a_box_around_the_liver_and_clears_the_rest():
    t = RandFieldOfViewd(["image", "label"], prob=1.0, cut=4, margin=6)
    case = blob_case()
    for seed in range(20):
        t.set_random_state(seed)
        out = t(case)
        kept = np.argwhere(out["image"][0] > 0)
        lo, hi = kept.min(axis=0), kept.max(axis=0) + 1
        inside = np.zeros(case["image"].shape[1:], dtype=bool)
        inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        # What is kept is exactly a box, everything outside it blanked in image and label alike.
        assert (out["image"][0] > 0).sum() == inside.sum()
        assert not out["label"][0][~inside].any()
        np.testing.assert_array_equal(out["label"][0][inside], case["label"][0][inside])
        # The box faces lie within [cut inside, margin outside] the liver's own box.
        assert np.all(lo >= np.maximum(0, np.array([10, 15, 20]) - 6)) and np.all(lo <= np.array([10, 15, 20]) + 4)
        assert np.all(hi <= np.array([30, 35, 45]) + 6) and np.all(hi >= np.array([30, 35, 45]) - 4)


def test_field_of_view_leaves_patches_without_liver_alone():
    t = RandFieldOfViewd(["image", "label"], prob=1.0)
    case = blob_case()
    case["label"][:] = 0
    out = t(case)
    np.testing.assert_array_equal(out["image"], case["image"])


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_patches_have_the_patch_size_even_from_scans_smaller_than_it(stage):
    """A crop around the liver (like lits_117_crop) is smaller than a patch: it is padded, never an error."""
    patch = [32, 32, 32]
    t = training_transforms(stage, (-200.0, 300.0), patch, 2.5)
    t.set_random_state(0)
    hu = np.where(blob_case((24, 28, 30))["label"] > 0, 100.0, -50.0).astype(np.float32)
    case = {"image": hu, "label": (hu > 0).astype(np.uint8)}
    seen_liver = 0
    for _ in range(12):
        out = t(case)
        out = out[0] if isinstance(out, list) else out
        assert tuple(out["image"].shape) == (1, *patch) and tuple(out["label"].shape) == (1, *patch)
        assert set(np.unique(np.asarray(out["label"]))) <= {0, 1}
        assert float(np.asarray(out["image"]).min()) >= -0.5  # windowed to [0, 1], then noise and shifts
        seen_liver += int(np.asarray(out["label"]).any())
    assert seen_liver > 0


PHASE_HU = np.array([-1000.0, -100.0, 0.0, 20.0, 110.0, 110.0, 200.0, 250.0, 300.0, 700.0, 1500.0], dtype=np.float32)
PHASE_LABEL = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0], dtype=np.uint8)


@pytest.mark.parametrize("phase", ["native", "arterial", "portal", "delayed"])
def test_contrast_phase_moves_liver_and_blood_to_the_phase_and_keeps_the_rest(phase):
    """Each phase puts the liver (110 HU here) and the blood pool (300 HU) at its own levels; air, fat, water
    and bone keep their values."""
    from LiverSegExtension.data.simulate import PHASES
    from LiverSegExtension.training.augment import RandContrastPhased

    (l_lo, l_hi), (b_lo, b_hi) = PHASES[phase]
    t = RandContrastPhased("image", "label", prob=1.0, phases={phase: 1.0})
    for seed in range(5):
        t.set_random_state(seed)
        out = t({"image": PHASE_HU.reshape(1, 1, 1, -1), "label": PHASE_LABEL.reshape(1, 1, 1, -1)})["image"].ravel()
        np.testing.assert_array_equal(out[[0, 1, 2, 3, 10]], PHASE_HU[[0, 1, 2, 3, 10]])
        assert l_lo <= out[4] <= l_hi and b_lo <= out[8] <= b_hi
        between = sorted((out[4], out[8]))  # what lies between liver and blood stays between their new levels
        assert between[0] - 30 <= out[6] <= between[1] + 30 and between[0] <= out[7] <= between[1] + 30


def test_native_phase_takes_the_contrast_away_and_arterial_keeps_the_liver_texture():
    """Native: the enhanced blood (300 HU) falls to the liver's level, where the heart looks like liver.
    Arterial: the liver barely enhanced, the blood brighter, and noise in the liver not amplified."""
    from LiverSegExtension.training.augment import RandContrastPhased

    rng = np.random.default_rng(0)
    liver = (110.0 + rng.normal(0, 10, 1000)).astype(np.float32)
    image = np.concatenate([liver, [300.0] * 10]).astype(np.float32).reshape(1, 1, 1, -1)
    label = np.concatenate([np.ones(1000), np.zeros(10)]).astype(np.uint8).reshape(1, 1, 1, -1)
    native = RandContrastPhased("image", "label", prob=1.0, phases={"native": 1.0})
    arterial = RandContrastPhased("image", "label", prob=1.0, phases={"arterial": 1.0})
    n = native({"image": image, "label": label})["image"].ravel()
    a = arterial({"image": image, "label": label})["image"].ravel()
    assert abs(n[-1] - np.median(n[:1000])) <= 55 and n[-1] <= 50
    assert a[-1] > np.median(a[:1000]) + 120
    assert np.std(a[:1000]) <= np.std(liver) * 1.05  # the map's slope near the liver is at most 1


def metal_case():
    """A liver at 110 HU in soft tissue at 40 HU."""
    return blob_case((40, 80, 80), (slice(10, 30), slice(20, 50), slice(15, 45)), 40.0, 110.0)


def test_metal_draws_cores_and_bright_and_dark_streaks_on_a_slab_of_slices_only():
    from LiverSegExtension.training.augment import RandMetalArtefactd

    case = metal_case()
    t = RandMetalArtefactd("image", "label", spacing=2.5, prob=1.0, slab_mm=(10.0, 10.0), strength_hu=(800.0, 800.0))
    for seed in range(4):
        t.set_random_state(seed)
        out = t(case)
        changed = np.nonzero(np.any(out["image"] != case["image"], axis=(0, 2, 3)))[0]
        assert len(changed) == 4 and np.ptp(changed) == 3  # 10 mm at 2.5 mm: 4 adjacent slices
        assert 10 <= changed.mean() < 30  # at the liver's height
        slab = out["image"][0, changed]
        assert (slab >= 3000).any()  # a metal core
        assert (slab > 40 + 300).mean() > 0.002 and (slab < 40 - 300).mean() > 0.002  # bright and dark streaks
        np.testing.assert_array_equal(out["label"], case["label"])  # the liver under the streaks is still liver


def test_metal_is_drawn_at_its_rate_and_never_without_liver():
    from LiverSegExtension.training.augment import RandMetalArtefactd

    t = RandMetalArtefactd("image", "label", prob=0.2)
    t.set_random_state(0)
    case = metal_case()
    drawn = sum(bool(np.any(t(case)["image"] != case["image"])) for _ in range(200))
    assert 25 <= drawn <= 55
    empty = {"image": case["image"], "label": np.zeros_like(case["label"])}
    assert all(t(empty)["image"] is empty["image"] for _ in range(20))


def test_scale_range_reaches_a_childs_body_and_a_large_adults():
    """The affine zoom spans 0.6 to 1.25 of the anatomy's size (grid factors 1 + scale, up to 1.7 wider)."""
    from LiverSegExtension.training.augment import SCALE_RANGE

    for lo, hi in SCALE_RANGE:
        assert 1 / (1 + hi) <= 0.6 and 1 / (1 + lo) >= 1.2


def test_simulated_body_size_scales_every_spacing_and_keeps_the_voxels():
    import SimpleITK as sitk

    from LiverSegExtension.data.simulate import scaled

    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 5.0, 3.0))
    small = scaled(image, 0.6)
    np.testing.assert_allclose(small.GetSpacing(), (0.48, 0.54, 1.5))
    assert small.GetOrigin() == image.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(small), sitk.GetArrayFromImage(image))
    assert image.GetSpacing() == (0.8, 0.9, 2.5)  # the input is not changed


def test_dome_crop_centres_on_the_top_of_the_liver_and_shows_what_lies_above():
    from LiverSegExtension.training.augment import RandDomeCropd

    shape, roi = (80, 40, 40), [32, 32, 32]
    image = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)[None].copy()  # value = z
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[0, 10:31, 8:30, 8:30] = 1  # liver slices 10..30, its dome at z = 30 (z points to the head)
    t = RandDomeCropd(["image", "label"], roi)
    firsts = set()
    for seed in range(30):
        t.set_random_state(seed)
        out = t({"image": image, "label": label})
        z = np.unique(np.asarray(out["image"])[0])
        assert len(z) == roi[0] and z.min() <= 30 < z.max()  # the dome and slices above it
        np.testing.assert_array_equal(np.asarray(out["label"])[0].any(axis=(1, 2)), (z >= 10) & (z <= 30))
        firsts.add(int(z.min()))
    assert max(firsts) > 10, "some crops must leave the bottom of the liver out: they centre on the dome"
    assert len(firsts) > 5
    empty = {"image": image, "label": np.zeros_like(label)}
    assert t(empty)["image"] is image  # no liver: nothing to centre on, left to the next crop


def test_inferior_lobe_stretches_the_lowest_liver_down_and_moves_image_with_label():
    from LiverSegExtension.training.augment import RandInferiorLobed

    shape = (80, 60, 60)
    z = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[0, 40:70, 20:40, 15:45] = 1  # liver slices 40..69 (z to the head)
    image = np.where(label[0] > 0, 1000.0, z)[None].astype(np.float32)  # liver 1000, elsewhere value = z
    t = RandInferiorLobed(["image", "label"], 2.0, prob=1.0, extend_mm=(40.0, 40.0), sigma_mm=(10.0, 10.0))
    t.set_random_state(0)
    out = t({"image": image, "label": label})
    img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
    # The lowest 35 % of the liver (from z 40 to 50) reaches 20 slices (40 mm) lower in the column's
    # centre, and what lies above it stays as it was.
    assert np.nonzero(lab.any(axis=(1, 2)))[0].min() == pytest.approx(20, abs=1)
    np.testing.assert_array_equal(lab[51:], label[0, 51:])
    np.testing.assert_array_equal(img[51:], image[0, 51:])
    # Image and label moved together: new liver voxels carry liver (linear against nearest interpolation
    # differs only at the border), and below the new tip lies what lay below the old one, moved down.
    new = (lab > 0) & (label[0] == 0)
    assert new.sum() > 1000 and np.median(img[new]) == 1000 and np.mean(img[new] > 500) > 0.9
    assert img[18, 30, 30] == pytest.approx(38, abs=1.5)
    # Away from the column (beyond three sigmas) nothing moves; the liver stays one piece.
    np.testing.assert_array_equal(lab[:, :, :14], label[0, :, :, :14])
    from scipy import ndimage
    assert ndimage.label(lab)[1] == 1
    # No liver: nothing to stretch.
    empty = {"image": image, "label": np.zeros_like(label)}
    assert t(empty)["image"] is image


def test_simulated_metal_sits_behind_the_liver_at_its_mid_height_on_the_slab_asked_for():
    """The benchmark's metal: a 15 mm slab at the liver's mid-height, implants behind the liver (larger y)."""
    from LiverSegExtension.data.simulate import METAL_HU, metal_behind_liver

    case = metal_case()
    hu, liver = case["image"][0], case["label"][0] > 0
    out = metal_behind_liver(hu, liver, (2.5, 1.0, 1.0), 15.0, 800.0, np.random.default_rng(0))
    changed = np.nonzero(np.any(out != hu, axis=(1, 2)))[0]
    assert len(changed) == 6 and 17 <= changed.mean() <= 22  # 15 mm at 2.5 mm, around slice 19.5
    cores = np.argwhere(out[changed] >= METAL_HU)
    assert cores.size and cores[:, 1].min() > 49 - 30  # beside or behind the liver's back edge (y 49), not in front
    assert np.median(cores[:, 1]) > 49
    np.testing.assert_array_equal(hu, case["image"][0])  # the input is not changed
