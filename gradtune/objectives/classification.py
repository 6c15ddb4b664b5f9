"""Classification: logits (B, C) against class ids (B,); a table's rows or a text's.

Loss ``cross_entropy`` (softmax over C classes, optional label smoothing) or ``bce`` (one logit
per sample, P(class 1) = sigmoid(z)). The metric sum ``correct`` gives accuracy.
"""

from __future__ import annotations

from torch import nn

from gradtune.data.dataset import Batch
from gradtune.objectives import losses
from gradtune.objectives.logits import float32, forward, targets
from gradtune.objectives.output import Output

LOSSES = ("cross_entropy", "bce")


class Classification:
    def __init__(self, loss: str = "cross_entropy", label_smoothing: float = 0.0) -> None:
        self.loss, self.label_smoothing = loss, label_smoothing

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        y, logits = targets(batch), float32(forward(model, batch))
        if self.loss == "bce":
            loss_sum = losses.bce_with_logits(logits, y, reduction="sum")
            correct = ((logits.detach().reshape(y.shape) > 0).long() == y).sum()
        else:
            loss_sum = losses.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing)
            correct = (logits.detach().argmax(-1) == y).sum()
        return Output(loss_sum, y.shape[0], {"correct": correct})
