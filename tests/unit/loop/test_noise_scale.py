"""The noise-scale estimate against its closed form on linear regression with Gaussian features:
x ~ N(0, I_d), y = x.w* + e, e ~ N(0, s^2), per-sample loss (x.w - y)^2 / 2, at a fixed w with
r = w - w*: G = E[g] = r and tr(Σ) = (d + 1)|r|^2 + s^2 d, so B_simple = ((d+1)|r|^2 + s^2 d) / |r|^2."""

from __future__ import annotations

import torch

from gradtune.loop.noise_scale import NoiseScale


def test_estimate_within_20_percent_of_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d, s, b, big = 8, 2.0, 16, 256
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    r = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    w = w_star + r
    truth = ((d + 1) * r.dot(r) + s * s * d) / r.dot(r)
    est = NoiseScale(beta=0.99)
    for _ in range(3000):
        x = torch.randn(big, d, generator=g, dtype=torch.float64)
        y = x @ w_star + s * torch.randn(big, generator=g, dtype=torch.float64)
        per_sample = x * (x @ w - y)[:, None]  # (big, d): each sample's gradient
        small_mean, big_mean = per_sample[:b].mean(0), per_sample.mean(0)  # the first micro-batch, the batch
        est.update(b, big, float(small_mean.dot(small_mean)), float(big_mean.dot(big_mean)))
    assert abs(est.value - truth.item()) / truth.item() < 0.2, (est.value, truth.item())
    assert "noise scale ~" in est.advice()


def test_state_round_trip_and_no_estimate_without_two_sizes():
    a = NoiseScale()
    a.update(4, 4, 1.0, 1.0)  # one micro-batch: nothing to compare
    assert a.value is None and a.advice() is None
    a.update(4, 16, 2.0, 1.0)
    b = NoiseScale()
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
