"""Binary cross-entropy for one logit per sample or voxel, with integer {0, 1} targets."""

import torch
import torch.nn.functional as F
from torch import nn


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, computed in float32 even under autocast.

    Args:
        pos_weight: weight of the positive class (e.g. negatives / positives, to balance a rare
            finding); None weighs both classes equally.

    Shapes:
        logits (B, 1, *spatial) (also (B, 1) for image-level labels); target (B, *spatial) integer
        in {0, 1}. Returns a float32 scalar (mean over all elements).
    """

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"BCELoss expects one logit channel, got {logits.shape[1]}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
            return F.binary_cross_entropy_with_logits(logits, target.unsqueeze(1).float(), pos_weight=pos_weight)
