import numpy as np
import pytest

from engine.postprocess import keep_largest_component_per_class, keep_largest_foreground


def test_keeps_the_organ_with_its_findings_and_drops_islands():
    label_map = np.zeros((13, 17, 19), np.uint8)
    label_map[2:10, 3:12, 4:14] = 1  # the organ
    label_map[4:6, 5:7, 6:8] = 2  # a finding inside it
    label_map[10:12, 12:14, 14:16] = 2  # a finding touching it at one corner only (26-connected)
    label_map[11:13, 14:17, 1:3] = 1  # an island away from it
    expected = label_map.copy()
    expected[11:13, 14:17, 1:3] = 0
    result = keep_largest_foreground(label_map)
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.uint8


def test_empty_and_single_component_maps_are_unchanged():
    empty = np.zeros((5, 6, 7), np.uint8)
    np.testing.assert_array_equal(keep_largest_foreground(empty), empty)
    one = empty.copy()
    one[1:3, 2:4, 3:5] = 2
    np.testing.assert_array_equal(keep_largest_foreground(one), one)


def _ball(shape, center, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2).astype(np.uint8)


def test_largest_component_per_class_keeps_one_structure():
    label = _ball((12, 12, 12), (4, 4, 4), 3) + _ball((12, 12, 12), (10, 10, 10), 1)
    kept = keep_largest_component_per_class(label, 2)
    np.testing.assert_array_equal(kept, _ball((12, 12, 12), (4, 4, 4), 3))


def test_largest_foreground_share_counts_all_classes_as_one_foreground():
    from engine.postprocess import largest_foreground_share

    label = np.zeros((6, 10, 10), np.uint8)
    assert largest_foreground_share(label) == 1.0  # no foreground: nothing to lose
    label[1:4, 1:4, 1:4] = 1  # 27 voxels
    label[1:4, 4:5, 1:4] = 2  # 9 voxels touching them: the same piece
    assert largest_foreground_share(label) == 1.0
    label[1:4, 8:10, 8:10] = 1  # 12 voxels apart
    assert largest_foreground_share(label) == pytest.approx(36 / 48)
