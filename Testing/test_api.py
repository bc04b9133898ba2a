"""The Python API: ``from LiverSegExtension import segment`` gives what ``liverseg segment`` writes, from a path, a
SimpleITK image or a nibabel image (a tiny untrained model: what is checked is that the doors agree)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_affine, phantom, rotation
from test_cli import run_cli

from LiverSegExtension.geometry import image_from_array, same_grid

SHAPE, SPACING = (30, 48, 56), (4.0, 4.5, 6.0)


def test_segment_from_python_agrees_with_the_cli_for_a_path_an_itk_and_a_nibabel_image(tiny_model_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    from LiverSegExtension import LiverSegError, segment

    m = make_affine(SPACING, SHAPE, rotation(0.2, -0.1, 0.3), left_handed=True)
    ct, _ = phantom(SHAPE, m)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image_from_array(ct, m), str(path))
    assert run_cli("segment", path, "-o", tmp_path / "cli", "--model", tiny_model_dir, "-q").returncode == 0
    expected = sitk.ReadImage(str(tmp_path / "cli" / "ct_liver.nii.gz"))
    assert sitk.GetArrayFromImage(expected).any()  # a mask whose voxels can be told apart

    from_path = segment(path, output=tmp_path / "api_liver.nii.gz", model=tiny_model_dir)
    assert same_grid(from_path.mask_image, expected)
    assert np.array_equal(from_path.mask, sitk.GetArrayFromImage(expected))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "api_liver.nii.gz"))), from_path.mask)
    assert from_path.liver_ml > 0 and 0 <= from_path.uncertainty <= 1 and "on cpu" in from_path.runtime

    from_itk = segment(sitk.ReadImage(str(path)), model=tiny_model_dir, probabilities=True)
    assert np.array_equal(from_itk.mask, from_path.mask) and same_grid(from_itk.probability_image, expected)

    from_nib = segment(nib.load(str(path)), model=tiny_model_dir)
    assert np.array_equal(from_nib.mask, from_path.mask)  # the same voxels, the array order nibabel's

    with pytest.raises(LiverSegError, match="already exists"):  # never over a file unasked
        segment(path, output=tmp_path / "api_liver.nii.gz", model=tiny_model_dir)
    with pytest.raises(LiverSegError, match="no such file"):
        segment(tmp_path / "nothing.nii.gz", model=tiny_model_dir)
