"""Fine-tuning objectives: each returns a *sum* of losses and the count it sums over.

    classification  logits (B, K) from an encoder + head; CE summed over samples, count B
    regression      predictions (B, 1) or (B,); squared error summed, count B
    causal LM       logits (B, T, V); CE summed over trained tokens (labels != -100), count them

Labels of the causal LM are aligned with ``input_ids`` (transformers' convention); the shift
happens here: logits at t predict the label at t+1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE
from gradtune.objective import Output


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.logits


class ClassificationObjective:
    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        logits = _forward(model, batch).float()  # (B, K)
        y = batch["labels"]  # (B,) long
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(-1) == y).sum()
        return Output(loss, torch.tensor(y.numel()), {"correct": correct.detach()})


class RegressionObjective:
    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        pred = _forward(model, batch).float().reshape(batch["labels"].shape)  # (B,)
        err = pred - batch["labels"].float()
        loss = (err * err).sum()
        return Output(loss, torch.tensor(err.numel()),
                      {"sq_err": loss.detach(), "abs_err": err.abs().sum().detach()})


class CausalLMObjective:
    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        logits = _forward(model, batch)[:, :-1].float()  # (B, T-1, V): predicts tokens 1..T-1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        trained = targets != IGNORE
        correct = ((logits.argmax(-1) == targets) & trained).sum()
        return Output(loss, trained.sum(), {"correct": correct.detach()})
