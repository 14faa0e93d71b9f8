import pytest
import torch

from engine.optim import build_optimizer


def small_model():
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, bias=False), torch.nn.GroupNorm(4, 4),
                               torch.nn.Conv3d(4, 2, 1))


def test_sgd_is_nesterov_with_the_given_momentum_and_l2_penalty():
    model = small_model()
    optimizer, scheduler = build_optimizer(model.parameters(), "sgd", lr=0.01, momentum=0.99, weight_decay=3e-5,
                                           schedule="poly", total_steps=10, warmup_steps=0)
    assert type(optimizer) is torch.optim.SGD
    group, = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    # One group: every parameter decays, the normalisation's weight and bias and the head's bias included.
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)


def test_adamw_with_cosine_starts_the_warm_up_and_ignores_momentum():
    model = small_model()
    optimizer, scheduler = build_optimizer(model.parameters(), "adamw", lr=3e-3, momentum=0.99, weight_decay=1e-4,
                                           schedule="cosine", total_steps=20, warmup_steps=5)
    assert type(optimizer) is torch.optim.AdamW
    group, = optimizer.param_groups
    assert group["weight_decay"] == 1e-4 and "momentum" not in group
    assert group["initial_lr"] == 3e-3 and group["lr"] == pytest.approx(3e-3 / 5)  # the first warm-up step
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)


def test_poly_reaches_zero_at_the_total_steps():
    optimizer, scheduler = build_optimizer(small_model().parameters(), "sgd", lr=0.01, momentum=0.9,
                                           weight_decay=0.0, schedule="poly", total_steps=4, warmup_steps=100)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup_steps is the cosine schedule's: poly starts at the full rate.
    assert rates == pytest.approx([0.01 * (1 - step / 4) ** 0.9 for step in range(5)], abs=1e-12)


def test_unknown_names_stop_with_the_flag_and_the_choices():
    parameters = list(small_model().parameters())
    with pytest.raises(SystemExit, match="--optimizer adam: choose sgd or adamw"):
        build_optimizer(parameters, "adam", lr=1e-3, weight_decay=0.0, schedule="cosine", total_steps=10,
                        warmup_steps=1)
    with pytest.raises(SystemExit, match="--schedule step: choose poly or cosine"):
        build_optimizer(parameters, "sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="step", total_steps=10,
                        warmup_steps=1)


def test_parameter_groups_keep_their_own_learning_rates_under_the_schedule():
    model = small_model()
    parameters = list(model.parameters())
    groups = [{"params": parameters[:1], "lr": 1e-3}, {"params": parameters[1:], "lr": 1e-4}]
    optimizer, scheduler = build_optimizer(groups, "adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine",
                                           total_steps=10, warmup_steps=2)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 5e-5])  # first warm-up step
