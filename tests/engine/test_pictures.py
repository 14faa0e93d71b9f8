import numpy as np

from engine.pictures import foreground_slice_index, montage, overlay_slice, save_montage


def _ball(shape, center, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2).astype(np.uint8)


def test_overlay_draws_grey_image_green_reference_and_red_prediction_outlines():
    image = np.arange(7 * 8, dtype=np.float32).reshape(7, 8)
    reference = np.zeros((7, 8), np.uint8)
    reference[1:4, 1:4] = 1  # a 3x3 square: its outline is all but the centre
    prediction = np.zeros((7, 8), np.uint8)
    prediction[3:6, 3:7] = 2  # overlaps the reference's corner (3, 3)
    rgb = overlay_slice(image, reference, prediction)
    assert rgb.shape == (7, 8, 3) and rgb.dtype == np.uint8

    green = np.all(rgb == (0, 255, 0), axis=-1)
    red = np.all(rgb == (255, 0, 0), axis=-1)
    expected_green = reference > 0
    expected_green[2, 2] = False
    expected_green[3, 3] = False  # drawn over in red
    np.testing.assert_array_equal(green, expected_green)
    expected_red = prediction > 0
    expected_red[4, 4:6] = False  # the inside of the 3x4 rectangle
    np.testing.assert_array_equal(red, expected_red)

    grey = rgb[~(green | red)]
    assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])
    # Intensities scale from the 1st to the 99th percentile: the ends saturate.
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[6, 7]) == (255, 255, 255)
    low, high = np.percentile(image, [1, 99])
    assert rgb[2, 2, 0] == int((image[2, 2] - low) / (high - low) * 255)


def test_foreground_slice_index_is_the_fullest_axial_slice_or_the_middle():
    labels = np.zeros((7, 5, 6), np.uint8)
    labels[2, 1:3, 1:3] = 1  # 4 voxels
    labels[5, 0:3, 0:3] = 2  # 9 voxels, another class
    assert foreground_slice_index(labels) == 5
    assert foreground_slice_index(np.zeros((7, 5, 6), np.uint8)) == 3


def test_montage_draws_slices_with_foreground(tmp_path):
    label = _ball((7, 11, 13), (3, 5, 6), 2)
    picture = montage(np.random.default_rng(0).normal(size=(1, 7, 11, 13)), label, label, axis=0, num_slices=4)
    assert picture.dtype == np.uint8 and picture.shape == (11, 4 * 13, 3)
    save_montage(picture, tmp_path / "case.png")
    assert (tmp_path / "case.png").stat().st_size > 0
