"""Whole-volume validation, checked with a voxel-wise model whose right answer is known everywhere:
the sliding windows, their weights and overlaps must not change it."""

import numpy as np
import pytest
import torch

from engine.evaluate import evaluate, evaluate_slicewise, predict_volume
from engine.metrics import slice_averaged_dice

CPU = torch.device("cpu")
SHAPE = (13, 17, 15)


class NearestClass(torch.nn.Module):
    """Logits (B, num_classes, *spatial) peaking at the class nearest each voxel's intensity, so the
    label map is round(image) for any window; one class: a sigmoid logit above 0.5 where image > 0.5."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 1:
            return x - 0.5
        return torch.cat([-(x - k) ** 2 for k in range(self.num_classes)], dim=1)


def phantom_label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:9, 3:12, 2:10] = 1
    label[4:7, 5:9, 4:7] = 2
    return label


def image_of(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """(1, *spatial) float32 whose nearest integer is ``label``."""
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, size=label.shape)
    return (label + noise)[None].astype(np.float32)


def hand_dice(prediction: np.ndarray, reference: np.ndarray, k: int) -> float:
    a, b = prediction == k, reference == k
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("overlap, batch_size", [(0.5, 2), (0.25, 3)])
def test_predict_volume_returns_the_label_map_of_the_whole_odd_sized_volume(overlap, batch_size):
    label = phantom_label()
    prediction = predict_volume(NearestClass(3), image_of(label), patch_size=(8, 8, 8), num_classes=3, device=CPU,
                                amp_dtype=None, overlap=overlap, batch_size=batch_size)
    assert prediction.dtype == np.uint8 and prediction.shape == SHAPE
    np.testing.assert_array_equal(prediction, label)


def test_predict_volume_thresholds_a_single_logit_at_one_half():
    label = (phantom_label() > 0).astype(np.uint8)
    prediction = predict_volume(NearestClass(1), image_of(label), patch_size=(8, 8, 8), num_classes=1, device=CPU,
                                amp_dtype=None, batch_size=2)
    np.testing.assert_array_equal(prediction, label)


def test_evaluate_scores_each_case_against_a_hand_computed_dice():
    label = phantom_label()
    shifted = np.roll(label, 2, axis=2)  # predicted two voxels off along x
    cases = [("exact", image_of(label, seed=1), label), ("shifted", image_of(shifted, seed=2), label)]
    model = NearestClass(3).train()
    results = evaluate(model, cases, num_classes=3, patch_size=(8, 8, 8), device=CPU, amp_dtype=None, batch_size=2,
                       spacing=(2.0, 1.0, 1.0), progress=False)
    assert not model.training
    assert results["per_case"]["exact"] == {1: 1.0, 2: 1.0}
    expected = {k: hand_dice(shifted, label, k) for k in (1, 2)}
    assert 0 < expected[2] < expected[1] < 1
    assert results["per_case"]["shifted"] == pytest.approx(expected)
    assert results["mean"] == pytest.approx({k: (1 + expected[k]) / 2 for k in (1, 2)})
    exact = results["surface_per_case"]["exact"]
    assert all(exact[k]["hd95_mm"] == 0 and exact[k]["nsd"] == 1 for k in (1, 2))
    # Shifted 2 voxels of 1 mm along x, the boundary lies 2 mm from where it should.
    assert results["surface_per_case"]["shifted"][1]["hd95_mm"] == pytest.approx(2.0)
    for k in (1, 2):
        for metric, value in results["surface_mean"][k].items():
            assert value == pytest.approx((exact[k][metric] + results["surface_per_case"]["shifted"][k][metric]) / 2)


def test_postprocess_comes_before_scoring_and_on_prediction_sees_its_result():
    label = phantom_label()
    seen = {}

    def drop_class_two(prediction):
        return np.where(prediction == 2, 1, prediction).astype(np.uint8)

    def remember(case_id, image, reference, prediction):
        seen[case_id] = prediction

    results = evaluate(NearestClass(3), [("case", image_of(label), label)], num_classes=3, patch_size=(8, 8, 8),
                       device=CPU, amp_dtype=None, batch_size=2, postprocess=drop_class_two, on_prediction=remember,
                       progress=False)
    # Class 2 is in the reference but no longer predicted: 0, not NaN; class 1 now covers it too.
    assert results["per_case"]["case"] == {1: pytest.approx(hand_dice(drop_class_two(label), label, 1)), 2: 0.0}
    assert "surface_per_case" not in results  # no spacing, no surface metrics
    np.testing.assert_array_equal(seen["case"], drop_class_two(label))


def test_running_out_of_memory_names_the_settings_to_lower():
    class Exhausted(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with pytest.raises(SystemExit, match=r"volume of \(1, 13, 17, 15\) in batches of 2 windows of \(8, 8, 8\)"
                                         r".*--window-batch-size.*--amp"):
        predict_volume(Exhausted(), image_of(phantom_label()), patch_size=(8, 8, 8), num_classes=3, device=CPU,
                       amp_dtype=None, batch_size=2)


class Threshold(torch.nn.Module):
    """A 2D 'model' whose one logit is the image itself minus 0.5: it predicts wherever the image is 1."""

    def forward(self, x):
        return (x[:, :1] - 0.5) * 40


def test_volume_dice_against_hand_computed_masks():
    reference = np.zeros((6, 10, 10), np.uint8)
    reference[1:4, 2:6, 2:6] = 1  # 48 voxels
    predicted = np.zeros_like(reference)
    predicted[2:5, 2:6, 2:8] = 1  # 72 voxels, 32 shared
    empty = np.zeros_like(reference)
    cases = [("hit", predicted[None].astype(np.float32), reference),
             ("no tumour, none found", empty[None].astype(np.float32), empty),
             ("no tumour, false positive", predicted[None].astype(np.float32), empty)]
    results = evaluate_slicewise(Threshold(), cases, num_classes=1, axis=0, image_size=(10, 10), fit="resize",
                                 device=torch.device("cpu"), amp_dtype=None, progress=False)
    assert results["per_case"]["hit"][1] == 2 * 32 / (48 + 72)
    assert results["per_case"]["no tumour, none found"][1] == 1.0
    assert results["per_case"]["no tumour, false positive"][1] == 0.0
    assert np.isclose(results["mean"][1], (2 * 32 / 120 + 1 + 0) / 3)
    # slice by slice: slices 0 and 5 empty in both (1), 1 only reference (0), 2-3 overlap 16/(16+24), 4 only predicted (0)
    expected = (1 + 0 + 2 * 2 * 16 / 40 + 0 + 1) / 6
    assert np.isclose(results["per_case_slice_averaged"]["hit"][1], expected)
    assert np.isclose(slice_averaged_dice(predicted, reference, 0, 2)[1], expected)


def test_surface_metrics_of_the_stacked_volume_use_the_spacing():
    reference = np.zeros((9, 12, 12), np.uint8)
    reference[2:6, 3:8, 3:8] = 1
    predicted = np.roll(reference, 1, axis=0)  # one slice off along z, 2.5 mm slices
    cases = [("shifted", predicted[None].astype(np.float32), reference)]
    results = evaluate_slicewise(Threshold(), cases, num_classes=1, axis=0, image_size=(12, 12), fit="resize",
                                 device=torch.device("cpu"), amp_dtype=None, spacing=(2.5, 0.8, 0.8),
                                 tolerance_mm=2.0, progress=False)
    surface = results["surface_per_case"]["shifted"][1]
    assert surface["hd95_mm"] == 2.5  # every distance is 0 or one slice
    assert 0 < surface["nsd"] < 1  # the slice shift exceeds the 2 mm tolerance on the caps only
    assert surface["volume_difference_ml"] == 0.0
    assert results["surface_mean"][1] == surface
