"""Prediction of a 2D model over a volume: every slice along an axis predicted, the label maps stacked.

Slices are fitted to the network exactly as in training (`data/augment2d.py`'s coordinate map):
"resize" resamples the whole slice to the network's size and the probabilities back to the slice's
grid; "crop" tiles the full-resolution slice with a sliding window. The stacked volume is scored by
`engine/evaluate.py`'s `evaluate_slicewise`.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data.augment2d import SpatialTransform2D, fit_scale, make_coordinate_map_2d
from engine.inference import copy_to_device, sliding_window_inference


def _normalised_grid(coordinates: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """(2, H, W) pixel coordinates (row, column) -> (1, H, W, 2) grid_sample grid (x, y) in [-1, 1]."""
    rows = 2 * coordinates[0] / max(input_size[0] - 1, 1) - 1
    columns = 2 * coordinates[1] / max(input_size[1] - 1, 1) - 1
    return torch.from_numpy(np.stack([columns, rows], axis=-1)[None].astype(np.float32))


def _resize_probabilities(predict: Callable, slices: torch.Tensor, image_size: tuple[int, int],
                          num_classes: int, fill: torch.Tensor) -> torch.Tensor:
    """Probabilities (S, K, H_in, W_in) of slices (S, C, H_in, W_in) fitted by resizing (aspect kept)."""
    input_size = tuple(slices.shape[2:])
    forward = _normalised_grid(make_coordinate_map_2d(image_size, input_size, SpatialTransform2D(), "resize"),
                               input_size).to(slices.device).expand(len(slices), -1, -1, -1)
    fill = fill.view(1, -1, 1, 1)
    # Outside the slice the network saw each channel's background value in training, not zeros.
    fitted = F.grid_sample(slices - fill, forward, mode="bilinear", padding_mode="zeros", align_corners=True) + fill
    logits = predict(fitted).float()
    probabilities = torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=1)
    # Back to the slice grid: each slice pixel sits at (p - centre) / scale + output centre.
    factor = fit_scale(input_size, image_size, "resize")
    back = [((np.arange(size_in) - (size_in - 1) / 2) / factor + (size_out - 1) / 2).astype(np.float32)
            for size_in, size_out in zip(input_size, image_size)]
    inverse = _normalised_grid(np.stack(np.meshgrid(*back, indexing="ij")), image_size)
    inverse = inverse.to(slices.device).expand(len(slices), -1, -1, -1)
    return F.grid_sample(probabilities, inverse, mode="bilinear", padding_mode="border", align_corners=True)


def num_outputs(labels: dict[int, str]) -> int:
    """Logits of a 2D recipe's U-Net: one sigmoid logit for a single foreground class (left atrium,
    tumour), else one per class, background included."""
    return 1 if len(labels) == 2 else len(labels)


@torch.inference_mode()
def predict_volume_slicewise(model, image: np.ndarray, *, axis: int, image_size: tuple[int, int], fit: str,
                             num_classes: int, device: torch.device, amp_dtype: torch.dtype | None,
                             batch_size: int = 16) -> np.ndarray:
    """Label map of a preprocessed volume, predicted one slice at a time along `axis`.

    Args:
        image: (C, Z, Y, X) float32 on the preprocessed grid.
        axis: spatial axis of the slices (0 = z).
        num_classes: model outputs; 1 means one sigmoid logit (foreground where > 0.5).

    Returns:
        (Z, Y, X) uint8 class indices.
    """
    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(batch)

    volume = torch.from_numpy(np.moveaxis(np.asarray(image, dtype=np.float32), axis + 1, 0).copy())  # (S, C, H, W)
    fill = volume.transpose(0, 1).flatten(1).amin(1).to(device)  # (C,) each channel's background value
    predicted = []
    for first in range(0, len(volume), batch_size):
        slices = copy_to_device(volume[first:first + batch_size], device)
        if fit == "resize":
            probabilities = _resize_probabilities(predict, slices, image_size, num_classes, fill)
        else:
            probabilities = torch.stack([sliding_window_inference(one, predict, patch_size=image_size,
                                                                  num_classes=num_classes, overlap=0.25,
                                                                  batch_size=batch_size)
                                         for one in slices])
        if num_classes == 1:
            predicted.append((probabilities[:, 0] > 0.5).to(torch.uint8).cpu())
        else:
            predicted.append(probabilities.argmax(1).to(torch.uint8).cpu())
    return np.moveaxis(torch.cat(predicted).numpy(), 0, axis)
