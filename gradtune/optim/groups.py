"""Optimizer parameter groups for weight decay: matrices decay, biases and norm gains never do.

Decaying a bias or a norm's gain pulls it towards 0, which only hurts (nanoGPT, LitGPT and the
HF Trainer all exempt them). ``model.parameters()`` yields a tied tensor once, so a tied
embedding / output matrix is in exactly one group.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


def decay_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = True
) -> Optional[list[dict[str, Any]]]:
    """[{2-D trainable params, weight_decay}, {the rest, 0.0}]; None when weight_decay is 0
    (one group of every trainable parameter). ``decay_embeddings=False`` also exempts
    ``nn.Embedding`` tables (some recipes do; nanoGPT decays them)."""
    if weight_decay == 0:
        return None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
