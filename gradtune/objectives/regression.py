"""Regression: predictions (B, 1) or (B,) against targets (B,); a table's or a text's.

Loss ``mse`` (sum of squared errors), ``mse_half`` (the textbook 1/2 convention, whose gradient
has no factor 2) or ``huber`` (quadratic within delta, linear beyond). The metric sum ``sq_err``
gives RMSE and R^2 at evaluation, whatever the loss.
"""

from __future__ import annotations

from torch import nn

from gradtune.data.dataset import Batch
from gradtune.objectives import losses
from gradtune.objectives.logits import float32, forward, targets
from gradtune.objectives.output import Output

LOSSES = ("mse", "mse_half", "huber")


class Regression:
    def __init__(self, loss: str = "mse", huber_delta: float = 1.0) -> None:
        self.loss, self.huber_delta = loss, huber_delta

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        y = targets(batch)
        pred = float32(forward(model, batch)).reshape(y.shape)
        y = y.to(pred.dtype)
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
