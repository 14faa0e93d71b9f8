import itertools

import numpy as np
import pytest
import torch

from engine.inference import (
    available_memory,
    copy_to_device,
    default_window_batch_size,
    gaussian_importance_map,
    pad_to_patch,
    place_buffers,
    average_over_flips,
    sliding_window_inference,
    trained_flips,
    window_starts,
)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
GIB = 2**30


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
        image, model, patch_size=(8, 11, 7), num_classes=3, overlap=overlap, batch_size=3, gaussian=gaussian
    )
    assert probabilities.shape == (3, 21, 26, 19)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_2d_reproduces_whole_image_forward_from_numpy(overlap):
    model = pointwise_model(2, in_channels=1, num_classes=2)
    image = np.random.default_rng(0).normal(size=(1, 37, 29)).astype(np.float32)
    probabilities = sliding_window_inference(image, model, patch_size=(16, 9), num_classes=2, overlap=overlap)
    assert probabilities.shape == (2, 37, 29)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 2), rtol=0, atol=1e-5)


def test_single_logit_gives_sigmoid_probabilities():
    model = pointwise_model(3, in_channels=1, num_classes=1)
    image = torch.randn(1, 13, 10, 9)
    probabilities = sliding_window_inference(image, model, patch_size=(6, 6, 6), num_classes=1)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 1), rtol=0, atol=1e-5)


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    model = pointwise_model(3, in_channels=2, num_classes=3)
    image = torch.randn(2, 5, 12, 7)
    calls = []

    def predict(batch):
        calls.append(batch.clone())
        return model(batch)

    probabilities = sliding_window_inference(image, predict, patch_size=(8, 8, 8), num_classes=3)
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
        image, predict, patch_size=(8, 8, 8), num_classes=3, batch_size=100, mirror_axes=(0, 1, 2)
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

    probabilities = sliding_window_inference(image, predict, patch_size=(9, 12), num_classes=2, mirror_axes=(1,))
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

    probabilities = sliding_window_inference(image, predict, patch_size=(1, 8), num_classes=2, overlap=0.5)
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
    probabilities = sliding_window_inference(image, model, patch_size=(12, 12, 12), num_classes=2)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image, 2), rtol=0, atol=1e-5)


def test_wrong_predict_output_shape_is_reported():
    with pytest.raises(ValueError, match="predict returned"):
        sliding_window_inference(torch.randn(1, 9, 9), lambda batch: batch, patch_size=(4, 4), num_classes=3)


def previous_sliding_window_inference(image, predict, patch_size, num_classes, overlap=0.5, batch_size=2,
                                      gaussian=True, device=None, accumulate_device=None, mirror_axes=()):
    """The implementation before the volume moved to the device, kept verbatim as the reference:
    windows stacked on the host and copied batch by batch."""
    image = torch.as_tensor(np.array(image, dtype=np.float32)) if isinstance(image, np.ndarray) else image.float()
    device = torch.device(device) if device is not None else image.device
    accumulate_device = torch.device(accumulate_device) if accumulate_device is not None else device
    with torch.inference_mode():
        padded, region = pad_to_patch(image, patch_size)
        spatial = padded.shape[1:]
        if gaussian:
            weight = gaussian_importance_map(patch_size).to(accumulate_device)
        else:
            weight = torch.ones(tuple(patch_size), device=accumulate_device)
        probability_sum = torch.zeros((num_classes, *spatial), dtype=torch.float32, device=accumulate_device)
        weight_sum = torch.zeros(tuple(spatial), dtype=torch.float32, device=accumulate_device)
        starts_per_axis = [window_starts(size, roi, overlap) for size, roi in zip(spatial, patch_size)]
        windows = [
            tuple(slice(start, start + roi) for start, roi in zip(starts, patch_size))
            for starts in itertools.product(*starts_per_axis)
        ]
        for first in range(0, len(windows), batch_size):
            batch_windows = windows[first : first + batch_size]
            batch = torch.stack([padded[(slice(None), *window)] for window in batch_windows])
            probabilities = average_over_flips(predict, batch.to(device), num_classes, mirror_axes)
            probabilities = probabilities.to(accumulate_device)
            for window, window_probabilities in zip(batch_windows, probabilities):
                probability_sum[(slice(None), *window)] += window_probabilities * weight
                weight_sum[window] += weight
        probabilities = probability_sum / weight_sum
        return probabilities[(slice(None), *region)].contiguous()


