"""Binary cross-entropy for one logit per sample or voxel, with integer {0, 1} targets."""

import torch
import torch.nn.functional as F
from torch import nn

from losses.dice import DiceLoss


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


class BCEDiceLoss(nn.Module):
    """bce_weight * binary cross-entropy + dice_weight * sigmoid soft Dice, for one logit per voxel.

    Cross-entropy alone on a finding that fills a few pixels learns to predict background; Dice alone
    has weak, noisy gradients early on. Their sum has well-scaled gradients from the first step and
    does not ignore the rare class.

    Args:
        bce_weight, dice_weight: weights of the two terms.
        batch_dice: passed to DiceLoss (sum over the batch, so slices without the finding do not each
            score a Dice of 0).
        pos_weight: passed to BCELoss.

    Shapes:
        logits (B, 1, *spatial); target (B, *spatial) integer in {0, 1}. Returns a float32 scalar.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, batch_dice: bool = True,
                 pos_weight: float | None = None):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.bce = BCELoss(pos_weight=pos_weight)
        self.dice = DiceLoss(batch_dice=batch_dice, activation="sigmoid")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)
