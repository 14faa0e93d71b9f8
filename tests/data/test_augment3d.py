import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage

from data.augment3d import (
    Augment3DConfig,
    SpatialTransformParams,
    adjust_gamma,
    apply_spatial_transform,
    augment_intensity,
    make_coordinate_map,
    sample_nearest,
    sample_spatial_transform,
    simulate_low_resolution,
    standard_normal,
)

VOLUME_SHAPE = (29, 41, 47)


def _blob_volume(shape=VOLUME_SHAPE, seed=0):
    """Label with four separate spheres of classes 1-3; image = label * 10 + smooth field in [-2, 2]."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    positions = [(0.5, 0.3, 0.3), (0.5, 0.3, 0.7), (0.5, 0.7, 0.3), (0.5, 0.7, 0.7)]
    for class_index, position in zip((1, 2, 3, 1), positions):
        center = (np.asarray(position) + rng.uniform(-0.05, 0.05, size=3)) * np.asarray(shape)
        radius = rng.uniform(6.0, 9.0)
        distance = np.sqrt(sum((grid[axis] - center[axis]) ** 2 for axis in range(3)))
        label[distance < radius] = class_index
    field = 2.0 * np.sin(grid[0] / 5.0) * np.cos(grid[1] / 7.0 + grid[2] / 11.0)
    image = (label * 10.0 + field)[None].astype(np.float32)
    return image, label


def _forced_spatial_config():
    return dataclasses.replace(
        Augment3DConfig.none(), p_rotation=1.0, p_scale=1.0, p_elastic=1.0, mirror_axes=(0, 1, 2), p_mirror=1.0
    )


def test_identity_map_is_the_plain_crop_grid():
    patch_size, center = (7, 10, 13), np.array([12, 20, 5])
    coordinates = make_coordinate_map(patch_size, center, SpatialTransformParams())
    start = center - np.asarray(patch_size) // 2
    expected = np.stack(np.meshgrid(*[np.arange(s, s + n) for s, n in zip(start, patch_size)], indexing="ij"))
    assert coordinates.shape == (3, *patch_size) and coordinates.dtype == np.float32
    np.testing.assert_array_equal(coordinates, expected)


def test_pure_crop_and_mirror_match_slicing_and_flip():
    image, label = _blob_volume()
    patch_size, center = (9, 15, 21), np.array([14, 20, 23])
    start = center - np.asarray(patch_size) // 2
    crop = tuple(slice(s, s + n) for s, n in zip(start, patch_size))
    reference_image, reference_label = image[(slice(None), *crop)], label[crop]
    for mirror in [(False, False, False), (True, False, True), (False, True, False), (True, True, True)]:
        params = SpatialTransformParams(mirror=mirror)
        flip_axes = tuple(axis for axis in range(3) if mirror[axis])
        expected_image = np.flip(reference_image, tuple(axis + 1 for axis in flip_axes))
        expected_label = np.flip(reference_label, flip_axes)
        # fast (sliced) path
        patch_image, patch_label = apply_spatial_transform(image, label, center=center, patch_size=patch_size,
                                                           params=params, channel_min=np.zeros(1))
        np.testing.assert_array_equal(patch_image, expected_image)
        np.testing.assert_array_equal(patch_label, expected_label)
        assert patch_image.flags.c_contiguous and patch_label.flags.c_contiguous
        # the coordinate map, interpolated, agrees exactly with the sliced path
        coordinates = make_coordinate_map(patch_size, center, params)
        interpolated = scipy.ndimage.map_coordinates(image[0], coordinates, order=1)
        np.testing.assert_array_equal(interpolated, expected_image[0])


def test_quarter_turn_and_double_scale_match_rot90_and_strides():
    image, label = _blob_volume()
    patch_size, center = (7, 15, 15), np.array([14, 20, 23])
    start = center - np.asarray(patch_size) // 2
    crop = label[tuple(slice(s, s + n) for s, n in zip(start, patch_size))]
    turned = SpatialTransformParams(angles=(math.pi / 2, 0.0, 0.0))
    _, patch_label = apply_spatial_transform(image, label, center=center, patch_size=patch_size, params=turned,
                                             channel_min=np.zeros(1))
    np.testing.assert_array_equal(patch_label, np.rot90(crop, k=-1, axes=(1, 2)))

    patch_size = (5, 9, 11)
    doubled = SpatialTransformParams(scale=2.0)
    patch_image, patch_label = apply_spatial_transform(image, label, center=center, patch_size=patch_size,
                                                       params=doubled, channel_min=np.zeros(1))
    start = center - 2 * (np.asarray(patch_size) // 2)
    strided = tuple(slice(s, s + 2 * n, 2) for s, n in zip(start, patch_size))
    np.testing.assert_array_equal(patch_label, label[strided])
    np.testing.assert_allclose(patch_image, image[(slice(None), *strided)], atol=1e-5)


def test_full_spatial_augmentation_keeps_image_and_label_aligned():
    patch_size, center = (19, 27, 31), np.array([14, 20, 23])
    interior = np.zeros(patch_size, dtype=bool)
    interior[2:-2, 2:-2, 2:-2] = True  # a class boundary just outside the patch is invisible in it
    mismatch_fractions = []
    for seed in range(5):
        image, label = _blob_volume(seed=seed)
        channel_min = image.reshape(1, -1).min(axis=1)
        params = sample_spatial_transform(np.random.default_rng(seed), patch_size, _forced_spatial_config())
        assert all(params.angles) and params.scale != 1.0 and params.elastic_magnitude > 0.0 and all(params.mirror)
        patch_image, patch_label = apply_spatial_transform(image, label, center=center, patch_size=patch_size,
                                                           params=params, channel_min=channel_min)
        assert patch_image.shape == (1, *patch_size) and patch_image.dtype == np.float32
        assert patch_label.shape == patch_size and patch_label.dtype == np.uint8
        assert set(np.unique(patch_label)) == {0, 1, 2, 3}
        mismatch = np.rint(patch_image[0] / 10.0) != patch_label
        mismatch_fractions.append(mismatch.mean())
        # linear interpolation blends classes only where they meet: disagreements hug boundaries
        largest = scipy.ndimage.maximum_filter(patch_label, 5)
        near_boundary = largest != scipy.ndimage.minimum_filter(patch_label, 5)
        assert not np.any(mismatch & ~near_boundary & interior)
        # the transform really moved things: the plain crop differs
        plain_params = SpatialTransformParams()
        plain_image, _ = apply_spatial_transform(image, label, center=center, patch_size=patch_size,
                                                 params=plain_params, channel_min=channel_min)
        assert np.abs(plain_image - patch_image).mean() > 1.0
    assert max(mismatch_fractions) < 0.08 and np.mean(mismatch_fractions) < 0.05


def test_reading_the_bounding_box_equals_interpolating_the_whole_volume():
    image, label = _blob_volume()
    params = SpatialTransformParams(angles=(0.3, -0.2, 0.4), scale=0.8, mirror=(False, True, False))
    patch_size, center = (9, 11, 13), np.array([14, 20, 23])
    requested = []

    class RecordingVolume:
        """Array stand-in that records which regions are read."""

        def __init__(self, array):
            self.array, self.shape = array, array.shape

        def __getitem__(self, key):
            requested.append(self.array[key].size)
            return self.array[key]

    patch_image, patch_label = apply_spatial_transform(
        RecordingVolume(image), RecordingVolume(label), center=center, patch_size=patch_size, params=params,
        channel_min=np.array([-5.0])
    )
    coordinates = make_coordinate_map(patch_size, center, params)
    whole_image = scipy.ndimage.map_coordinates(image[0], coordinates, order=1, mode="constant", cval=-5.0)
    whole_label = scipy.ndimage.map_coordinates(label, coordinates, order=0, mode="constant", cval=0)
    np.testing.assert_allclose(patch_image[0], whole_image, atol=1e-5)
    np.testing.assert_array_equal(patch_label, whole_label)
    assert max(requested) < label.size / 4


@pytest.mark.parametrize("params", [SpatialTransformParams(), SpatialTransformParams(angles=(0.1, 0.0, 0.0))])
def test_patch_larger_than_volume_is_padded_with_channel_min_and_background(params):
    image, label = _blob_volume(shape=(5, 7, 9))
    image = np.concatenate([image, image + 100.0])
    channel_min = np.array([-3.0, 50.0], dtype=np.float32)
    patch_size = (9, 11, 13)
    center = np.array([2, 3, 4])
    patch_image, patch_label = apply_spatial_transform(image, label, center=center, patch_size=patch_size,
                                                       params=params, channel_min=channel_min)
    start = np.asarray(patch_size) // 2 - center  # where the volume starts inside the patch
    inside = tuple(slice(s, s + n) for s, n in zip(start, label.shape))
    outside = np.ones(patch_size, dtype=bool)
    outside[inside] = False
    if not params.needs_interpolation:
        np.testing.assert_array_equal(patch_image[(slice(None), *inside)], image)
        np.testing.assert_array_equal(patch_label[inside], label)
    # well away from the volume nothing but padding remains
    far = np.zeros(patch_size, dtype=bool)
    far[0], far[-1] = True, True
    assert np.all(patch_label[far] == 0)
    np.testing.assert_array_equal(patch_image[0][far], -3.0)
    np.testing.assert_array_equal(patch_image[1][far], 50.0)
    if not params.needs_interpolation:
        assert np.all(patch_label[outside] == 0)
        np.testing.assert_array_equal(patch_image[1][outside], 50.0)


def test_disabled_config_draws_identity():
    config = Augment3DConfig.none()
    image = np.random.default_rng(0).standard_normal((2, 7, 9, 11)).astype(np.float32)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        params = sample_spatial_transform(rng, (7, 9, 11), config)
        assert not params.needs_interpolation and not any(params.mirror)
        np.testing.assert_array_equal(augment_intensity(image, rng, config), image)


def test_in_plane_rotation_turns_about_z_only():
    config = dataclasses.replace(Augment3DConfig.none(), p_rotation=1.0, rotation_in_plane_only=True)
    params = sample_spatial_transform(np.random.default_rng(0), (5, 33, 33), config)
    assert params.angles[0] != 0.0 and params.angles[1:] == (0.0, 0.0)


def test_elastic_field_is_smooth_and_bounded():
    config = dataclasses.replace(Augment3DConfig.none(), p_elastic=1.0)
    patch_size = (17, 23, 29)
    params = sample_spatial_transform(np.random.default_rng(3), patch_size, config)
    identity = make_coordinate_map(patch_size, np.zeros(3), SpatialTransformParams())
    displacement = make_coordinate_map(patch_size, np.zeros(3), params) - identity
    peak = np.abs(displacement).reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(peak, params.elastic_magnitude, rtol=1e-4)
    # neighbouring voxels move nearly together: smooth on the scale of sigma
    step = np.abs(np.diff(displacement, axis=3)).max()
    assert step < 2.0 * params.elastic_magnitude / params.elastic_sigma


def _forced_intensity_config(name):
    return dataclasses.replace(Augment3DConfig.none(), **{name: 1.0})


@pytest.mark.parametrize(
    "name", ["p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_inverted_gamma", "p_gamma"]
)
def test_each_intensity_augmentation_changes_values_and_keeps_shape_and_dtype(name):
    image = np.random.default_rng(1).standard_normal((2, 9, 11, 13)).astype(np.float32)
    config = _forced_intensity_config(name)
    first = augment_intensity(image, np.random.default_rng(5), config)
    again = augment_intensity(image, np.random.default_rng(5), config)
    assert first.shape == image.shape and first.dtype == np.float32
    assert not np.array_equal(first, image)
    np.testing.assert_array_equal(first, again)
    assert np.isfinite(first).all()


def test_gamma_keeps_range_or_statistics():
    channel = np.random.default_rng(2).uniform(-1.5, 3.0, size=(7, 9, 11)).astype(np.float32)
    kept_range = adjust_gamma(channel, 1.4, retain_stats=False)
    assert kept_range.dtype == np.float32
    np.testing.assert_allclose([kept_range.min(), kept_range.max()], [channel.min(), channel.max()], atol=1e-5)
    normalised = (channel - channel.min()) / (channel.max() - channel.min())
    expected = normalised**1.4 * (channel.max() - channel.min()) + channel.min()
    np.testing.assert_allclose(kept_range, expected, atol=1e-5)
    kept_stats = adjust_gamma(channel, 0.7, retain_stats=True)
    np.testing.assert_allclose([kept_stats.mean(), kept_stats.std()], [channel.mean(), channel.std()], atol=1e-4)
    # nnU-Net's definition: gamma in the range-kept form, then standardised back to the input's statistics
    gamma_07 = normalised**0.7 * (channel.max() - channel.min()) + channel.min()
    expected = (gamma_07 - gamma_07.mean()) / (gamma_07.std() + 1e-7) * channel.std() + channel.mean()
    np.testing.assert_allclose(kept_stats, expected, atol=1e-5)
    in_place = channel.copy()
    adjust_gamma(in_place, 0.7, retain_stats=True, out=in_place)
    np.testing.assert_array_equal(in_place, kept_stats)


def test_standard_normal_is_a_function_of_the_generator():
    first = standard_normal(np.random.default_rng(5), (32, 32, 32))
    again = standard_normal(np.random.default_rng(5), (32, 32, 32))
    other = standard_normal(np.random.default_rng(6), (32, 32, 32))
    assert first.dtype == np.float32 and first.shape == (32, 32, 32)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert abs(first.mean()) < 0.01 and abs(first.std() - 1.0) < 0.01


def test_contrast_and_brightness_follow_their_definitions():
    image = np.random.default_rng(4).standard_normal((1, 7, 9, 11)).astype(np.float32)
    brighter = augment_intensity(image, np.random.default_rng(0), _forced_intensity_config("p_brightness"))
    ratio = brighter / image
    assert np.allclose(ratio, ratio.flat[0], atol=1e-5) and 0.75 <= ratio.flat[0] <= 1.25
    stretched = augment_intensity(image, np.random.default_rng(0), _forced_intensity_config("p_contrast"))
    assert stretched.min() >= image.min() and stretched.max() <= image.max()


def test_low_resolution_upsampling_equals_scipy_zoom():
    channel = np.random.default_rng(6).standard_normal((11, 16, 21)).astype(np.float32)
    zoom = np.array([0.55, 0.8, 0.67])
    result = simulate_low_resolution(channel, zoom)
    small = scipy.ndimage.zoom(channel, zoom, order=0)
    reference = scipy.ndimage.zoom(small, np.asarray(channel.shape) / np.asarray(small.shape), order=3)
    assert result.shape == channel.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, reference, atol=1e-4)


def test_nearest_label_sampling_equals_scipy_order_zero_at_edges_and_halves():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 5, size=(9, 11, 13)).astype(np.uint8)
    coordinates = rng.uniform(-1.5, 14.5, size=(3, 17, 19, 21)).astype(np.float32)
    coordinates[:, :6] = np.round(coordinates[:, :6] * 2) / 2  # exact halves and the volume's edges
    expected = scipy.ndimage.map_coordinates(label, coordinates, order=0, mode="constant", cval=0)
    sampled = sample_nearest(label, coordinates)
    assert sampled.dtype == np.uint8 and (expected == 0).mean() > 0.3  # many points fall outside
    np.testing.assert_array_equal(sampled, expected)
    # 2D masks use the same function
    np.testing.assert_array_equal(sample_nearest(label[4], coordinates[1:, 0]),
                                  scipy.ndimage.map_coordinates(label[4], coordinates[1:, 0], order=0))
