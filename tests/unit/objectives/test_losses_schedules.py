"""Losses against torch.nn.functional; schedules against torch.optim.lr_scheduler."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradtune.loop.schedules import factor, lr_at
from gradtune.objectives import losses


def test_mse_and_half_convention():
    p, y = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    assert torch.allclose(losses.mse(p, y), F.mse_loss(p, y))
    assert torch.allclose(losses.mse(p, y, half=True), F.mse_loss(p, y) / 2)
    assert torch.allclose(losses.mse(p, y, reduction="sum"), F.mse_loss(p, y, reduction="sum"))


def test_huber_matches_torch():
    p, y = 3 * torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.allclose(losses.huber(p, y, delta=0.7), F.huber_loss(p, y, delta=0.7))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_ignore_index_and_smoothing(smoothing):
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    target = torch.randint(0, 11, (4, 7))
    target[0, :3] = -100
    ref = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=-100, label_smoothing=smoothing)
    assert torch.allclose(losses.cross_entropy(logits, target, label_smoothing=smoothing), ref)
    n = (target != -100).sum()
    assert torch.allclose(losses.cross_entropy(logits, target, reduction="sum", label_smoothing=smoothing), ref * n)


def test_bce_with_logits_is_stable_and_matches_torch():
    z = torch.tensor([-800.0, -3.0, 0.0, 2.0, 900.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    ours = losses.bce_with_logits(z, y)
    assert torch.isfinite(ours)
    assert torch.allclose(ours, F.binary_cross_entropy_with_logits(z, y.double()))


@pytest.mark.parametrize(
    "name,torch_sched",
    [
        ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=0.01)),
        ("exponential", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97)),
        ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5)),
        ("linear", lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, total_iters=100)),
    ],
)
def test_schedules_match_torch(name, torch_sched):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch_sched(opt)
    kw = {
        "cosine": dict(min_lr=0.01),
        "exponential": dict(gamma=0.97, step_size=1),
        "step": dict(gamma=0.5, step_size=10),
        "linear": dict(min_lr=0.01),
    }[name]
    for step in range(100):
        assert math.isclose(opt.param_groups[0]["lr"], lr_at(step, 0.1, name, 100, **kw), rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()


def test_warmup_rises_then_hands_over():
    f = [factor(s, "cosine", 110, warmup_steps=10) for s in range(110)]
    assert all(a < b for a, b in zip(f[:10], f[1:11]))
    assert f[10] == 1.0 and f[-1] < 0.01
