import pytest
import torch

from losses import DeepSupervisionLoss
from losses.deep_supervision import deep_supervision_weights


class MeanTarget(torch.nn.Module):
    """A loss easy to predict by hand: mean(logits) + 10 * mean(target)."""

    def forward(self, logits, target):
        return logits.float().mean() + 10 * target.float().mean()


def test_weights_halve_and_lowest_is_zero():
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0])
    assert deep_supervision_weights(1) == [1.0]


def test_weighted_sum_with_nearest_downsampled_target():
    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, :4] = 1  # the first half of the z axis is class 1 at every resolution
    outputs = [torch.full((2, 3, 8, 8, 8), 1.0), torch.full((2, 3, 4, 4, 4), 2.0), torch.full((2, 3, 2, 2, 2), 3.0)]
    loss = DeepSupervisionLoss(MeanTarget())(outputs, target)
    # every target mean is 0.5 -> each term is value + 5; weights 2/3, 1/3, 0
    assert loss.item() == pytest.approx(2 / 3 * 6 + 1 / 3 * 7)


def test_target_downsampling_picks_every_other_voxel():
    seen = []

    class Record(torch.nn.Module):
        def forward(self, logits, target):
            seen.append(target)
            return logits.sum() * 0

    target = torch.arange(6 * 4).reshape(1, 6, 4) % 5
    DeepSupervisionLoss(Record(), weights=[0.5, 0.5])([torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 3, 2)], target)
    assert torch.equal(seen[1], target[:, ::2, ::2])
    assert seen[1].dtype == target.dtype


def test_single_tensor_falls_back_to_the_plain_loss():
    logits = torch.full((1, 2, 4, 4), 3.0)
    target = torch.ones(1, 4, 4, dtype=torch.long)
    assert DeepSupervisionLoss(MeanTarget())(logits, target).item() == pytest.approx(13.0)
