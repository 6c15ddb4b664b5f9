"""The wsd schedule equals transformers.get_wsd_schedule, and Plateau equals torch's
ReduceLROnPlateau, at every step / evaluation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradtune.loop.plateau import Plateau
from gradtune.loop.schedules import factor


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("warmup,decay,total,min_ratio", [(10, 30, 200, 0.0), (0, 50, 120, 0.1), (7, 1, 40, 0.05)])
def test_wsd_equals_transformers(shape, warmup, decay, total, min_ratio):
    from transformers import get_wsd_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_wsd_schedule(
        opt,
        num_warmup_steps=warmup,
        num_decay_steps=decay,
        num_training_steps=total,
        decay_type=shape,
        min_lr_ratio=min_ratio,
    )
    for step in range(total + 5):
        ours = factor(step, "wsd", total, warmup, min_ratio=min_ratio, decay_steps=decay, shape=shape)
        assert math.isclose(ours, opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("patience,cooldown,min_lr", [(2, 0, 0.0), (0, 1, 1e-3), (3, 2, 0.0)])
def test_plateau_equals_reduce_lr_on_plateau(mode, patience, cooldown, min_lr):
    rng = random.Random(patience * 10 + cooldown)
    metrics, m = [], 1.0
    for _ in range(80):  # improving, then noisy plateaus
        m = m * (0.97 if rng.random() < 0.3 else 1.0) + rng.uniform(-1e-5, 1e-5)
        metrics.append(m if mode == "min" else 1.0 / m)  # max: a rising, positive metric (accuracy-like)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, cooldown=cooldown, min_lr=min_lr
    )
    ours = Plateau(0.1, mode, factor=0.5, patience=patience, cooldown=cooldown, min_lr=min_lr)
    reductions = 0
    for v in metrics:
        torch_sched.step(v)
        reductions += ours.step(v)
        assert math.isclose(0.1 * ours.scale, opt.param_groups[0]["lr"], rel_tol=1e-12)
    assert reductions > 0  # the sequence exercised the rule


def test_plateau_state_round_trip():
    a = Plateau(1.0, patience=1)
    for v in [1.0, 1.0, 1.0, 0.5, 0.5]:
        a.step(v)
    b = Plateau(1.0, patience=1)
    b.load_state_dict(a.state_dict())
    for v in [0.5, 0.5, 0.4, 0.4, 0.4]:
        assert a.step(v) == b.step(v) and a.scale == b.scale
