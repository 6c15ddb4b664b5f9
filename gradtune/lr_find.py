"""Learning-rate range test: grow lr exponentially over a short run, watch the loss, suggest one.

Too small a rate crawls (flat loss), a good one descends fast, too large oscillates then
diverges. We train from the run's own initial weights with lr going from ``min_lr`` to
``max_lr`` geometrically, stop once the smoothed loss exceeds 4x its best (or is non-finite),
and suggest a tenth of the rate at the smoothed minimum: the steepest safe region sits about an
order of magnitude below the point where the loss turns up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gradtune.config import Config
from gradtune.data.sampler import make_sampler
from gradtune.jobs.registry import build
from gradtune.loop.gradient import accumulate
from gradtune.optim.build import make_optimizer
from gradtune.runtime.device import autocast, resolve_device
from gradtune.telemetry.plots import plot_curves


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]  # smoothed (bias-corrected EMA)
    suggestion: float
    stopped_early: bool


def lr_find(cfg: Config, min_lr: float = 1e-6, max_lr: float = 10.0, steps: int = 100,
            beta: float = 0.9) -> LRFind:
    job = build(cfg)
    device = resolve_device(cfg.device)
    model = job.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, job.param_groups or params)
    sampler = make_sampler(job, cfg)
    amp = autocast(cfg.precision, device)
    lrs, smooth = [], []
    avg, best = 0.0, math.inf
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / max(1, steps - 1))
        for g in opt.param_groups:
            g["lr"] = lr
        for p in params:
            p.grad = None
        s = next(sampler)
        loss_sum, count, _ = accumulate(model, job.objective, job.train, s.micro, device, amp)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / float(count))
        loss = float(loss_sum) / float(count)
        if not math.isfinite(loss):
            return _done(lrs, smooth, True)
        avg = beta * avg + (1 - beta) * loss
        value = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        smooth.append(value)
        best = min(best, value)
        if value > 4 * best and i > 5:
            return _done(lrs, smooth, True)
        opt.step()
    return _done(lrs, smooth, False)


def _done(lrs: list[float], losses: list[float], early: bool) -> LRFind:
    if not losses:
        return LRFind(lrs, losses, float("nan"), early)
    i_min = min(range(len(losses)), key=losses.__getitem__)
    return LRFind(lrs, losses, lrs[i_min] / 10, early)


def plot(result: LRFind, path: Path, title: Optional[str] = None) -> Path:
    return plot_curves({"smoothed loss": (result.lrs, result.losses)}, path, title or "lr range test",
                       xlabel="learning rate", ylabel="loss", logx=True)
