"""Trainable vs total parameter counts, the first line to read after choosing a method."""

from __future__ import annotations

from torch import nn


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())  # parameters() de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module) -> str:
    """One line, e.g. ``trainable 147,456 / 22,860,672 parameters (0.645%)``."""
    trainable, total = count(model)
    return f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.3g}%)"
