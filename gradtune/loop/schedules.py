"""Learning rate as a pure function of the step: lr(step) = base_lr * factor(step).

Pure functions make resume trivial (no scheduler state to save) and plots exact. ``factor`` is
also exposed so torch.optim.lr_scheduler.LambdaLR can drive any optimizer with the same curve.

``total_steps`` is an argument at every step, never baked into a schedule object: it may be
bound late. ``max_time`` runs the first steps over the config's own total, then fixes the
total from measured step times (loop/budget.py); checkpoints keep it, so a resumed run's lr
is bitwise the uninterrupted run's. step and exponential decay by ``step_size``, not the total.
"""

from __future__ import annotations

import math
from typing import Any


def wsd(
    step: int, total_steps: int, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0, shape: str = "cosine"
) -> float:
    """Warm-up, stable, decay (MiniCPM; ``transformers.get_wsd_schedule`` step for step):

        warm-up  min_ratio -> 1 linearly over ``warmup_steps`` (step / warmup_steps)
        stable   1 until ``total_steps - decay_steps``
        decay    1 -> min_ratio over ``decay_steps``: linear, cosine (half a period) or 1-sqrt
        after    min_ratio

    Why: the stable phase can be extended (resume with a larger budget) without re-running a
    decay, and the short final decay recovers most of cosine's final loss.
    """
    if step < warmup_steps:
        return min_ratio + (1.0 - min_ratio) * step / max(1, warmup_steps)
    stable_end = max(warmup_steps, total_steps - decay_steps)
    if step < stable_end:
        return 1.0
    if step >= stable_end + decay_steps:
        return min_ratio
    progress = (step - stable_end) / max(1, decay_steps)
    if shape == "linear":
        f = 1.0 - progress
    elif shape == "1-sqrt":
        f = 1.0 - math.sqrt(progress)
    else:
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, min_ratio + (1.0 - min_ratio) * f)


def factor(
    step: int,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    gamma: float = 0.1,
    step_size: int = 1000,
    min_ratio: float = 0.0,
    decay_steps: int = 0,
    shape: str = "cosine",
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    warmup: linear from 1/(warmup+1) to 1 over ``warmup_steps``; then
    constant 1 | step gamma^(t // step_size) | exponential gamma^(t / step_size) |
    linear 1 -> min_ratio at total_steps | cosine 1 -> min_ratio along half a cosine;
    wsd: see ``wsd`` (its warm-up is transformers'). ``plateau`` is not a function of the step
    (``plateau.Plateau`` scales this by what validation says); its factor here is 1.
    """
    if schedule == "wsd":
        return wsd(step, total_steps, warmup_steps, decay_steps, min_ratio, shape)
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, t / span)
    if schedule in ("constant", "plateau"):
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


def lr_at(step: int, base_lr: float, schedule: str, total_steps: int, *, min_lr: float = 0.0, **settings: Any) -> float:
    """The lr at ``step`` for ``base_lr`` and a floor ``min_lr`` (same unit as base_lr); ``settings``:
    ``factor``'s other keywords (warmup_steps, gamma, step_size, decay_steps, shape)."""
    min_ratio = min_lr / base_lr if base_lr > 0 else 0.0
    return base_lr * factor(step, schedule, total_steps, min_ratio=min_ratio, **settings)
