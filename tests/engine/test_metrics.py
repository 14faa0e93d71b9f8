import numpy as np
import pytest
import torch

from engine.metrics import dice_per_class, metric_key, surface_scores


def two_cubes():
    """Reference: class 1 cube [2:8)^3 (216 voxels); prediction: the same cube shifted by 2 along x
    ([2:8) x [2:8) x [4:10)), overlapping in 6*6*4 = 144 voxels."""
    reference = np.zeros((11, 12, 13), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[2:8, 2:8, 2:8] = 1
    prediction[2:8, 2:8, 4:10] = 1
    return prediction, reference


def test_two_shifted_cubes():
    prediction, reference = two_cubes()
    dice = dice_per_class(prediction, reference, num_classes=2)
    assert dice == {1: pytest.approx(2 * 144 / (216 + 216))}


def test_several_classes_and_torch_inputs():
    prediction, reference = two_cubes()
    reference[0, 0, :5] = 2  # class 2: 5 voxels in the reference
    prediction[0, 0, 2:9] = 2  # 7 predicted, 3 shared
    dice = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference).long(), num_classes=3)
    assert dice[1] == pytest.approx(2 * 144 / 432)
    assert dice[2] == pytest.approx(2 * 3 / (5 + 7))


def test_empty_class_conventions():
    reference = np.zeros((5, 6, 7), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[1, 1, 1] = 1
    prediction[1, 1, 1] = 1
    prediction[2, 2, 2] = 3  # class 3 predicted but absent from the reference
    dice = dice_per_class(prediction, reference, num_classes=4)
    assert dice[1] == pytest.approx(1.0)
    assert dice[2] == 1.0  # absent from both
    assert dice[3] == 0.0
    assert not any(np.isnan(list(dice.values())))


def test_missed_class_scores_zero():
    reference = np.zeros((3, 4, 5), dtype=np.uint8)
    reference[0, 0, 0] = 1
    assert dice_per_class(np.zeros_like(reference), reference, num_classes=2) == {1: 0.0}


def test_2d_matches_set_formula_on_random_maps():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 4, size=(31, 29))
    prediction = rng.integers(0, 4, size=(31, 29))
    dice = dice_per_class(prediction, reference, num_classes=4)
    for k in range(1, 4):
        a, b = reference == k, prediction == k
        assert dice[k] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_rejects_mismatched_shapes_and_out_of_range_labels():
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((3, 4)), np.zeros((4, 3)), num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(np.full((3, 4), 2), np.zeros((3, 4)), num_classes=2)


def test_metric_keys_name_the_label_in_lower_case_with_underscores():
    assert metric_key("Left Atrium") == "dice_left_atrium"
    assert metric_key(" Liver ", "hd95") == "hd95_liver"


def test_surface_scores_are_flat_keys_per_label():
    surface_mean = {1: {"hd95_mm": 3.5, "nsd": 0.8, "volume_ml": 120.0}, 2: {"hd95_mm": 7.0, "nsd": 0.5}}
    assert surface_scores(surface_mean, {0: "background", 1: "liver", 2: "Liver Tumour"}) == {
        "hd95_liver": 3.5, "nsd_liver": 0.8, "hd95_liver_tumour": 7.0, "nsd_liver_tumour": 0.5}
