"""Soft Dice loss, alone or added to cross-entropy, for logits (B, K, *spatial) and integer labels.

Both are computed in float32 even under autocast: the sums over a whole 3D patch lose too many digits
in bfloat16/float16, and the softmax of large logits overflows in float16.
"""

import torch
import torch.nn.functional as F
from torch import nn


class DiceLoss(nn.Module):
    """1 - mean soft Dice over classes (and over samples unless batch_dice), as in nnU-Net.

    For each class k, Dice = (2 sum(p_k t_k) + smooth) / (sum(p_k) + sum(t_k) + smooth), with p the
    softmax (or sigmoid) probabilities and t the one-hot target; `smooth` keeps a class absent from
    both target and prediction finite (it then scores ~1 if the prediction is ~0 there).

    Args:
        include_background: keep class 0 in the mean (softmax only). Off by default because the
            background dominates every patch and would make the loss look good while missing organs.
        batch_dice: sum over the whole batch before dividing, i.e. treat the batch as one big sample
            (nnU-Net does this for 3D full resolution: small structures absent from one patch then
            do not give that sample a 0 Dice).
        smooth: added to numerator and denominator.
        activation: "softmax" for logits (B, K, *spatial) with K >= 2 and targets in [0, K);
            "sigmoid" for one logit (B, 1, *spatial) and targets in {0, 1}.

    Shapes:
        logits (B, K, *spatial) any float dtype; target (B, *spatial) integer. Returns a float32 scalar.
    """

    def __init__(
        self,
        include_background: bool = False,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        activation: str = "softmax",
    ):
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.activation = activation

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.long().unsqueeze(1)  # (B, 1, *spatial)
            if self.activation == "sigmoid":
                if logits.shape[1] != 1:
                    raise ValueError(f"sigmoid Dice expects one logit channel, got {logits.shape[1]}")
                probabilities = torch.sigmoid(logits)
                one_hot = target.float()
            else:
                probabilities = torch.softmax(logits, dim=1)
                one_hot = torch.zeros_like(probabilities).scatter_(1, target, 1.0)
                if not self.include_background:
                    probabilities = probabilities[:, 1:]
                    one_hot = one_hot[:, 1:]

            sum_dims = tuple(range(2, logits.ndim))
            if self.batch_dice:
                sum_dims = (0, *sum_dims)
            intersection = (probabilities * one_hot).sum(sum_dims)
            denominator = probabilities.sum(sum_dims) + one_hot.sum(sum_dims)
            dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
            return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * soft Dice loss (softmax), nnU-Net's default loss.

    Cross-entropy gives well-scaled gradients everywhere from the first step; Dice counters the class
    imbalance of small organs and tumours against the background.

    Args:
        ce_weight: weight of the cross-entropy term (mean over voxels).
        dice_weight: weight of the Dice term.
        include_background: passed to DiceLoss (cross-entropy always includes every class).
        batch_dice: passed to DiceLoss.

    Shapes:
        logits (B, K, *spatial) with K >= 2; target (B, *spatial) integer in [0, K). Returns a float32 scalar.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = False,
    ):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.dice = DiceLoss(include_background=include_background, batch_dice=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cross_entropy = F.cross_entropy(logits.float(), target.long())
            return self.ce_weight * cross_entropy + self.dice_weight * self.dice(logits, target)
