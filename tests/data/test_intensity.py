import numpy as np
import pytest

from data.intensity import ct_window_statistics, nonzero_box_share, nonzero_mask, normalize_ct, uses_nonzero_mask


def test_fixed_hounsfield_window_maps_onto_minus_one_to_one():
    hu = np.array([-1200.0, -1000.0, -300.0, 400.0, 900.0], dtype=np.float32)
    normalized = normalize_ct(hu, ct_window_statistics(-1000, 400))
    np.testing.assert_allclose(normalized, [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        ct_window_statistics(400, -1000)


def test_nonzero_box_share_and_the_decision_follow_nnunet():
    image = np.zeros((2, 9, 11, 13), np.float32)
    image[0, 1:4, 2:7, 3:5] = 1.0
    image[1, 5:6, 3:4, 8:9] = -2.0  # a second channel widens the box: z 1..5, y 2..6, x 3..8
    assert nonzero_box_share(image) == pytest.approx(5 * 5 * 6 / (9 * 11 * 13))
    assert nonzero_box_share(np.zeros((1, 3, 5, 7))) == 1.0
    assert nonzero_box_share(np.ones((1, 3, 5, 7))) == 1.0
    # The median case decides: cropping must remove at least a quarter of it.
    assert uses_nonzero_mask([0.2, 0.74, 1.0])
    assert not uses_nonzero_mask([0.2, 0.75, 1.0])


def test_nonzero_mask_fills_enclosed_zeros_only():
    image = np.zeros((1, 7, 9, 11), np.float32)
    image[0, 1:6, 1:8, 1:10] = 3.0
    image[0, 3, 4, 5] = 0.0  # enclosed: inside the body
    image[0, 1:6, 4, 0:3] = 0.0  # a notch open to the outside: stays background
    mask = nonzero_mask(image)
    assert mask[3, 4, 5] and not mask[3, 4, 1]
    np.testing.assert_array_equal(mask, (image[0] != 0) | (np.arange(7)[:, None, None] == 3)
                                  & (np.arange(9)[None, :, None] == 4) & (np.arange(11)[None, None, :] == 5))
