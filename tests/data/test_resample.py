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
