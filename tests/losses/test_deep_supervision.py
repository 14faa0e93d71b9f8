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


def record_targets(outputs, target) -> list[torch.Tensor]:
    """The targets DeepSupervisionLoss hands its loss for each output."""
    seen = []

    class Record(torch.nn.Module):
        def forward(self, logits, target):
            seen.append(target)
            return logits.sum() * 0

    DeepSupervisionLoss(Record(), weights=[1.0] * len(outputs))(outputs, target)
    return seen


def test_an_axis_that_is_not_downsampled_keeps_every_voxel():
    # Thick slices: the lower outputs keep all 5 slices while y and x halve.
    target = torch.randint(0, 4, (2, 5, 8, 6))
    outputs = [torch.zeros(2, 3, 5, 8, 6), torch.zeros(2, 3, 5, 4, 3), torch.zeros(2, 3, 3, 2, 2)]
    seen = record_targets(outputs, target)
    assert torch.equal(seen[1], target[:, :, ::2, ::2])
    assert torch.equal(seen[2], target[:, ::2, ::4, ::4])


def test_odd_sizes_pick_the_voxels_the_strided_convolutions_are_centred_on():
    # A stride-2 convolution (kernel 3, padding 1) turns 33 voxels into 17, the i-th centred on voxel
    # 2i; two of them turn 9 into 3, centred on 4i. Nearest-neighbour resizing would take voxel 1 for
    # output 1 (floor(33 / 17)).
    target = torch.arange(33 * 9).reshape(1, 33, 9) % 7
    seen = record_targets([torch.zeros(1, 2, 33, 9), torch.zeros(1, 2, 17, 5), torch.zeros(1, 2, 9, 3)], target)
    assert torch.equal(seen[1], target[:, ::2, ::2])
    assert torch.equal(seen[2], target[:, ::4, ::4])
    convolution = torch.nn.Conv1d(1, 1, kernel_size=3, stride=2, padding=1, bias=False)
    torch.nn.init.constant_(convolution.weight, 0)
    with torch.no_grad():
        convolution.weight[0, 0, 1] = 1  # the centre tap: the output is the voxel it is centred on
    line = target[0, :, 0].float()
    assert torch.equal(convolution(line[None, None])[0, 0], seen[1][0, :, 0].float())


def test_targets_match_the_outputs_of_a_thick_slice_unet():
    from models import UNet

    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=4, deep_supervision=True,
                 strides=((1, 2, 2), (1, 2, 2), (2, 2, 2)), kernel_sizes=((1, 3, 3),) * 2 + ((3, 3, 3),) * 2)
    target = torch.randint(0, 3, (2, 7, 21, 19))
    outputs = model(torch.randn(2, 1, 7, 21, 19))
    seen = record_targets(outputs, target)
    assert [tuple(t.shape[1:]) for t in seen] == [(7, 21, 19), (7, 11, 10), (7, 6, 5)]
    assert torch.equal(seen[2], target[:, :, ::4, ::4])
