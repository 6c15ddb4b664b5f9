"""Learning rate as a pure function of the step: lr(step) = base_lr * factor(step).

Pure functions make resume trivial (no scheduler state to save) and plots exact. ``factor`` is
also exposed so torch.optim.lr_scheduler.LambdaLR can drive any optimizer with the same curve.
"""

from __future__ import annotations

import math


def factor(step: int, schedule: str, total_steps: int, warmup_steps: int = 0, gamma: float = 0.1,
           step_size: int = 1000, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    warmup: linear from 1/(warmup+1) to 1 over ``warmup_steps``; then
    constant 1 | step gamma^(t // step_size) | exponential gamma^(t / step_size) |
    linear 1 -> min_ratio at total_steps | cosine 1 -> min_ratio along half a cosine.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, t / span)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (t // step_size)
    if schedule == "exponential":
        return gamma ** (t / step_size)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_at(step: int, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
          gamma: float = 0.1, step_size: int = 1000, min_lr: float = 0.0) -> float:
    min_ratio = min_lr / base_lr if base_lr > 0 else 0.0
    return base_lr * factor(step, schedule, total_steps, warmup_steps, gamma, step_size, min_ratio)
