import numpy as np
import torch

from engine.slicewise import evaluate_slicewise, montage, predict_volume_slicewise, \
    save_montage, slice_averaged_dice


class Threshold(torch.nn.Module):
    """A 'model' whose one logit is the image itself minus 0.5: it predicts wherever the image is 1."""

    def forward(self, x):
        return (x[:, :1] - 0.5) * 40


def _ball(shape, center, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2).astype(np.uint8)


def _predict(image, **kwargs):
    defaults = dict(axis=0, image_size=(16, 16), fit="resize", num_classes=1, device=torch.device("cpu"),
                    amp_dtype=None)
    defaults.update(kwargs)
    return predict_volume_slicewise(Threshold(), image, **defaults)


def test_every_slice_is_predicted_and_stacked_along_any_axis():
    mask = _ball((9, 16, 13), (4, 8, 6), 4)
    image = mask[None].astype(np.float32)
    for axis, size in ((0, (16, 13)), (1, (9, 13)), (2, (9, 16))):
        np.testing.assert_array_equal(_predict(image, axis=axis, image_size=size), mask)
    np.testing.assert_array_equal(_predict(image, image_size=(8, 8), fit="crop"), mask)  # sliding window


def test_resize_to_another_size_and_back_keeps_the_shape():
    mask = _ball((5, 40, 30), (2, 20, 15), 12)[:, :, :]
    prediction = _predict(mask[None].astype(np.float32), image_size=(24, 24))
    agreement = 2 * (prediction & mask).sum() / (prediction.sum() + mask.sum())
    assert prediction.shape == mask.shape and agreement > 0.95


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


def test_montage_draws_slices_with_foreground(tmp_path):
    label = _ball((7, 11, 13), (3, 5, 6), 2)
    picture = montage(np.random.default_rng(0).normal(size=(1, 7, 11, 13)), label, label, axis=0, num_slices=4)
    assert picture.dtype == np.uint8 and picture.shape == (11, 4 * 13, 3)
    save_montage(picture, tmp_path / "case.png")
    assert (tmp_path / "case.png").stat().st_size > 0


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
