"""Losses, written out so the formula is visible. Each takes ``reduction``: "mean" | "sum" | "none".

The loop uses ``reduction="sum"`` and divides by the batch's total count once (see output.py),
which keeps micro-batched and multi-process gradients equal to the one-shot gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.mean()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", half: bool = False) -> torch.Tensor:
    """Mean squared error (1/m) sum (pred - y)^2; ``half`` gives the textbook 1/(2m) convention,
    whose gradient is (1/m) X^T (Xw - y) with no factor 2."""
    sq = (pred - target).pow(2)
    if sq.dim() > 1:  # (B, k) multi-output: one loss per sample
        sq = sq.sum(dim=tuple(range(1, sq.dim())))
    return _reduce(sq * 0.5 if half else sq, reduction)


def huber(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Quadratic within ``delta`` of the target, linear beyond: robust to outliers."""
    err = (pred - target).abs()
    quad = torch.clamp(err, max=delta)
    per = 0.5 * quad.pow(2) + delta * (err - quad)
    if per.dim() > 1:
        per = per.sum(dim=tuple(range(1, per.dim())))
    return _reduce(per, reduction)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """-log softmax(logits)[target]. logits (N, C) or (B, T, C) with target (N,) or (B, T).

    ``mean`` divides by the count of non-ignored targets (token losses), not by N; with class
    ``weight`` (C,), each loss is scaled by its target's weight and ``mean`` divides by the sum
    of those weights (``F.cross_entropy``'s convention).
    """
    if logits.dim() > 2:
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    # F.cross_entropy fuses log-softmax and gather (numerically stable, one pass over C).
    per = F.cross_entropy(
        logits.float() if logits.dtype == torch.bfloat16 else logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
        weight=weight,
    )
    if reduction == "mean" and weight is not None:
        kept = target != ignore_index
        return per.sum() / weight[target.clamp(min=0)][kept].sum()
    if reduction == "mean":
        return per.sum() / (target != ignore_index).sum().clamp(min=1)
    return _reduce(per, reduction)


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on logits: max(z,0) - z*y + log(1 + exp(-|z|)), stable for any z."""
    z, y = logits.reshape(target.shape), target.to(logits.dtype)
    per = z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    return _reduce(per, reduction)
