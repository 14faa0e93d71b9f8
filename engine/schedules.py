"""Learning-rate schedules over iterations, as ``LambdaLR`` so their state saves and restores."""

import math

import torch


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, exponent: float = 0.9):
    """nnU-Net's schedule: lr * (1 - step / total_steps) ** 0.9, reaching 0 at the last step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / total_steps) ** exponent)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` (step k at (k + 1) / warmup_steps of the rate, so the first
    step already moves), then half a cosine down to 0 at ``total_steps``.
    Warm-up keeps Adam's first steps, taken with poor second-moment estimates, small."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
