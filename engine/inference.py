"""Sliding-window inference: predict a whole volume (or image) with a network trained on patches.

Windows of `roi_size` tile the volume with overlap; each window's probabilities are weighted by a
Gaussian importance map (the network sees less context near a window's border, so it is less reliable
there) and averaged. Works for 2D (C, H, W) and 3D (C, D, H, W) inputs.

    with torch.autocast(device.type, dtype=torch.bfloat16):
        probabilities = sliding_window_inference(image, model, roi_size=(96, 96, 96), num_classes=3,
                                                 device=device)  # (3, D, H, W)
    segmentation = probabilities.argmax(0)
"""

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Separable Gaussian centred on the window, maximum 1, as nnU-Net.

    Args:
        roi_size: window size (*roi).
        sigma_scale: standard deviation as a fraction of the window size along each axis.

    Returns:
        float32 (*roi), symmetric under flips, clamped to at least 1e-6 so every voxel a window
        covers gets a positive weight (no division by zero where only window corners reach).
    """
    importance = torch.ones((), dtype=torch.float64)
    for size in roi_size:
        coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = size * sigma_scale
        importance = importance.unsqueeze(-1) * torch.exp(-(coordinates**2) / (2 * sigma**2))
    importance = importance / importance.max()
    return importance.float().clamp_min(1e-6)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Starts of windows of length roi covering [0, size), stepping roi * (1 - overlap), the last
    window aligned to the end."""
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def pad_to_roi(image: torch.Tensor, roi_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of image (C, *spatial) up to roi_size, evenly on both sides, with each
    channel's minimum (the background intensity after normalisation, not an artificial 0).

    Returns the padded image and the slices (*spatial) that cut the original region back out.
    """
    spatial = image.shape[1:]
    padded_shape = [max(size, roi) for size, roi in zip(spatial, roi_size)]
    if list(spatial) == padded_shape:
        return image, tuple(slice(0, size) for size in spatial)
    channel_minimum = image.flatten(1).amin(dim=1)
    padded = channel_minimum.view(-1, *[1] * len(spatial)).expand(-1, *padded_shape).clone()
    region = tuple(slice((padded_size - size) // 2, (padded_size - size) // 2 + size)
                   for size, padded_size in zip(spatial, padded_shape))
    padded[(slice(None), *region)] = image
    return padded, region


def predict_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, num_classes: int, mirror_axes: Sequence[int]
) -> torch.Tensor:
    """Mean float32 probabilities (B, K, *roi) of `predict` over every combination of flips of
    mirror_axes (spatial axis indices), each prediction flipped back before averaging."""
    flip_sets = [
        flips for count in range(len(mirror_axes) + 1) for flips in itertools.combinations(mirror_axes, count)
    ]
    total = None
    for flips in flip_sets:
        dims = [2 + axis for axis in flips]
        logits = predict(batch.flip(dims) if dims else batch)
        if logits.shape[:2] != (batch.shape[0], num_classes) or logits.shape[2:] != batch.shape[2:]:
            raise ValueError(
                f"predict returned {tuple(logits.shape)}, expected {(batch.shape[0], num_classes, *batch.shape[2:])}"
            )
        logits = logits.float()
        probabilities = torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=1)
        if dims:
            probabilities = probabilities.flip(dims)
        total = probabilities if total is None else total + probabilities
    return total / len(flip_sets)


def sliding_window_inference(
    image: torch.Tensor | np.ndarray,
    predict: Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    gaussian: bool = True,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Average the probabilities of overlapping windows over a whole image.

    Runs under torch.inference_mode(); wrap the call in torch.autocast to predict in reduced precision
    (probabilities are always accumulated in float32).

    Args:
        image: (C, *spatial) float tensor or array (a memory-mapped array is read once); windows are
            cut where the image lives and moved to `device` batch by batch.
        predict: maps a batch (B, C, *roi_size) on `device` to logits (B, num_classes, *roi_size),
            typically the model in eval mode.
        roi_size: window size, one entry per spatial dim; images smaller than it are padded with each
            channel's minimum and the result cropped back.
        num_classes: K, the logit channels; K = 1 means one sigmoid logit.
        overlap: fraction of a window shared with the next one along each axis, in [0, 1).
        batch_size: windows per call to predict.
        gaussian: weight windows with gaussian_importance_map (else uniformly).
        device: where predict runs; None means where the image is (CPU for arrays).
        accumulate_device: where the (K, *spatial) float32 sums live; None means `device`. Pass "cpu"
            when K * prod(spatial) * 4 bytes does not fit next to the model on the accelerator.
        mirror_axes: spatial axes (0 = first spatial dim) to mirror for test-time augmentation; every
            combination of flips is predicted (2^len(mirror_axes) calls per batch) and averaged.

    Returns:
        float32 (K, *spatial) probabilities (softmax, or sigmoid when K = 1) on accumulate_device.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    image = torch.as_tensor(np.array(image, dtype=np.float32)) if isinstance(image, np.ndarray) else image.float()
    if len(roi_size) != image.ndim - 1:
        raise ValueError(f"roi_size {tuple(roi_size)} does not match image spatial shape {tuple(image.shape[1:])}")
    device = torch.device(device) if device is not None else image.device
    accumulate_device = torch.device(accumulate_device) if accumulate_device is not None else device

    with torch.inference_mode():
        padded, region = pad_to_roi(image, roi_size)
        spatial = padded.shape[1:]
        if gaussian:
            weight = gaussian_importance_map(roi_size).to(accumulate_device)
        else:
            weight = torch.ones(tuple(roi_size), device=accumulate_device)
        probability_sum = torch.zeros((num_classes, *spatial), dtype=torch.float32, device=accumulate_device)
        weight_sum = torch.zeros(tuple(spatial), dtype=torch.float32, device=accumulate_device)

        starts_per_axis = [window_starts(size, roi, overlap) for size, roi in zip(spatial, roi_size)]
        windows = [
            tuple(slice(start, start + roi) for start, roi in zip(starts, roi_size))
            for starts in itertools.product(*starts_per_axis)
        ]
        for first in range(0, len(windows), batch_size):
            batch_windows = windows[first : first + batch_size]
            batch = torch.stack([padded[(slice(None), *window)] for window in batch_windows])
            probabilities = predict_probabilities(predict, batch.to(device), num_classes, mirror_axes)
            probabilities = probabilities.to(accumulate_device)
            for window, window_probabilities in zip(batch_windows, probabilities):
                probability_sum[(slice(None), *window)] += window_probabilities * weight
                weight_sum[window] += weight

        probabilities = probability_sum / weight_sum
        # contiguous() copies only when padding was cropped away, releasing the padded buffer.
        return probabilities[(slice(None), *region)].contiguous()
