"""Causal language modelling: predict token t+1 from tokens <= t, a cross-entropy per token.

The loss is a *sum* over non-ignored tokens and the count is the number of those tokens (see
objective.py). Dividing once by the whole batch's token count makes micro-batched gradients
equal the one-shot gradient even when micro-batches hold different numbers of ignored (-100)
labels -- averaging per micro-batch would weight a token in a mostly-padded micro-batch more.
"""

from __future__ import annotations

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.objective import Output

IGNORE = -100  # label value that contributes neither loss nor count (padding, prompt tokens)


def logits_of(out: object) -> torch.Tensor:
    """(B, T, V) logits from a model's output: a tensor, a (logits, ...) tuple, or an HF output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits  # type: ignore[attr-defined]


class CausalLM:
    """model(input_ids (B, T)) -> logits (B, T, V) against labels (B, T), -100 ignored."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        from gradtune import losses

        labels = batch["labels"]
        logits = logits_of(model(batch["input_ids"]))  # (B, T, V)
        loss_sum = losses.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE,
                                        label_smoothing=self.label_smoothing)
        return Output(loss_sum, (labels != IGNORE).sum(), {})
