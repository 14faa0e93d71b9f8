import numpy as np
import torch

from engine.slicewise import predict_volume_slicewise


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
