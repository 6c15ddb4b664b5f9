"""``lr: auto`` / ``momentum: auto``: the curvature against numpy's eigenvalues, and the step it
gives against a grid of fixed rates on diabetes linear regression (batch GD, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from gradtune.config import load_config
from gradtune.jobs import curvature
from gradtune.jobs.registry import build
from gradtune.runtime.errors import GradtuneError
from gradtune.train import train

EXACT = [
    "dtype=float64",
    "batch_size=full",
    "val_fraction=0",
    "eval_every=1",
    "epochs=100000",
    "progress=off",
    "plot=false",
]


def _hessian_eigs(job, scale: float, wd: float = 0.0) -> np.ndarray:
    """Eigenvalues of scale * X~'X~/m + wd I, X~ the training features with the intercept column."""
    x = job.train.fields["x"].double().numpy()
    design = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.eigvalsh(scale * design.T @ design / len(x) + wd * np.eye(design.shape[1]))


@pytest.mark.parametrize(
    "settings,scale",
    [
        (["model=linear"], 2.0),  # mse: H = 2 X'X/m
        (["model=linear", "loss=mse_half"], 1.0),  # mse_half: H = X'X/m
        (["model=linear", "weight_decay=0.05"], 2.0),  # + weight decay on every parameter
        (["model=logistic", "data=breast_cancer"], 0.5),  # softmax bound: X'X/(2m)
        (["model=logistic", "data=breast_cancer", "loss=bce"], 0.25),  # sigmoid bound: X'X/(4m)
    ],
)
def test_curvature_equals_numpy_eigenvalues(settings, scale):
    cfg = load_config(None, settings + ["lr=auto", "dtype=float64"])
    job = build(cfg)
    c = curvature.curvature(job, cfg)
    eigs = _hessian_eigs(job, scale, cfg.weight_decay)
    assert c.L == pytest.approx(eigs[-1], rel=1e-6)
    if cfg.model == "linear":
        assert c.mu == pytest.approx(eigs[0], rel=1e-4)
    else:
        assert c.mu is None  # logistic: no smallest curvature without weight decay


@pytest.mark.parametrize("gram_max", [4096, 0])  # the Gram matrix formed once / one pass per iteration
def test_power_iteration_on_random_matrix(gram_max, monkeypatch):
    monkeypatch.setattr(curvature, "GRAM_MAX", gram_max)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)) @ rng.normal(size=(30, 30))
    op = curvature._design_op(torch.tensor(x))
    design = np.hstack([x, np.ones((200, 1))])
    top = np.linalg.eigvalsh(design.T @ design / 200)[-1]
    assert curvature.power_iteration(op, 31) == pytest.approx(top, rel=1e-6)


def _steps_to_optimum(tmp_path, name: str, settings: list[str], budget: int = 4000) -> tuple[float, dict]:
    """Steps until the exact training loss is within 1e-6 (relative) of the closed-form optimum
    (metrics.jsonl: with batch_size=full and eval_every=1 the loss at step k is that of the
    weights after k-1 updates), and the run's job info. inf if never within the budget."""
    cfg = load_config(None, EXACT + settings + [f"max_steps={budget}", f"out_dir={tmp_path / name}"])
    r = train(cfg)
    optimum = r.info["closed_form_loss"]
    for row in r.history:
        if row.get("kind") == "eval" and math.isfinite(row["loss"]) and row["loss"] - optimum <= 1e-6 * optimum:
            return row["step"] - 1, r.info
    return math.inf, r.info


