"""Sliding-window inference: predict a whole volume (or image) with a network trained on patches.

Windows of `patch_size` tile the volume with overlap; each window's probabilities are weighted by a
Gaussian importance map (the network sees less context near a window's border, so it is less reliable
there) and averaged. Works for 2D (C, H, W) and 3D (C, D, H, W) inputs.

    with torch.autocast(device.type, dtype=torch.bfloat16):
        probabilities = sliding_window_inference(image, model, patch_size=(96, 96, 96), num_classes=3,
                                                 device=device, batch_size=4)  # (3, D, H, W)
    segmentation = probabilities.argmax(0)

On a GPU the work stays on the GPU: the padded volume is copied there once (when it fits) and the
windows are cut there, so the GPU never waits for the CPU to stack and copy a batch; the float32
sums live there too unless they would crowd out the forward passes (`place_buffers`).
"""

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Separable Gaussian centred on the window, maximum 1, as nnU-Net.

    Args:
        patch_size: window size (*patch_size).
        sigma_scale: standard deviation as a fraction of the window size along each axis.

    Returns:
        float32 (*patch_size), symmetric under flips, clamped to at least 1e-6 so every voxel a window
        covers gets a positive weight (no division by zero where only window corners reach).
    """
    importance = torch.ones((), dtype=torch.float64)
    for size in patch_size:
        coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = size * sigma_scale
        importance = importance.unsqueeze(-1) * torch.exp(-(coordinates**2) / (2 * sigma**2))
    importance = importance / importance.max()
    return importance.float().clamp_min(1e-6)


def window_starts(size: int, length: int, overlap: float) -> list[int]:
    """Starts of windows of `length` covering [0, size), stepping length * (1 - overlap), the last
    window aligned to the end."""
    step = max(1, int(length * (1 - overlap)))
    starts = list(range(0, size - length + 1, step))
    if starts[-1] != size - length:
        starts.append(size - length)
    return starts


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of image (C, *spatial) up to patch_size, evenly on both sides, with each
    channel's minimum (the background intensity after normalisation, not an artificial 0).

    Returns the padded image and the slices (*spatial) that cut the original region back out.
    """
    spatial = image.shape[1:]
    padded_shape = [max(size, patch) for size, patch in zip(spatial, patch_size)]
    if list(spatial) == padded_shape:
        return image, tuple(slice(0, size) for size in spatial)
    channel_minimum = image.flatten(1).amin(dim=1)
    padded = channel_minimum.view(-1, *[1] * len(spatial)).expand(-1, *padded_shape).clone()
    region = tuple(slice((padded_size - size) // 2, (padded_size - size) // 2 + size)
                   for size, padded_size in zip(spatial, padded_shape))
    padded[(slice(None), *region)] = image
    return padded, region


def average_over_flips(
    predict: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, num_classes: int, mirror_axes: Sequence[int]
) -> torch.Tensor:
    """Mean float32 probabilities (B, K, *patch_size) of `predict` over every combination of flips of
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


def trained_flips(augment: Mapping, spatial_dims: int) -> tuple[int, ...]:
    """Spatial axes the model saw flipped in training, for test-time mirroring: mirroring along any
    other axis would show it images it never learned (an atrium on the wrong side).

    Args:
        augment: the training augmentation settings as a dict (a recipe's ``augment`` config field):
            ``mirror_axes``/``p_mirror`` in 3D, ``flip_axes``/``p_flip`` in 2D.
        spatial_dims: 2 or 3.
    """
    axes, chance = ("mirror_axes", "p_mirror") if spatial_dims == 3 else ("flip_axes", "p_flip")
    return tuple(augment.get(axes, ())) if augment.get(chance, 0) > 0 else ()


def default_window_batch_size(device: torch.device, patch_size: Sequence[int]) -> int:
    """Windows per forward pass when none is chosen.

    On a GPU about 2^23 voxels per forward (4 windows of 128^3, 9 of 96^3, at most 32): enough work per
    call to keep it busy between the Python steps, and in inference mode far less memory than the
    training step the same GPU just ran. Elsewhere 2: a CPU gains nothing from bigger batches and
    every window adds its activations to host memory.
    """
    if device.type != "cuda":
        return 2
    return max(1, min(32, 2**23 // math.prod(patch_size)))


def available_memory(device: torch.device) -> int:
    """Bytes of a CUDA device that new tensors can take: what the driver reports free plus what
    PyTorch's caching allocator holds reserved but unused. ``torch.cuda.mem_get_info`` alone counts
    that cache as taken, and after a training epoch it holds most of the GPU."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def place_buffers(*, image_bytes: int, accumulator_bytes: int, available_bytes: int) -> tuple[bool, bool]:
    """Whether the float32 sums, then the padded image, go on the accelerator.

    Together they may take half of ``available_bytes``; the other half is left for the forward
    passes of a batch of windows and for the final normalisation and argmax. The sums come first:
    kept in host memory they cost a device-to-host copy and CPU additions for every window, while a
    host image only costs one asynchronous copy of each batch of windows.

    Args:
        image_bytes: the padded image, C * prod(spatial) * 4.
        accumulator_bytes: probability and weight sums, (K + 1) * prod(spatial) * 4.
        available_bytes: e.g. `available_memory(device)`.

    Returns:
        (accumulate on the device, image on the device).
    """
    budget = available_bytes // 2
    accumulate_on_device = accumulator_bytes <= budget
    if accumulate_on_device:
        budget -= accumulator_bytes
    return accumulate_on_device, image_bytes <= budget


def copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a copy to CUDA does not block the CPU (a host source is pinned first:
    from pageable memory the copy would be synchronous). A copy to the host blocks, since the CPU
    reads the result next."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=device.type == "cuda")


def _host_tensor(image: torch.Tensor | np.ndarray, pin: bool) -> torch.Tensor:
    """float32 tensor of image; an array (e.g. memory-mapped) is read once, straight into pinned
    memory when ``pin``."""
    if isinstance(image, np.ndarray):
        tensor = torch.empty(image.shape, dtype=torch.float32, pin_memory=pin)
        tensor.numpy()[...] = image
        return tensor
    return image.float()


def sliding_window_inference(
    image: torch.Tensor | np.ndarray,
    predict: Callable[[torch.Tensor], torch.Tensor],
    *,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    gaussian: bool = True,
    device: torch.device | str | None = None,
    image_device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Average the probabilities of overlapping windows over a whole image.

    Runs under torch.inference_mode(); wrap the call in torch.autocast to predict in reduced precision
    (probabilities are always accumulated in float32). Copies to a CUDA device do not block the CPU,
    so it queues the next windows while the GPU computes; with the sums in host memory each batch's
    probabilities are read back before the next batch is queued.

    Args:
        image: (C, *spatial) float tensor or array (a memory-mapped array is read once).
        predict: maps a batch (B, C, *patch_size) on `device` to logits (B, num_classes, *patch_size),
            typically the model in eval mode.
        patch_size: window size, one entry per spatial dim; images smaller than it are padded with each
            channel's minimum and the result cropped back.
        num_classes: K, the logit channels; K = 1 means one sigmoid logit.
        overlap: fraction of a window shared with the next one along each axis, in [0, 1).
        batch_size: windows per call to predict (see `default_window_batch_size`).
        gaussian: weight windows with gaussian_importance_map (else uniformly).
        device: where predict runs; None means where the image is (CPU for arrays).
        image_device: where the padded image lives while windows are cut from it.
        accumulate_device: where the (K, *spatial) float32 sums live.
            None for either: `device`, except on CUDA where `place_buffers` decides from
            `available_memory` (host memory for what does not fit).
        mirror_axes: spatial axes (0 = first spatial dim) to mirror for test-time augmentation; every
            combination of flips is predicted (2^len(mirror_axes) calls per batch) and averaged.

    Returns:
        float32 (K, *spatial) probabilities (softmax, or sigmoid when K = 1) on accumulate_device.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(patch_size) != image.ndim - 1:
        raise ValueError(f"patch_size {tuple(patch_size)} does not match image spatial shape {tuple(image.shape[1:])}")
    source_device = image.device if isinstance(image, torch.Tensor) else torch.device("cpu")
    device = torch.device(device) if device is not None else source_device
    if image_device is None or accumulate_device is None:
        on_device = (True, True)
        if device.type == "cuda":
            voxels = math.prod(max(size, patch) for size, patch in zip(image.shape[1:], patch_size))
            on_device = place_buffers(image_bytes=4 * image.shape[0] * voxels,
                                      accumulator_bytes=4 * (num_classes + 1) * voxels,
                                      available_bytes=available_memory(device))
        host = torch.device("cpu")
        accumulate_device = accumulate_device if accumulate_device is not None else (device if on_device[0] else host)
        image_device = image_device if image_device is not None else (device if on_device[1] else host)
    image_device, accumulate_device = torch.device(image_device), torch.device(accumulate_device)

    with torch.inference_mode():
        image = _host_tensor(image, pin=image_device.type == "cuda" and source_device.type == "cpu")
        image = copy_to_device(image, image_device)
        padded, region = pad_to_patch(image, patch_size)
        del image  # only the padded image is read from here on; a large unpadded copy is freed now
        spatial = padded.shape[1:]
        if gaussian:
            weight = gaussian_importance_map(patch_size).to(accumulate_device)
        else:
            weight = torch.ones(tuple(patch_size), device=accumulate_device)
        probability_sum = torch.zeros((num_classes, *spatial), dtype=torch.float32, device=accumulate_device)
        weight_sum = torch.zeros(tuple(spatial), dtype=torch.float32, device=accumulate_device)

        starts_per_axis = [window_starts(size, patch, overlap) for size, patch in zip(spatial, patch_size)]
        windows = [
            tuple(slice(start, start + patch) for start, patch in zip(starts, patch_size))
            for starts in itertools.product(*starts_per_axis)
        ]
        # Host windows for CUDA are stacked straight into pinned memory, so the copy does not block.
        pin = padded.device.type == "cpu" and device.type == "cuda"
        for first in range(0, len(windows), batch_size):
            batch_windows = windows[first : first + batch_size]
            crops = [padded[(slice(None), *window)] for window in batch_windows]
            batch = torch.empty((len(crops), *crops[0].shape), dtype=padded.dtype, device=padded.device,
                                pin_memory=pin)
            torch.stack(crops, out=batch)
            probabilities = average_over_flips(predict, copy_to_device(batch, device), num_classes, mirror_axes)
            probabilities = probabilities.to(accumulate_device)
            for window, window_probabilities in zip(batch_windows, probabilities):
                probability_sum[(slice(None), *window)] += window_probabilities * weight
                weight_sum[window] += weight

        # In place: a second (K, *spatial) buffer could be what no longer fits.
        probabilities = probability_sum.div_(weight_sum)
        del weight_sum
        # contiguous() copies only when padding was cropped away, releasing the padded buffer.
        return probabilities[(slice(None), *region)].contiguous()
