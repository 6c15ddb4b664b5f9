"""Causal language modelling: predict token t+1 from tokens <= t, a cross-entropy per token.

The loss is a *sum* over non-ignored tokens and the count is the number of those tokens (see
output.py). Dividing once by the whole batch's token count makes micro-batched gradients equal
the one-shot gradient even when micro-batches hold different numbers of ignored (IGNORE)
labels -- averaging per micro-batch would weight a token in a mostly-padded micro-batch more.

Two label conventions, one objective:
    shift=False  labels (B, T) are already the next tokens (our text windows: y = x shifted)
    shift=True   labels (B, T) are aligned with input_ids (transformers' convention): logits
                 at t are scored against the label at t+1
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE
from gradtune.objectives import losses
from gradtune.objectives.logits import forward, forward_trained
from gradtune.objectives.output import Output


class CausalLM:
    def __init__(
        self,
        label_smoothing: float = 0.0,
        shift: bool = False,
        token_accuracy: bool = False,
        token_bytes: Optional[torch.Tensor] = None,
    ) -> None:
        self.label_smoothing, self.shift = label_smoothing, shift
        self.token_accuracy = token_accuracy  # also sum correct next-token guesses (one argmax over V)
        # (V,) UTF-8 bytes of each token (data/token_bytes.py): also sum the predicted tokens'
        # bytes, so that a loss per byte compares runs across tokenizers
        self.token_bytes = token_bytes

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        labels = batch["labels"]  # (B, T)
        if self.shift:  # (B, K, V), (B, K): from the first position that predicts a trained token
            logits, labels = forward_trained(model, batch, labels)
            logits, labels = logits[:, :-1], labels[:, 1:]  # (B, K-1, V), (B, K-1)
        else:
            logits = forward(model, batch)  # (B, T, V)
        loss_sum = losses.cross_entropy(
            logits, labels, reduction="sum", ignore_index=IGNORE, label_smoothing=self.label_smoothing
        )
        trained = labels != IGNORE
        metrics = {}
        if self.token_accuracy:
            metrics["correct"] = ((logits.detach().argmax(-1) == labels) & trained).sum()
        if self.token_bytes is not None:
            if self.token_bytes.device != labels.device:
                self.token_bytes = self.token_bytes.to(labels.device)
            metrics["bytes"] = torch.where(trained, self.token_bytes[labels.clamp(min=0)], 0).sum()
        return Output(loss_sum, trained.sum(), metrics)
