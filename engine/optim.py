"""Optimizer and learning-rate schedule of every recipe."""

import torch

from engine.schedules import cosine_schedule, poly_schedule


def build_optimizer(parameters, name: str, *, lr: float, weight_decay: float, schedule: str, total_steps: int,
                    warmup_steps: int, momentum: float = 0.99):
    """SGD with Nesterov momentum (nnU-Net) or AdamW, and a poly or cosine-with-warm-up schedule
    stepped once per iteration.

    Args:
        parameters: the model's parameters, or parameter groups (dicts with their own ``"lr"``).
        name: ``sgd`` or ``adamw``.
        momentum: SGD only.

    Returns:
        (optimizer, scheduler)
    """
    if name == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    else:
        raise SystemExit(f"--optimizer {name}: choose sgd or adamw")
    if schedule == "poly":
        return optimizer, poly_schedule(optimizer, total_steps)
    if schedule == "cosine":
        return optimizer, cosine_schedule(optimizer, total_steps, warmup_steps)
    raise SystemExit(f"--schedule {schedule}: choose poly or cosine")
