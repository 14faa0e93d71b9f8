import math

import pytest
import torch
import torch.nn.functional as F

from losses import DiceCELoss, DiceLoss

SMOOTH = 1e-5


def hand_dice(p, t):
    """Soft Dice of flat lists of probabilities p and binary targets t."""
    intersection = sum(pi * ti for pi, ti in zip(p, t))
    return (2 * intersection + SMOOTH) / (sum(p) + sum(t) + SMOOTH)


def softmax_column(logits):
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


# One sample, 3 classes, 4 voxels (2D 1x4). Logits per voxel, target per voxel.
VOXEL_LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.5]]
VOXEL_TARGETS = [0, 1, 2, 2]


def tiny_batch():
    logits = torch.tensor(VOXEL_LOGITS).T.reshape(1, 3, 1, 4)
    target = torch.tensor(VOXEL_TARGETS).reshape(1, 1, 4)
    return logits, target


def hand_class_dices(classes):
    probabilities = [softmax_column(v) for v in VOXEL_LOGITS]
    return [hand_dice([p[k] for p in probabilities], [float(t == k) for t in VOXEL_TARGETS]) for k in classes]


def test_dice_loss_matches_hand_computation_without_background():
    logits, target = tiny_batch()
    expected = 1 - sum(hand_class_dices([1, 2])) / 2
    assert DiceLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_matches_hand_computation_with_background():
    logits, target = tiny_batch()
    expected = 1 - sum(hand_class_dices([0, 1, 2])) / 3
    assert DiceLoss(include_background=True)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_ce_matches_hand_computation():
    logits, target = tiny_batch()
    probabilities = [softmax_column(v) for v in VOXEL_LOGITS]
    cross_entropy = -sum(math.log(p[t]) for p, t in zip(probabilities, VOXEL_TARGETS)) / 4
    dice_loss = 1 - sum(hand_class_dices([1, 2])) / 2
    loss = DiceCELoss(ce_weight=0.7, dice_weight=1.3)(logits, target)
    assert loss.item() == pytest.approx(0.7 * cross_entropy + 1.3 * dice_loss, rel=1e-6)


def test_batch_dice_sums_over_samples_before_dividing():
    # Sample 0 has class 1 in one voxel, sample 1 none; hard probabilities make the sums integers.
    target = torch.tensor([[1, 0, 0], [0, 0, 0]])  # (B=2, X=3)
    predicted = torch.tensor([[1, 1, 0], [0, 0, 0]])
    logits = F.one_hot(predicted, 2).movedim(-1, 1).float() * 100  # softmax == one-hot to float precision
    # Per sample: dice_0 = 2*1 / (2 + 1), dice_1 = smooth / smooth = 1 -> loss = 1 - (2/3 + 1)/2.
    per_sample = DiceLoss(batch_dice=False)(logits, target).item()
    assert per_sample == pytest.approx(1 - (2 / 3 + 1) / 2, abs=1e-5)
    # Whole batch: 2*1 / (2 + 1).
    assert DiceLoss(batch_dice=True)(logits, target).item() == pytest.approx(1 - 2 / 3, abs=1e-5)


def test_sigmoid_dice_matches_hand_computation():
    logit_values = [1.0, -2.0, 0.5, 3.0, -0.5]
    targets = [1, 0, 0, 1, 1]
    logits = torch.tensor(logit_values).reshape(1, 1, 5)
    target = torch.tensor(targets).reshape(1, 5)
    p = [1 / (1 + math.exp(-v)) for v in logit_values]
    expected = 1 - hand_dice(p, [float(t) for t in targets])
    assert DiceLoss(activation="sigmoid")(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_dice_rejects_several_channels():
    with pytest.raises(ValueError):
        DiceLoss(activation="sigmoid")(torch.randn(1, 2, 5), torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("batch_dice", [False, True])
def test_perfect_prediction_gives_zero_dice_loss(batch_dice):
    target = torch.randint(0, 4, (2, 7, 9, 11))
    logits = F.one_hot(target, 4).movedim(-1, 1).float() * 50
    assert DiceLoss(batch_dice=batch_dice)(logits, target).item() == pytest.approx(0, abs=1e-5)


def test_empty_classes_give_finite_loss_and_gradients():
    # Class 2 is absent from both target and prediction; class 1 absent from the target only.
    target = torch.zeros(2, 5, 7, dtype=torch.long)
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    loss = DiceCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_empty_class_predicted_empty_scores_one():
    target = torch.zeros(1, 5, 7, dtype=torch.long)
    logits = torch.zeros(1, 2, 5, 7)
    logits[:, 0] = 100  # background everywhere, class 1 absent from both
    assert DiceLoss()(logits, target).item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("loss_fn", [DiceLoss(), DiceCELoss(batch_dice=True)])
def test_loss_is_float32_under_bfloat16_autocast(loss_fn):
    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    x = torch.randn(2, 1, 5, 6, 7)
    target = torch.randint(0, 3, (2, 5, 6, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32
    expected = loss_fn(logits.float(), target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_auto_loss_is_dice_for_one_logit_and_cross_entropy_plus_dice_for_several_classes():
    from losses import DiceCELoss, DiceLoss, build_loss

    assert type(build_loss("auto", 1)) is DiceLoss
    assert type(build_loss("auto", 4)) is DiceCELoss
