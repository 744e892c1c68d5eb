"""Per-step schedule and randomness: the learning rate at a step, and the seed of a step's random draws."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from lr/100 to lr, then cosine decay to min_lr (per optimiser step).

    The same schedule as timm's ``CosineLRScheduler(t_initial=total_steps - warmup_steps, lr_min=min_lr,
    warmup_t=warmup_steps, warmup_lr_init=lr / 100, warmup_prefix=True, t_in_epochs=False)`` stepped with
    ``step_update(step)``; ``step`` counts the optimiser steps already taken.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (0.01 + 0.99 * step / warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + step) % (2**63 - 1)
