import math

import pytest
import torch

from losses import BCELoss


def test_bce_matches_hand_computation_with_pos_weight():
    logit_values = [0.3, -1.2, 2.0]
    targets = [1, 0, 1]
    logits = torch.tensor(logit_values).reshape(1, 1, 3)
    target = torch.tensor(targets).reshape(1, 3)
    expected = 0.0
    for v, t in zip(logit_values, targets):
        p = 1 / (1 + math.exp(-v))
        expected -= 2.5 * t * math.log(p) + (1 - t) * math.log(1 - p)
    expected /= 3
    assert BCELoss(pos_weight=2.5)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_bce_image_level_labels_and_float32_under_autocast():
    linear = torch.nn.Linear(4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(torch.randn(5, 4))  # (B, 1)
        loss = BCELoss()(logits, torch.tensor([0, 1, 1, 0, 1]))
    assert loss.dtype == torch.float32


def test_bce_rejects_several_channels():
    with pytest.raises(ValueError):
        BCELoss()(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_bce_dice_is_the_sum_of_its_terms():
    from losses import BCEDiceLoss, BCELoss, DiceLoss

    logits = torch.randn(3, 1, 7, 9)
    target = (torch.rand(3, 7, 9) > 0.7).long()
    expected = BCELoss()(logits, target) + DiceLoss(batch_dice=True, activation="sigmoid")(logits, target)
    torch.testing.assert_close(BCEDiceLoss()(logits, target), expected)
