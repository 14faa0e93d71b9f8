import itertools

import numpy as np
import pytest
import torch

from engine.inference import gaussian_importance_map, sliding_window_inference, window_starts


def pointwise_model(spatial_dims, in_channels, num_classes, seed=0):
    """A 1x1(x1) convolution: its whole-volume output is the reference for any tiling."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d)(in_channels, num_classes, kernel_size=1)
    torch.nn.init.normal_(conv.weight, std=2.0)
    return conv.eval()


def whole_volume_probabilities(model, image, num_classes):
    with torch.no_grad():
        logits = model(torch.as_tensor(image)[None])[0]
    return torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=0)


@pytest.mark.parametrize("overlap", [0.5, 0.25])
@pytest.mark.parametrize("gaussian", [True, False])
def test_3d_reproduces_whole_volume_forward(overlap, gaussian):
    model = pointwise_model(3, in_channels=2, num_classes=3)
    image = torch.randn(2, 21, 26, 19)
    probabilities = sliding_window_inference(
        image, model, roi_size=(8, 11, 7), num_classes=3, overlap=overlap, batch_size=3, gaussian=gaussian
    )
    assert probabilities.shape == (3, 21, 26, 19)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_2d_reproduces_whole_image_forward_from_numpy(overlap):
    model = pointwise_model(2, in_channels=1, num_classes=2)
    image = np.random.default_rng(0).normal(size=(1, 37, 29)).astype(np.float32)
    probabilities = sliding_window_inference(image, model, roi_size=(16, 9), num_classes=2, overlap=overlap)
    assert probabilities.shape == (2, 37, 29)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 2), rtol=0, atol=1e-5)


def test_single_logit_gives_sigmoid_probabilities():
    model = pointwise_model(3, in_channels=1, num_classes=1)
    image = torch.randn(1, 13, 10, 9)
    probabilities = sliding_window_inference(image, model, roi_size=(6, 6, 6), num_classes=1)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 1), rtol=0, atol=1e-5)


def test_volume_smaller_than_roi_is_padded_and_cropped_back():
    model = pointwise_model(3, in_channels=2, num_classes=3)
    image = torch.randn(2, 5, 12, 7)
    calls = []

    def predict(batch):
        calls.append(batch.clone())
        return model(batch)

    probabilities = sliding_window_inference(image, predict, roi_size=(8, 8, 8), num_classes=3)
    assert probabilities.shape == (3, 5, 12, 7)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 3), rtol=0, atol=1e-5)
    # Padding uses each channel's minimum: z is padded by 3 voxels, 1 before and 2 after.
    first_window = calls[0][0]
    assert first_window.shape == (2, 8, 8, 8)
    for channel in range(2):
        assert torch.all(first_window[channel, 0] == image[channel].min())
        torch.testing.assert_close(first_window[channel, 1:6, :, 0:7], image[channel, :, :8, :])


def test_mirroring_with_a_flip_equivariant_model_changes_nothing():
    model = pointwise_model(3, in_channels=1, num_classes=3)
    image = torch.randn(1, 15, 14, 13)
    calls = []

    def predict(batch):
        calls.append(1)
        return model(batch)

    probabilities = sliding_window_inference(
        image, predict, roi_size=(8, 8, 8), num_classes=3, batch_size=100, mirror_axes=(0, 1, 2)
    )
    assert len(calls) == 8  # one batch, 2^3 flip combinations
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 3), rtol=0, atol=1e-5)


def test_mirroring_averages_flipped_predictions_after_unflipping():
    # A model that is not flip-equivariant: logits depend on the position along x inside the window.
    image = torch.zeros(1, 9, 12)
    ramp = torch.arange(12, dtype=torch.float32)

    def predict(batch):
        background = torch.zeros_like(batch)
        return torch.cat([background, batch + ramp], dim=1)

    probabilities = sliding_window_inference(image, predict, roi_size=(9, 12), num_classes=2, mirror_axes=(1,))
    # Plain prediction at x: sigmoid(x); flipped, predicted, flipped back: sigmoid(11 - x).
    sigmoid = torch.sigmoid
    expected = (sigmoid(ramp) + sigmoid(11 - ramp)) / 2
    torch.testing.assert_close(probabilities[1], expected.expand(9, 12), rtol=0, atol=1e-6)


def test_overlapping_windows_are_weighted_by_the_gaussian():
    # A model that predicts a constant per window (its mean) shows the weighting: in the overlap the
    # result is the Gaussian-weighted average of the two windows' values.
    image = torch.zeros(1, 1, 12)
    image[0, 0, 6:] = 1.0

    def predict(batch):
        value = batch.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, 1, batch.shape[-1]) * 4
        return torch.cat([torch.zeros_like(value), value], dim=1)

    probabilities = sliding_window_inference(image, predict, roi_size=(1, 8), num_classes=2, overlap=0.5)
    starts = [0, 4]
    weight = gaussian_importance_map((1, 8))[0]
    window_values = [torch.sigmoid(torch.tensor(image[0, 0, s:s + 8].mean().item() * 4)) for s in starts]
    expected = torch.zeros(12)
    weights = torch.zeros(12)
    for start, value in zip(starts, window_values):
        expected[start:start + 8] += weight * value
        weights[start:start + 8] += weight
    torch.testing.assert_close(probabilities[1, 0], expected / weights, rtol=0, atol=1e-6)


def test_window_starts_cover_the_axis_with_the_last_aligned_to_the_end():
    assert window_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]
    assert window_starts(16, 8, 0.5) == [0, 4, 8]
    assert window_starts(8, 8, 0.5) == [0]
    assert window_starts(10, 4, 0.25) == [0, 3, 6]


def test_gaussian_importance_map_is_symmetric_positive_and_peaks_at_one():
    importance = gaussian_importance_map((9, 8, 7))
    assert importance.shape == (9, 8, 7)
    assert importance.min() > 0
    assert importance.max() == pytest.approx(1.0)
    assert importance[4, 3, 3] == importance.max()
    for dims in itertools.chain.from_iterable(itertools.combinations(range(3), n) for n in (1, 2, 3)):
        assert torch.equal(importance.flip(dims), importance)
    # sigma = size / 8: one sigma from the centre along the first axis drops to exp(-1/2).
    line = gaussian_importance_map((64,), sigma_scale=1 / 8)
    center = 31.5
    expected = torch.exp(-((torch.arange(64) - center) ** 2) / (2 * 8.0**2))
    torch.testing.assert_close(line, (expected / expected.max()).float().clamp_min(1e-6))


def test_unet_as_predict_with_one_window_equals_its_forward():
    from models import UNet

    model = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, depth=3).eval()
    image = torch.randn(1, 12, 12, 12)
    probabilities = sliding_window_inference(image, model, roi_size=(12, 12, 12), num_classes=2)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 2), rtol=0, atol=1e-5)


def test_wrong_predict_output_shape_is_reported():
    with pytest.raises(ValueError, match="predict returned"):
        sliding_window_inference(torch.randn(1, 9, 9), lambda batch: batch, roi_size=(4, 4), num_classes=3)
