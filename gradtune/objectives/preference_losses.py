"""Per-pair (or per-sample, KTO) preference losses from sequence log-probabilities.

Notation, per pair: pi / ref the summed log-probabilities of a response's tokens under the
policy / the frozen reference, n its scored token count, a = pi / n the length-normalised
(average) log-probability, beta = ``dpo.beta``; c: chosen, r: rejected.

    sigmoid (DPO):  z = beta ((pi_c - ref_c) - (pi_r - ref_r));  -(1-ls) log s(z) - ls log s(-z)
    ipo:            ((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2
    simpo:          z = beta (a_c - a_r) - gamma;                 -(1-ls) log s(z) - ls log s(-z)
    orpo:           -a_c - beta log s(log odds_c - log odds_r),   log odds = a - log(1 - e^a)
    kto:            per sample, r = pi - ref, z0 = max(0, mean over the micro-batch of the
                    mismatched pairs' pi - ref) (no gradient):
                    desirable:   w_d (1 - s(beta (r - z0)))
                    undesirable: w_u (1 - s(beta (z0 - r)))

(s: the logistic sigmoid.) SimPO (Meng et al. 2024) and ORPO (Hong et al. 2024) need no
reference model; KTO (Ethayarajh et al. 2024) scores unpaired responses labelled good or bad.
ORPO's first term is the chosen response's mean token NLL per pair (the paper's SFT term), so
that the loss stays a sum over pairs: the loop's one division by the pair count keeps micro-
batches and ranks exact. KTO's reference point z0 is TRL's estimate, a detached mean over the
pairs of one forward: exact per micro-batch (TRL: per device), an estimate of a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")  # no reference forward, nothing precomputed
LOG_HALF = -0.6931471805599453  # log(1/2): where log1mexp switches form


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012: log1p(-e^x) below -log 2,
    log(-expm1(x)) above)."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    out = -F.logsigmoid(z)
    if label_smoothing:
        out = out * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return out


def pair_losses(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """Per-pair loss (B,) of a paired loss from per-sequence log-probabilities (B,) and response
    token counts (B,); ``ref_*`` are ignored by the reference-free losses."""
    n_c, n_r = n_c.clamp(min=1).to(pi_c.dtype), n_r.clamp(min=1).to(pi_r.dtype)
    if loss == "ipo":
        delta = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r
        return (delta - 1 / (2 * beta)) ** 2
    if loss == "simpo":
        return _smoothed(beta * (pi_c / n_c - pi_r / n_r) - gamma, label_smoothing)
    if loss == "orpo":
        a_c, a_r = pi_c / n_c, pi_r / n_r
        log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
        return -a_c - beta * F.logsigmoid(log_odds)
    if loss == "sigmoid":
        return _smoothed(beta * ((pi_c - ref_c) - (pi_r - ref_r)), label_smoothing)
    raise ValueError(f"unknown paired preference loss {loss!r}")


def kto_kl(pi_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (a 0-dim tensor, no gradient): the mean log-ratio of the
    mismatched (prompt, another row's completion) sequences (B,), floored at 0."""
    return (pi_kl - ref_kl).detach().mean().clamp(min=0)


def kto_losses(
    pi: torch.Tensor,
    ref: torch.Tensor,
    z0: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample KTO loss (B,) from log-probabilities (B,), z0 (0-dim) and labels (B,) bool."""
    r = pi - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)
