"""``lr: auto`` and ``momentum: auto`` for the convex models: the step from the loss's curvature.

Linear regression with MSE is a quadratic in theta = (w, b), with X~ = [X, 1] (m, F+1) the
(standardised) training features and the intercept column:

    mse       f = (1/m) |X~ theta - y|^2      H = 2 X~'X~ / m
    mse_half  f = (1/2m) |X~ theta - y|^2     H =   X~'X~ / m

SGD's weight decay adds lambda * |theta|^2 / 2 (a tabular model decays every parameter, the
bias too), so H + lambda I. The Hessian is constant: with curvatures in [mu, L], gradient descent
at lr converges iff lr < 2/L, and lr = 2/(mu + L) minimises the worst contraction of the error,
q = (kappa - 1)/(kappa + 1) per step (kappa = L/mu). We take min(2/(mu + L), 1.9/L) (``TOP``:
why below, the measurement in the README); each direction's loss gap shrinks by
(1 - lr lambda)^2 per step, so with q the slowest |1 - lr lambda| reaching eps of the
initial gap takes ln(1/eps) / (2 ln(1/q)) steps, ~ kappa/4 ln(1/eps) at 2/(mu + L).
Nesterov's momentum (kappa^0.5 - 1)/(kappa^0.5 + 1) at lr 1/L contracts by ~ 1 - kappa^-0.5 per
step: ~ kappa^0.5 ln(1/eps) steps (Nesterov 2004, 2.2.1).

Logistic regression: f = (1/m) sum_i CE(W x~_i, y_i), W (C, F+1). Per sample the Hessian in the
logits z = W x~_i is S = diag(p) - p p' (softmax) and, in W, S (x) x~_i x~_i'. For a unit vector
v, v'Sv is the variance of v's entries under p, at most (max v - min v)^2 / 4 <= 1/2 (reached at
p = (1/2, 1/2), v = (1, -1)/sqrt 2), so H <= 1/2 I_C (x) X~'X~/m and L = lambda_max(X~'X~/m) / 2.
Binary ``bce`` (one logit): sigma'(z) = p(1 - p) <= 1/4, L = lambda_max(X~'X~/m) / 4. Label
smoothing does not change the Hessian (the loss is linear in the targets). The bound is nearly
reached at the usual start (small weights, p ~ uniform); further out the loss flattens, and on
separable classes it has no minimum at all: there is no mu > 0, so lr = 1/L (f_k - f* <=
L |theta_0 - theta*|^2 / (2k)) and ``momentum: auto`` is refused, unless weight decay gives mu.

Up to ``EXACT_MAX`` columns both come exactly from the eigenvalues of the (F+1)^2 Gram matrix
(eigvalsh: microseconds, where power iteration for mu can take thousands of iterations on
ill-conditioned features). Beyond, lambda_max comes from power iteration on v -> X~'X~ v/m (up to
``GRAM_MAX`` columns on the (F+1)^2 matrix formed in one pass over the data, beyond that one pass
per iteration; never an eigendecomposition); mu from power iteration on L I - H, whose largest
eigenvalue is L - mu.
Both are deterministic (seeded start), so a resume resolves the same numbers; lr and momentum are rounded to 12
significant digits, so noise in the last bits (another thread count) will hardly ever change
the config's hash.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch

from gradtune.config import Config
from gradtune.jobs.job import Job
from gradtune.runtime.errors import GradtuneError

EPS = 1e-6  # the predicted steps reduce the loss gap to this fraction of its initial value
# lr * L is capped at this: at 2/(mu+L) the stiffest direction's error shrinks only by
# (kappa-1)/(kappa+1) per step, as slowly as the flattest one's, yet it holds up to kappa times
# more of the loss gap (the gap weighs each direction by its curvature). At 1.9/L it shrinks by
# 0.9 per step (ten decades of gap in ~110 steps) for at most 5% slower progress along the
# flattest direction (README, "How lr-find and lr: auto choose": steps to the optimum on diabetes).
TOP = 1.9
Op = Callable[[torch.Tensor], torch.Tensor]


GRAM_MAX = 4096  # up to this many columns X~'X~/m is formed once ((F+1)^2 floats, 128 MiB at most)
EXACT_MAX = 64  # up to this many columns the Gram matrix's eigenvalues are computed exactly


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X~'X~/m in float64, X~ = [x, 1]: (F+1, F+1)."""
    x = x.double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return design.T @ design / x.shape[0]