def contextual_model(spatial_dims, in_channels, num_classes, device):
    """3x3(x3) convolutions: each output voxel sees its neighbours and the zero padding at the window
    border, so the result depends on the tiling, and nothing is symmetric under flips."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    model = torch.nn.Sequential(conv(in_channels, 5, kernel_size=3, padding=1), torch.nn.ReLU(),
                                conv(5, num_classes, kernel_size=3, padding=1))
    return model.to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
@pytest.mark.parametrize("image_on_device", [True, False])
@pytest.mark.parametrize("accumulate_on_device", [True, False])
@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("shape, patch_size, num_classes", [
    ((2, 11, 14, 9), (6, 9, 5), 3),  # odd sizes, three windows per axis
    ((1, 5, 12, 7), (8, 8, 8), 2),  # smaller than the window along two axes
    ((1, 37, 29), (16, 9), 1),  # 2D, one sigmoid logit
    ((2, 7, 30), (9, 8), 3),  # 2D, smaller than the window along the first axis
])
def test_matches_the_previous_implementation_for_every_setting(device, batch_size, image_on_device,
                                                                 accumulate_on_device, mirror, shape, patch_size,
                                                                 num_classes):
    spatial_dims = len(patch_size)
    model = contextual_model(spatial_dims, shape[0], num_classes, device)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mirror_axes = tuple(range(spatial_dims)) if mirror else ()
    host = torch.device("cpu")
    expected = previous_sliding_window_inference(image, model, patch_size, num_classes, batch_size=batch_size,
                                                 device=device, accumulate_device=host, mirror_axes=mirror_axes)
    probabilities = sliding_window_inference(
        image, model, patch_size=patch_size, num_classes=num_classes, batch_size=batch_size, device=device,
        image_device=device if image_on_device else host, accumulate_device=device if accumulate_on_device else host,
        mirror_axes=mirror_axes)
    assert probabilities.shape == (num_classes, *shape[1:])
    assert probabilities.device.type == (device if accumulate_on_device else "cpu")
    torch.testing.assert_close(probabilities.cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_input_and_automatic_placement_match_the_previous_implementation(device):
    model = contextual_model(3, 1, 3, device)
    image = torch.randn(1, 23, 17, 20)
    expected = previous_sliding_window_inference(image, model, (9, 9, 9), 3, batch_size=3, device=device)
    probabilities = sliding_window_inference(image, model, patch_size=(9, 9, 9), num_classes=3, batch_size=3,
                                             device=device)
    torch.testing.assert_close(probabilities.cpu(), expected.cpu(), rtol=0, atol=1e-5)


def test_place_buffers_puts_the_sums_first_and_keeps_half_for_the_forward_passes():
    # A 500x512x512 CT with 3 classes: 2 GiB of sums (probabilities + weights), 0.5 GiB of image.
    voxels = 500 * 512 * 512
    sizes = dict(image_bytes=4 * voxels, accumulator_bytes=4 * 4 * voxels)
    assert place_buffers(**sizes, available_bytes=40 * GIB) == (True, True)
    assert place_buffers(**sizes, available_bytes=5 * GIB) == (True, True)  # 2.5 GiB of buffers in 5
    assert place_buffers(**sizes, available_bytes=4.5 * GIB) == (True, False)
    assert place_buffers(**sizes, available_bytes=4 * GIB) == (True, False)  # the sums alone fill the half
    assert place_buffers(**sizes, available_bytes=3 * GIB) == (False, True)
    assert place_buffers(**sizes, available_bytes=GIB // 2) == (False, False)


def test_available_memory_counts_what_pytorch_holds_reserved_but_unused(monkeypatch):
    # After training, PyTorch's cache holds most of an 80 GB GPU: the driver reports 2 GiB free, yet
    # 40 GiB of the 60 GiB reserved are unused and can take the sums of a big CT.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * GIB)
    available = available_memory(torch.device("cuda"))
    assert available == 42 * GIB
    voxels = 500 * 512 * 512
    assert place_buffers(image_bytes=4 * voxels, accumulator_bytes=16 * voxels, available_bytes=available) == (
        True, True)
    # The driver's figure alone would have sent the sums to host memory.
    accumulate_on_device, _ = place_buffers(image_bytes=4 * voxels, accumulator_bytes=16 * voxels,
                                            available_bytes=2 * GIB)
    assert not accumulate_on_device


def test_default_window_batch_size_fills_a_gpu_and_stays_small_on_a_cpu():
    cuda = torch.device("cuda")
    assert default_window_batch_size(torch.device("cpu"), (128, 128, 128)) == 2
    assert default_window_batch_size(torch.device("cpu"), (16, 16)) == 2
    assert default_window_batch_size(cuda, (128, 128, 128)) == 4
    assert default_window_batch_size(cuda, (96, 96, 96)) == 9
    assert default_window_batch_size(cuda, (64, 64, 64)) == 32
    assert default_window_batch_size(cuda, (512, 512)) == 32
    assert default_window_batch_size(cuda, (256, 256, 256)) == 1


def test_copy_to_device_leaves_a_tensor_already_there_alone():
    tensor = torch.randn(3, 5)
    assert copy_to_device(tensor, torch.device("cpu")) is tensor


def test_batch_size_below_one_is_reported():
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_inference(torch.randn(1, 9, 9), lambda batch: batch, patch_size=(4, 4), num_classes=1,
                                 batch_size=0)


def test_trained_flips_are_the_axes_training_mirrored():
    assert trained_flips({"mirror_axes": [0, 1, 2], "p_mirror": 0.5}, 3) == (0, 1, 2)
    assert trained_flips({"mirror_axes": [2], "p_mirror": 0.5}, 3) == (2,)
    assert trained_flips({"mirror_axes": [0, 1, 2], "p_mirror": 0.0}, 3) == ()
    assert trained_flips({"flip_axes": [1], "p_flip": 0.5}, 2) == (1,)
    assert trained_flips({}, 2) == ()
