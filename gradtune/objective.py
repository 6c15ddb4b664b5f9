"""What the loop minimises: an Objective maps (model, batch) to a *sum* of per-sample losses.

Why a sum and a count instead of a mean: the loop accumulates gradients of sums over
micro-batches (and, under torch.distributed, over ranks) and divides once by the total count of
samples or non-ignored tokens in the whole batch. That makes micro-batched / multi-process
gradients equal the one-shot gradient exactly, for token losses too, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from gradtune.data.dataset import Batch


@dataclass
class Output:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of per-sample (or per-token) losses
    # Samples or non-ignored tokens in this batch: a Python int when known on the host (tabular
    # rows), else a scalar long tensor (token counts) so that no host sync is forced.
    count: "int | torch.Tensor"
    # Detached sums to aggregate for metrics, e.g. {"correct": n} or {"sq_err": s}; divided by
    # ``count`` (or by the named denominator) when reported.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Batch) -> Output: ...


class Regression:
    """Tabular regression: model(x) (B, 1) against y (B,). Loss mse | mse_half | huber."""

    def __init__(self, loss: str = "mse", huber_delta: float = 1.0) -> None:
        self.loss, self.huber_delta = loss, huber_delta

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        from gradtune import losses

        y = batch["y"]
        pred = model(batch["x"]).reshape(y.shape)
        if self.loss == "mse":
            loss_sum = losses.mse(pred, y, reduction="sum")
            sq_err = loss_sum.detach()  # the same number: no second pass
        elif self.loss == "mse_half":
            loss_sum = losses.mse(pred, y, reduction="sum", half=True)
            sq_err = 2 * loss_sum.detach()
        else:
            loss_sum = losses.huber(pred, y, self.huber_delta, reduction="sum")
            sq_err = (pred.detach() - y).pow(2).sum()
        return Output(loss_sum, y.shape[0], {"sq_err": sq_err})


class Classification:
    """Tabular classification: logits (B, C) against class ids (B,). Loss cross_entropy | bce."""

    def __init__(self, loss: str = "cross_entropy", label_smoothing: float = 0.0) -> None:
        self.loss, self.label_smoothing = loss, label_smoothing

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        from gradtune import losses

        y, logits = batch["y"], model(batch["x"])
        if self.loss == "bce":  # one logit per sample: P(class 1) = sigmoid(z)
            loss_sum = losses.bce_with_logits(logits, y, reduction="sum")
            correct = ((logits.detach().reshape(y.shape) > 0).long() == y).sum()
        else:
            loss_sum = losses.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing)
            correct = (logits.detach().argmax(-1) == y).sum()
        return Output(loss_sum, y.shape[0], {"correct": correct})
