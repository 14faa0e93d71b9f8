import nibabel as nib
import numpy as np
import pytest

from data.nifti import NiftiError, read_nifti, write_nifti_like


def _oblique_affine(seed: int) -> np.ndarray:
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 1.1, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


AFFINES = {
    "ras": np.diag([0.8, 0.9, 2.0, 1.0]),
    "flipped": np.diag([-0.8, 0.9, -2.0, 1.0]),
    "permuted": np.array([[0, 0, -2.0, 10], [1.5, 0, 0, 3], [0, -3.0, 0, 1], [0, 0, 0, 1]]),
    "oblique": _oblique_affine(0),
}


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize("name", AFFINES)
def test_read_matches_nibabel_canonical_and_round_trips(tmp_path, name):
    affine = AFFINES[name]
    data = np.random.default_rng(1).integers(0, 5, size=(23, 19, 17)).astype(np.uint8)
    source = _save(tmp_path / "label.nii.gz", data, affine)

    volume = read_nifti(source, is_label=True)

    # Independent reference: nibabel's own canonical image, axes reversed.
    canonical = nib.as_closest_canonical(nib.load(source))
    np.testing.assert_array_equal(volume.array, np.asarray(canonical.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(volume.affine, canonical.affine, atol=1e-5)
    assert volume.array.dtype == np.uint8
    expected_spacing = np.linalg.norm(canonical.affine[:3, :3], axis=0)[::-1]
    np.testing.assert_allclose(volume.spacing, expected_spacing, rtol=1e-5)
    assert volume.source_shape == (23, 19, 17)

    write_nifti_like(volume.array, volume, tmp_path / "written.nii.gz")
    written = nib.load(tmp_path / "written.nii.gz")
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, nib.load(source).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), data)


def test_oblique_spacing_is_column_norms(tmp_path):
    source = _save(tmp_path / "image.nii.gz", np.zeros((23, 19, 17), np.float32), AFFINES["oblique"])
    volume = read_nifti(source)
    # The oblique affine scales its (i, j, k) columns by 0.7, 1.1, 2.5 mm; which becomes z/y/x depends
    # on the orientation, but the set of spacings cannot change.
    np.testing.assert_allclose(sorted(volume.spacing), [0.7, 1.1, 2.5], rtol=1e-5)


def test_image_is_float32_with_4d_last_axis_as_channels(tmp_path):
    data = np.random.default_rng(2).normal(size=(23, 19, 17, 3)).astype(np.float32)
    source = _save(tmp_path / "image.nii.gz", data, AFFINES["flipped"])
    volume = read_nifti(source)
    assert volume.array.shape == (3, 17, 19, 23)
    assert volume.array.dtype == np.float32
    for channel in range(3):
        canonical = nib.as_closest_canonical(nib.Nifti1Image(data[..., channel], AFFINES["flipped"]))
        np.testing.assert_array_equal(volume.array[channel], canonical.get_fdata().transpose(2, 1, 0))


def test_scaled_integer_image_reads_in_physical_units(tmp_path):
    data = np.arange(23 * 19 * 17, dtype=np.int16).reshape(23, 19, 17)
    image = nib.Nifti1Image(data, AFFINES["ras"])
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    volume = read_nifti(tmp_path / "ct.nii.gz")
    assert volume.array.min() == -1024.0
    assert volume.array[0, 0, 0, 1] == -1024.0 + 19 * 17  # (z, y, x) = (0, 0, 1) is file voxel (1, 0, 0)


def test_truncated_file_raises_clear_error(tmp_path):
    source = _save(tmp_path / "case.nii.gz", np.random.default_rng(3).normal(size=(23, 19, 17)), AFFINES["ras"])
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(NiftiError, match=r"case\.nii\.gz: cannot read NIfTI \(file truncated or corrupt"):
        read_nifti(source)


def test_nan_image_raises_error_naming_file(tmp_path):
    data = np.zeros((23, 19, 17), np.float32)
    data[3, 4, 5] = np.nan
    source = _save(tmp_path / "nan_case.nii.gz", data, AFFINES["ras"])
    with pytest.raises(NiftiError, match="nan_case.nii.gz: image holds NaN"):
        read_nifti(source)


def test_non_integer_and_out_of_range_labels_are_rejected(tmp_path):
    fractional = _save(tmp_path / "soft.nii.gz", np.full((23, 19, 17), 0.5, np.float32), AFFINES["ras"])
    with pytest.raises(NiftiError, match="soft.nii.gz: label map holds non-integer"):
        read_nifti(fractional, is_label=True)
    large = _save(tmp_path / "large.nii.gz", np.full((23, 19, 17), 300, np.int16), AFFINES["ras"])
    with pytest.raises(NiftiError, match="large.nii.gz: label values span 300..300"):
        read_nifti(large, is_label=True)


def test_write_rejects_array_on_wrong_grid(tmp_path):
    volume = read_nifti(_save(tmp_path / "label.nii.gz", np.zeros((23, 19, 17), np.uint8), AFFINES["ras"]))
    with pytest.raises(ValueError, match="does not fit the canonical grid"):
        write_nifti_like(np.zeros((23, 19, 17), np.uint8), volume, tmp_path / "out.nii.gz")
