"""Gradient descent against the oracle: the closed-form least-squares optimum."""

import contextlib

import pytest
import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.evaluation import evaluate
from gradtune.loop.fit import fit
from gradtune.models.linear import closed_form

BASE = ["model=linear", "data=diabetes", "standardize_target=true", "dtype=float64", "val_fraction=0", "progress=off"]


def exact_train_loss(job) -> float:
    loss, _, _ = evaluate(job.model, job.objective, job.train, 4096, torch.device("cpu"), contextlib.nullcontext())
    return loss


def test_closed_form_matches_numpy_lstsq():
    import numpy as np

    x = torch.randn(50, 3, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 3 + 0.1 * torch.randn(50, dtype=torch.float64)
    w, b = closed_form(x, y)
    design = np.hstack([x.numpy(), np.ones((50, 1))])
    ref = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    assert np.allclose(np.append(w.numpy(), b.item()), ref, rtol=1e-10)


def test_batch_gd_reaches_closed_form_optimum():
    cfg = load_config(None, BASE + ["batch_size=full", "lr=0.2", "epochs=5000", "tol=1e-12", "patience=50"])
    job = build(cfg)
    fit(job, cfg)
    optimum = job.info["closed_form_loss"]
    assert abs(exact_train_loss(job) - optimum) / optimum < 1e-6


@pytest.mark.parametrize("batch_size,lr,epochs", [(1, 0.01, 30), (16, 0.05, 300)])
def test_sgd_and_minibatch_with_decay_get_close(batch_size, lr, epochs):
    cfg = load_config(None, BASE + [f"batch_size={batch_size}", f"lr={lr}", f"epochs={epochs}", "schedule=linear"])
    job = build(cfg)
    fit(job, cfg)
    optimum = job.info["closed_form_loss"]
    gap = (exact_train_loss(job) - optimum) / optimum
    assert 0 <= gap < 1e-3


def test_constant_lr_sgd_stalls_above_optimum():
    """Negative control: without a decaying rate SGD hovers in a noise ball, not at the optimum."""
    cfg = load_config(None, BASE + ["batch_size=1", "lr=0.05", "epochs=3"])
    job = build(cfg)
    fit(job, cfg)
    optimum = job.info["closed_form_loss"]
    assert (exact_train_loss(job) - optimum) / optimum > 1e-3