def _design_op(x: torch.Tensor) -> Op:
    """v (F+1,) -> X~'(X~ v)/m in float64, X~ = [x, 1] (m, F+1). With few columns the Gram
    matrix is formed once (one pass over the data; each iteration then costs (F+1)^2, not
    m (F+1)); with many, each iteration passes over the data and X~ is never built."""
    x = x.double()
    m, f = x.shape
    if f + 1 <= min(m, GRAM_MAX):
        ones = torch.ones(m, 1, dtype=torch.float64)
        design = torch.cat([x, ones], dim=1)  # (m, F+1)
        gram = design.T @ design / m
        return lambda v: gram @ v

    def op(v: torch.Tensor) -> torch.Tensor:
        r = x @ v[:-1] + v[-1]  # (m,) = X~ v
        return torch.cat([x.T @ r, r.sum().reshape(1)]) / m

    return op


def power_iteration(
    op: Op, n: int, tol: float = 1e-13, max_iter: int = 20000, seed: int = 0, ref: Optional[float] = None
) -> float:
    """Largest eigenvalue of the symmetric PSD operator ``op`` on R^n, to relative ``tol``.

    Stops when the eigen-residual |A v - rho v| <= tol * (``ref`` or rho), rho the Rayleigh
    quotient: then rho is within that of an eigenvalue, and from a random start it is the
    largest. Past ``max_iter`` (two nearly equal top eigenvalues) rho is returned as it is: a
    lower bound, within the top cluster. Float64, seeded: the same operator, the same number."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v /= v.norm()
    rho = 0.0
    for _ in range(max_iter):
        w = op(v)
        rho = float(v @ w)
        if rho <= 0:
            return 0.0
        if float((w - rho * v).norm()) <= tol * (ref or rho):
            return rho
        v = w / w.norm()
    return rho


@dataclasses.dataclass
class Curvature:
    L: float  # largest curvature of the loss (an upper bound for logistic)
    mu: Optional[float]  # smallest curvature; None where it is not known (logistic)
    scale: float  # H = scale * X~'X~/m (+ weight decay)
    how: str  # how L was found, for the one line


def curvature(job: Job, cfg: Config) -> Curvature:
    """L (and mu for linear MSE) of the training loss of a linear / logistic model."""
    x = job.train.fields["x"]  # type: ignore[attr-defined]
    loss, wd = job.info["loss"], cfg.weight_decay
    scale = {"mse": 2.0, "mse_half": 1.0, "cross_entropy": 0.5, "bce": 0.25}[loss]
    n = x.shape[1] + 1
    exact = torch.linalg.eigvalsh(_gram(x)) if n <= EXACT_MAX else None  # ascending
    op = _design_op(x) if exact is None else (lambda v: v)  # the operator is only iterated without exact
    top = float(exact[-1]) if exact is not None else power_iteration(op, n)
    L = scale * top + wd
    if loss in ("mse", "mse_half") and exact is not None:
        mu = scale * float(exact[0]) + wd
        mu = mu if mu > 1e-10 * L else 0.0  # below this, round-off (collinear features), not curvature
        how = f"{scale:g} X'X/m"
    elif loss in ("mse", "mse_half"):
        # lambda_max(L I - H) = L - mu; H itself includes the weight decay. The tolerance is
        # relative to L: mu is only needed to a small fraction of L (it sets kappa).
        shifted = power_iteration(lambda v: L * v - (scale * op(v) + wd * v), n, tol=1e-11, ref=L)
        mu = max(L - shifted, 0.0)
        # Below this mu is round-off, not curvature (collinear features: a flat direction).
        mu = mu if mu > 1e-10 * L else 0.0
        how = f"{scale:g} X'X/m"
    else:
        mu = wd if wd > 0 else None  # the logistic part's own mu can be ~0: only the decay is sure
        how = f"bound {scale:g} lambda_max(X'X/m)"
    if wd:
        how += f" + weight_decay {wd:g}"
    return Curvature(L, mu, scale, how)


def _sig(v: float) -> float:
    return float(f"{v:.12g}")


def _steps(q: float) -> Optional[int]:
    """Steps for the loss gap to reach EPS of its start when it shrinks by q^2 per step."""
    if not 0 < q < 1:
        return None if q >= 1 else 1
    return math.ceil(math.log(1 / EPS) / (2 * math.log(1 / q)))


def resolve(job: Job, cfg: Config) -> tuple[Config, Optional[dict[str, Any]]]:
    """``cfg`` with ``lr``/``momentum`` auto replaced by numbers, and the facts for job.info;
    (cfg, None) when nothing is auto. The settings that cannot go with auto (another model, an
    optimizer other than SGD) were refused when the config was loaded (config/checks.py)."""
    if cfg.lr != "auto":
        return cfg, None
    loss = job.info.get("loss")
    if loss not in ("mse", "mse_half", "cross_entropy", "bce"):
        raise GradtuneError(
            f"config: lr: auto needs loss mse, mse_half (linear) or cross_entropy, bce "
            f"(logistic); loss '{loss}' has no curvature formula here"
        )
    c = curvature(job, cfg)
    if c.L <= 0:
        raise GradtuneError("config: lr: auto: the training features are all zero: there is no curvature to step by")
    info: dict[str, Any] = {"L": c.L, "mu": c.mu, "curvature": c.how, "eps": EPS}
    kappa = c.L / c.mu if c.mu else None
    if cfg.momentum == "auto":
        if kappa is None:
            raise GradtuneError(
                f"config: momentum: auto needs the smallest curvature mu > 0, which "
                f"model={cfg.model} does not have here (set weight_decay > 0, or a number)"
            )
        lr, mom = 1 / c.L, (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
        # Nesterov's bound: the gap shrinks by (1 - kappa^-0.5) per step, i.e. q^2 with q below.
        info.update(
            rule="1/L",
            momentum_rule="(sqrt(kappa)-1)/(sqrt(kappa)+1), nesterov",
            predicted_steps=_steps(math.sqrt(1 - 1 / math.sqrt(kappa))),
        )
        new = dataclasses.replace(cfg, lr=_sig(lr), momentum=_sig(mom), nesterov=True)
    else:
        if kappa is not None:
            lr, rule = min(2 / (c.mu + c.L), TOP / c.L), "min(2/(mu+L), 1.9/L)"
            q = max(1 - lr * c.mu, lr * c.L - 1)  # the slowest direction's contraction
        else:
            lr, q, rule = 1 / c.L, None, "1/L"
        info.update(rule=rule, predicted_steps=_steps(q) if q is not None else None)
        new = dataclasses.replace(cfg, lr=_sig(lr))
    info.update(lr=new.lr, momentum=new.momentum, kappa=kappa)
    return new, info


def describe(info: dict[str, Any]) -> str:
    """The one line a run prints at its start."""
    mu = "unknown" if info["mu"] is None else f"{info['mu']:.4g}"
    kappa = "" if info["kappa"] is None else f", kappa={info['kappa']:.4g}"
    steps = (
        f"; predicted {info['predicted_steps']} steps to {info['eps']:g} of the initial loss gap"
        if info["predicted_steps"] is not None
        else "; sublinear O(1/k) (no mu)"
    )
    mom = f", momentum={info['momentum']:.6g} (nesterov)" if "momentum_rule" in info else ""
    return (
        f"lr auto: L={info['L']:.6g} ({info['curvature']}), mu={mu}{kappa}; "
        f"lr={info['rule']}={info['lr']:.6g}{mom}{steps}"
    )
