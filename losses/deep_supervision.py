"""Deep supervision: one loss on each output of a U-Net decoder, weighted and summed."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: halve at each lower resolution, zero for the lowest, normalised to sum 1.

    The lowest output is too coarse to carry useful supervision, but it stays in the graph (with weight
    0) so DistributedDataParallel still sees a gradient for every parameter.
    """
    weights = [0.5**level for level in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [weight / total for weight in weights]


def downsample_target(target: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Integer labels (B, *spatial) at the voxels of a lower U-Net output (B, K, *size), never mixing classes.

    An axis that a level's strides reduce by f in total (their product: 2^k when halved k times, 1
    when never downsampled, as z of thick slices) has ceil(n / f) voxels there, the i-th centred on
    input voxel f * i (odd kernels padded by kernel // 2). f is the power of two that gives that size,
    so the labels are read at every f-th voxel, at odd sizes too. A size no power of two explains
    falls back to nearest-neighbour resizing.
    """
    if tuple(target.shape[1:]) == tuple(size):
        return target
    factors = [stride_factor(full, reduced) for full, reduced in zip(target.shape[1:], size)]
    if None not in factors:
        return target[(slice(None), *(slice(None, None, factor) for factor in factors))].contiguous()
    resized = F.interpolate(target.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return resized.squeeze(1).to(target.dtype)


def stride_factor(full: int, reduced: int) -> int | None:
    """The power of two f with ceil(full / f) == reduced, or None."""
    factor = 1
    while math.ceil(full / factor) > reduced:
        factor *= 2
    return factor if math.ceil(full / factor) == reduced else None


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss_fn` over a list of logits [full, 1/2, 1/4, ...] (see UNet).

    Args:
        loss_fn: loss taking (logits (B, K, *spatial), target (B, *spatial)), e.g. DiceCELoss().
        weights: one weight per output; None uses deep_supervision_weights(len(outputs)).

    Shapes:
        outputs: a list of logits (B, K, *spatial_i), or a single tensor (then loss_fn alone, so the
        same loss serves the model in eval mode); target (B, *spatial) integer at full resolution.
    """

    def __init__(self, loss_fn: nn.Module, weights: list[float] | None = None):
        super().__init__()
        self.loss_fn = loss_fn
        self.weights = weights

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss_fn(outputs, target)
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
        total = 0.0
        for weight, logits in zip(weights, outputs):
            total = total + weight * self.loss_fn(logits, downsample_target(target, logits.shape[2:]))
        return total
