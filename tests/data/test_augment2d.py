import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.augment2d import (
    Augment2DConfig,
    SpatialTransform2D,
    augment_2d,
    augment_intensity_2d,
    make_coordinate_map_2d,
    sample_spatial_transform_2d,
    warp_2d,
)

ALL_SPATIAL = dataclasses.replace(Augment2DConfig.none(), p_rotation=1.0, rotation_range_deg=40.0, p_scale=1.0,
                                  p_translate=1.0, p_elastic=1.0, elastic_max_magnitude=6.0, flip_axes=(0, 1),
                                  p_flip=1.0)


def _blobs(shape=(37, 29)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:17, 4:13] = 1
    mask[20:33, 15:26] = 2
    return mask


def test_identity_resize_of_same_size_returns_the_input_exactly():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 31, 23)).astype(np.float32)
    mask = _blobs((31, 23))
    coordinates = make_coordinate_map_2d((31, 23), (31, 23), SpatialTransform2D(), "resize")
    warped, warped_mask = warp_2d(image, mask, coordinates, fill=image.min(axis=(1, 2)))
    np.testing.assert_allclose(warped, image, atol=1e-5)
    np.testing.assert_array_equal(warped_mask, mask)


def test_resize_matches_torch_bilinear_interpolation():
    image = np.random.default_rng(1).standard_normal((1, 40, 40)).astype(np.float32)
    coordinates = make_coordinate_map_2d((20, 20), (40, 40), SpatialTransform2D(), "resize")
    warped, _ = warp_2d(image, None, coordinates, fill=np.zeros(1))
    expected = F.interpolate(torch.from_numpy(image)[None], size=(20, 20), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(warped, expected[0].numpy(), atol=1e-5)


def test_resize_keeps_aspect_and_pads_the_short_side():
    image = np.ones((1, 20, 40), dtype=np.float32)
    coordinates = make_coordinate_map_2d((16, 16), (20, 40), SpatialTransform2D(), "resize")
    warped, _ = warp_2d(image, None, coordinates, fill=np.zeros(1))
    rows_with_image = np.flatnonzero(warped[0].max(axis=1) > 0.5)
    assert 7 <= len(rows_with_image) <= 9  # 20 of 40 rows of a 40-wide square: half the output
    assert warped[0, 8].min() > 0.99  # every column of the middle row is image


def test_crop_with_identity_is_a_plain_crop():
    image = np.arange(30 * 26, dtype=np.float32).reshape(1, 30, 26)
    center = (14 - 8 + 7.5, 10 - 4 + 3.5)  # window starting at (6, 6) of size (16, 8)
    coordinates = make_coordinate_map_2d((16, 8), (30, 26), SpatialTransform2D(), "crop", center)
    warped, _ = warp_2d(image, None, coordinates, fill=np.zeros(1))
    np.testing.assert_allclose(warped[0], image[0, 6:22, 6:14], atol=1e-4)


def test_image_and_mask_stay_aligned_under_every_spatial_augmentation():
    mask = _blobs()
    image = (mask.astype(np.float32) * 10)[None]
    for seed in range(5):
        params = sample_spatial_transform_2d(np.random.default_rng(seed), (33, 35), ALL_SPATIAL)
        assert params.angle != 0 and params.elastic_magnitude > 0 and all(params.flip)
        coordinates = make_coordinate_map_2d((33, 35), mask.shape, params, "resize")
        warped, warped_mask = warp_2d(image, mask, coordinates, fill=np.zeros(1), image_order=0)
        np.testing.assert_array_equal(warped[0], warped_mask * 10.0)  # same map, same pixels
        assert set(np.unique(warped_mask)) <= {0, 1, 2}  # nearest neighbour: classes never mix
        assert warped_mask.dtype == np.uint8


def test_linear_image_follows_the_mask():
    mask = _blobs()
    image = (mask > 0).astype(np.float32)[None]
    _, _ = augment_2d(image, mask, np.random.default_rng(3), ALL_SPATIAL, output_size=(33, 35))
    warped, warped_mask = augment_2d(image, mask, np.random.default_rng(3), ALL_SPATIAL, output_size=(33, 35))
    assert warped[0][warped_mask > 0].mean() > 0.8
    assert warped[0][warped_mask == 0].mean() < 0.2


def test_flip_of_columns_only():
    config = dataclasses.replace(Augment2DConfig.none(), flip_axes=(1,), p_flip=1.0)
    image = np.random.default_rng(2).standard_normal((1, 12, 15)).astype(np.float32)
    mask = _blobs((12, 15))
    warped, warped_mask = augment_2d(image, mask, np.random.default_rng(0), config, output_size=(12, 15))
    np.testing.assert_allclose(warped, image[:, :, ::-1], atol=1e-5)
    np.testing.assert_array_equal(warped_mask, mask[:, ::-1])


def test_image_only_use_and_reproducibility():
    image = np.random.default_rng(4).standard_normal((3, 27, 27)).astype(np.float32)
    config = Augment2DConfig(p_gamma=1.0, p_noise=1.0, p_brightness=1.0, p_contrast=1.0)
    first, no_mask = augment_2d(image, None, np.random.default_rng(9), config, output_size=(24, 24))
    again, _ = augment_2d(image, None, np.random.default_rng(9), config, output_size=(24, 24))
    assert no_mask is None and first.shape == (3, 24, 24) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", ["p_gamma", "p_brightness", "p_contrast", "p_noise"])
def test_each_intensity_augmentation_changes_values_only(name):
    image = np.random.default_rng(5).standard_normal((1, 20, 21)).astype(np.float32)
    config = dataclasses.replace(Augment2DConfig.none(), **{name: 1.0})
    changed = augment_intensity_2d(image, np.random.default_rng(1), config)
    assert changed.shape == image.shape and changed.dtype == np.float32
    assert not np.allclose(changed, image)
    np.testing.assert_array_equal(augment_intensity_2d(image, np.random.default_rng(1), Augment2DConfig.none()), image)