@pytest.mark.slow
def test_lr_auto_beats_every_fixed_rate_and_momentum_auto_beats_it(tmp_path):
    auto, info = _steps_to_optimum(tmp_path, "auto", ["lr=auto"])
    lr_auto = info["lr_auto"]
    # kappa ~ 470 here, so the cap 1.9/L is below 2/(mu+L) (jobs/curvature.py TOP says why).
    assert lr_auto["lr"] == pytest.approx(min(2 / (lr_auto["mu"] + lr_auto["L"]), 1.9 / lr_auto["L"]), rel=1e-9)
    # The saved config holds the resolved number, not "auto": a resume resolves to the same.
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["lr"] == lr_auto["lr"]
    assert auto <= lr_auto["predicted_steps"]  # the bound holds (1e-6 of the gap, not of the loss)
    # A log-spaced grid 0.01..0.5 with the round rates people try; 0.25 is just past 2/L (~0.249).
    grid = [0.01, 0.0175, 0.0306, 0.0535, 0.0936, 0.1, 0.164, 0.2, 0.25, 0.286, 0.5]
    fixed = {lr: _steps_to_optimum(tmp_path, f"lr{lr}", [f"lr={lr}"], budget=int(auto) + 1)[0] for lr in grid}
    assert all(auto < steps for steps in fixed.values()), (auto, fixed)
    nesterov, info = _steps_to_optimum(tmp_path, "nesterov", ["lr=auto", "momentum=auto"], budget=int(auto))
    m = info["lr_auto"]
    kappa = m["L"] / m["mu"]
    assert m["lr"] == pytest.approx(1 / m["L"], rel=1e-9)
    assert m["momentum"] == pytest.approx((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), rel=1e-9)
    assert nesterov < auto / 3, (nesterov, auto)


def test_resume_resolves_the_same_config(tmp_path):
    out = tmp_path / "run"
    args = EXACT + ["lr=auto", "momentum=auto", f"out_dir={out}", "checkpoint_every=5"]
    first = train(load_config(None, args + ["max_steps=10"]))
    again = train(load_config(None, args + ["max_steps=20"]))
    assert first.steps == 10 and again.steps == 20  # resumed, not refused for a changed config
    resumed = [row for row in again.history if row.get("kind") == "resume"]
    assert resumed and resumed[0]["step"] == 10
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["momentum"] == again.info["lr_auto"]["momentum"] and saved["nesterov"] is True


@pytest.mark.parametrize(
    "settings,message",
    [
        (["model=mlp", "lr=auto"], "model=mlp has no known curvature"),
        (["model=gpt", "lr=auto"], "model=gpt has no known curvature"),
        (["model=linear", "lr=auto", "optimizer=adamw"], "optimizer=adamw"),
        (["model=linear", "momentum=auto"], "set lr: auto with it"),
        (["model=linear", "lr=-1"], "> 0 or 'auto'"),
        (["model=linear", "lr=fast"], "expected float or 'auto'"),
    ],
)
def test_auto_refused_where_it_is_not_defined(settings, message):
    with pytest.raises(GradtuneError, match=message):
        load_config(None, settings)


def test_data_dependent_refusals():
    cfg = load_config(None, ["model=linear", "lr=auto", "loss=huber"])
    with pytest.raises(GradtuneError, match="loss 'huber'"):
        curvature.resolve(build(cfg), cfg)
    cfg = load_config(None, ["model=logistic", "data=breast_cancer", "lr=auto", "momentum=auto"])
    with pytest.raises(GradtuneError, match="mu > 0"):
        curvature.resolve(build(cfg), cfg)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_logistic_bound_holds_for_the_true_hessian(loss):
    """The bound L = lambda_max(X~'X~/m)/2 (softmax) or /4 (sigmoid) against the exact Hessian of
    the mean loss in all the weights, at the initial weights and far from them."""
    cfg = load_config(None, ["model=logistic", "data=breast_cancer", f"loss={loss}", "dtype=float64", "lr=auto"])
    job = build(cfg)
    bound = curvature.curvature(job, cfg).L
    x, y = job.train.fields["x"].double(), job.train.fields["y"]
    w0 = torch.cat([p.detach().reshape(-1) for p in job.model.parameters()]).double()
    n_out = job.model.linear.out_features

    def mean_loss(flat):
        w, b = flat[: n_out * x.shape[1]].reshape(n_out, -1), flat[n_out * x.shape[1] :]
        z = x @ w.T + b
        if loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(z.squeeze(-1), y.double())
        return torch.nn.functional.cross_entropy(z, y)

    for w in (w0, w0 + torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)):
        top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, w))[-1].item()
        assert top <= bound * (1 + 1e-9)
    top0 = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, w0))[-1].item()
    assert top0 > 0.8 * bound  # nearly reached at the start (predictions near 50/50): not loose
