"""Classification: logits (B, C) against class ids (B,); a table's rows or a text's.

Loss ``cross_entropy`` (softmax over C classes, optional label smoothing and class weights) or
``bce`` (one logit per sample, P(class 1) = sigmoid(z)). The metric sum ``correct`` gives
accuracy; at evaluation (model in eval mode) the confusion-matrix sums give precision, recall
and F1 (``class_metrics.py``). With class weights w (C,), the loss sum is sum_i w_{y_i} loss_i
and the count sum_i w_{y_i}: the loop's one division is ``F.cross_entropy(weight=w)``'s mean over
the whole batch, exact under micro-batching and across ranks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.objectives import losses
from gradtune.objectives.class_metrics import confusion_sums
from gradtune.objectives.logits import float32, forward, targets
from gradtune.objectives.output import Output

LOSSES = ("cross_entropy", "bce")


class Classification:
    def __init__(
        self, loss: str = "cross_entropy", label_smoothing: float = 0.0, weight: Optional[Sequence[float]] = None
    ) -> None:
        self.loss, self.label_smoothing = loss, label_smoothing
        self.weight = torch.as_tensor(weight, dtype=torch.float64) if weight is not None else None  # (C,)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        y, logits = targets(batch), float32(forward(model, batch))
        metrics: dict[str, torch.Tensor] = {}
        count: "int | torch.Tensor" = y.shape[0]
        if self.loss == "bce":
            loss_sum = losses.bce_with_logits(logits, y, reduction="sum")
            pred, n_classes = (logits.detach().reshape(y.shape) > 0).long(), 2
        else:
            w = self.weight.to(logits.device, logits.dtype) if self.weight is not None else None
            per = losses.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing, weight=w)
            loss_sum = per.sum()
            pred, n_classes = logits.detach().argmax(-1), logits.shape[-1]
            if w is not None:
                count = w[y].sum()  # divide once by the batch's weight sum: cross_entropy(weight=w)'s mean
                metrics["samples"] = torch.tensor(y.shape[0], device=y.device)
        metrics["correct"] = (pred == y).sum()
        if not getattr(model, "training", True):  # evaluation: the confusion matrix, cell by cell
            metrics.update(confusion_sums(y.long(), pred, n_classes))
        return Output(loss_sum, count, metrics)
