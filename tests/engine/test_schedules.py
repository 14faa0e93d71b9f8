import math

import pytest
import torch

from engine.schedules import cosine_schedule, poly_schedule


def learning_rates(make_schedule, steps, lr=0.1):
    """The learning rate of each of ``steps`` optimizer steps under ``make_schedule(optimizer)``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_schedule(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_poly_falls_from_the_full_rate_to_zero_at_the_last_step_and_stays_there():
    rates = learning_rates(lambda optimizer: poly_schedule(optimizer, total_steps=10), steps=13)
    expected = [0.1 * (1 - step / 10) ** 0.9 for step in range(11)] + [0.0, 0.0]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[0] == 0.1 and rates[5] == pytest.approx(0.1 * 0.5**0.9)


def test_cosine_warms_up_linearly_then_falls_along_half_a_cosine_to_zero():
    rates = learning_rates(lambda optimizer: cosine_schedule(optimizer, total_steps=10, warmup_steps=4), steps=12)
    # The first step already moves (at a quarter of the rate); the full rate is reached at the
    # last warm-up step and held at the first cosine step.
    assert rates[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert rates[7] == pytest.approx(0.05)  # half way through the 6 cosine steps
    assert rates[5] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert rates[10:] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # never rises after the warm-up


def test_cosine_without_warm_up_starts_at_the_full_rate():
    rates = learning_rates(lambda optimizer: cosine_schedule(optimizer, total_steps=4, warmup_steps=0), steps=5)
    assert rates == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                   0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0], abs=1e-12)


@pytest.mark.parametrize("make_schedule", [lambda optimizer: poly_schedule(optimizer, total_steps=10),
                                           lambda optimizer: cosine_schedule(optimizer, 10, warmup_steps=3)])
def test_a_restored_schedule_continues_where_the_saved_one_was(make_schedule):
    def optimizer_and_schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, make_schedule(optimizer)

    optimizer, scheduler = optimizer_and_schedule()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer.step()
    scheduler.step()
    expected = optimizer.param_groups[0]["lr"]

    restored_optimizer, restored_scheduler = optimizer_and_schedule()
    restored_optimizer.load_state_dict(saved[0])
    restored_scheduler.load_state_dict(saved[1])
    restored_optimizer.step()
    restored_scheduler.step()
    assert restored_scheduler.last_epoch == 5
    assert restored_optimizer.param_groups[0]["lr"] == expected
