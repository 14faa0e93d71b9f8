import numpy as np
import pytest

from data.resample import resample_image, resample_label, resampled_shape, separate_axis


@pytest.mark.parametrize(
    "spacing, target",
    [((1.0, 1.0, 1.0), (1.3, 0.7, 0.9)), ((5.0, 0.8, 0.8), (1.5, 1.1, 1.1)), ((0.9, 0.9, 0.9), (3.7, 0.6, 0.6))],
)
def test_resampling_keeps_physical_extent_and_classes(spacing, target):
    shape = (17, 19, 23)
    new_shape = resampled_shape(shape, spacing, target)
    extent, new_extent = np.multiply(shape, spacing), np.multiply(new_shape, target)
    assert np.all(np.abs(new_extent - extent) <= np.array(target) / 2 + 1e-9)

    label = np.zeros(shape, np.uint8)
    label[4:13, 3:15, 5:18] = 2
    label[7:10, 8:11, 9:13] = 5  # classes 0, 2, 5: a class 1, 3 or 4 would mean interpolated indices
    resampled = resample_label(label, new_shape, separate_axis(spacing, target))
    assert resampled.shape == new_shape
    assert set(np.unique(resampled)) <= {0, 2, 5} and 2 in resampled  # a thin class may vanish when downsampled
    # The box keeps its physical size within a voxel of the new grid on every axis.
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        old_mm = np.any(label > 0, axis=other).sum() * spacing[axis]
        new_mm = np.any(resampled > 0, axis=other).sum() * target[axis]
        assert abs(new_mm - old_mm) <= target[axis] + 1e-9
    # ... and its centre stays put, within half a voxel of the new grid (voxel i's centre at (i + 0.5) * spacing).
    old_centre = (np.argwhere(label > 0) + 0.5).mean(axis=0) * spacing
    new_centre = (np.argwhere(resampled > 0) + 0.5).mean(axis=0) * target
    assert np.all(np.abs(new_centre - old_centre) <= np.array(target) / 2)


def test_resampling_image_reproduces_a_linear_ramp():
    shape, spacing, target = (17, 19, 23), (1.0, 1.0, 1.0), (0.5, 1.25, 1.0)
    z = np.arange(shape[0], dtype=np.float32)[:, None, None] * spacing[0]
    image = np.broadcast_to(z, shape)[None]
    new_shape = resampled_shape(shape, spacing, target)
    resampled = resample_image(image, new_shape, None)
    # Voxel centres of the new grid in mm (edge-aligned grids), away from where the border padding bends the spline.
    new_z = (np.arange(new_shape[0]) + 0.5) * target[0] - 0.5 * spacing[0]
    np.testing.assert_allclose(resampled[0, 8:-8, 5, 5], new_z[8:-8], atol=2e-3)


def test_anisotropic_volume_uses_nearest_neighbour_across_slices():
    spacing, target = (4.0, 1.0, 1.0), (2.0, 1.0, 1.0)
    assert separate_axis(spacing, target) == 0
    image = np.random.default_rng(0).normal(size=(1, 7, 19, 23)).astype(np.float32)
    resampled = resample_image(image, (14, 19, 23), separate_axis(spacing, target))
    # In-plane size unchanged, so every new slice must be an exact copy of one source slice.
    np.testing.assert_allclose(resampled[0, 0::2], image[0], atol=1e-5)
    np.testing.assert_allclose(resampled[0, 1::2], image[0], atol=1e-5)


def test_resampled_shape_covers_the_same_extent_with_at_least_one_voxel():
    # 10 x 2.5 mm = 25 x 1 mm; 20 x 0.8 mm = 10 x 1.6 mm; 31 x 0.8 mm = 24.8 mm, about 20.7 x 1.2 mm.
    assert resampled_shape((10, 20, 31), (2.5, 0.8, 0.8), (1.0, 1.6, 1.2)) == (25, 10, 21)
    assert resampled_shape((2, 3, 1), (1.0, 1.0, 1.0), (5.0, 5.0, 5.0)) == (1, 1, 1)


def test_the_thick_slice_axis_is_taken_from_the_source_spacing_first():
    assert separate_axis((1.0, 1.0, 5.0), (1.0, 1.0, 1.0)) == 2
    assert separate_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # an isotropic scan made thick
    assert separate_axis((5.0, 1.0, 1.0), (1.0, 1.0, 4.0)) == 0  # the source's thick axis wins
    assert separate_axis((1.0, 1.0, 3.0), (1.0, 1.0, 1.0)) is None  # a ratio above 3 is thick, 3 is not
    assert separate_axis((0.8, 0.7, 2.0), (1.0, 1.0, 1.0)) is None


def test_an_unchanged_shape_returns_copies_as_float32_and_uint8():
    image = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    resampled = resample_image(image, (3, 4, 5), None)
    assert resampled.dtype == np.float32 and not np.shares_memory(resampled, image)
    np.testing.assert_array_equal(resampled, image)
    label = (image[0] % 3).astype(np.uint8)
    copy = resample_label(label, (3, 4, 5), None)
    assert copy.dtype == np.uint8 and not np.shares_memory(copy, label)
    np.testing.assert_array_equal(copy, label)


@pytest.mark.parametrize("axis", [None, 0])
def test_channels_are_resampled_alike_and_apart(axis):
    # The spline is linear and its weights sum to one: an affine function of a channel resamples to the
    # same function of the resampled channel, and a constant stays constant.
    first = np.random.default_rng(0).normal(size=(9, 11, 13)).astype(np.float32)
    image = np.stack([first, 3 * first + 2, np.full_like(first, 7.0)])
    resampled = resample_image(image, (17, 8, 10), axis)
    assert resampled.shape == (3, 17, 8, 10) and resampled.dtype == np.float32
    np.testing.assert_allclose(resampled[1], 3 * resampled[0] + 2, atol=1e-4)
    np.testing.assert_allclose(resampled[2], 7.0, atol=1e-5)


def test_labels_across_thick_slices_are_copied_from_the_nearest_slice():
    label = np.random.default_rng(0).integers(0, 3, size=(5, 9, 10)).astype(np.uint8)
    resampled = resample_label(label, (10, 9, 10), axis=0)
    np.testing.assert_array_equal(resampled[0::2], label)
    np.testing.assert_array_equal(resampled[1::2], label)
