"""A new classification or regression head on a pretrained encoder's pooled output.

body(input_ids, attention_mask).last_hidden_state (B, T, H) -> pool -> (B, H) -> Linear -> (B, K)
K = number of classes (classification) or targets (regression, usually 1). Pooling is ``mean``
over real tokens (padding excluded via the attention mask; what sentence encoders like MiniLM
were trained with) or ``cls`` (the first token, BERT's classifier convention).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gradtune.finetune.feature_cache import FeatureCache
from gradtune.runtime.errors import InputError

Pooling = Literal["mean", "cls"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class EncoderWithHead(nn.Module):
    """``body`` is the pretrained encoder (kept whole so it saves and exports as HF expects)."""

    def __init__(
        self,
        body: nn.Module,
        num_outputs: int,
        pooling: Pooling = "mean",
        dropout: float = 0.1,
        cache_features: bool = False,
    ) -> None:
        super().__init__()
        # A frozen body (method head) in eval mode, each text's pooled features computed once (feature_cache.py).
        self.cache = FeatureCache() if cache_features else None
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        hidden = body.config.hidden_size
        self.body, self.pooling, self.num_outputs = body, pooling, num_outputs
        self.dropout = nn.Dropout(dropout)
        p = next(body.parameters())
        self.head = nn.Linear(hidden, num_outputs, device=p.device, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=0.02)  # BERT's initializer_range
        nn.init.zeros_(self.head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: torch.Tensor
    ) -> torch.Tensor:  # -> logits or predictions (B, K)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.cache is not None and not any(p.requires_grad for p in self.body.parameters()):
            pooled = self.cache.features(self.body, input_ids, attention_mask, self.features)
        else:
            pooled = self.features(input_ids, attention_mask)
        return self.head(self.dropout(pooled))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T), (B, T) -> (B, H) float32: the body's pooled output."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling).float()


def add_head(
    body: nn.Module, num_outputs: int, pooling: Pooling = "mean", dropout: float = 0.1, cache_features: bool = False
) -> EncoderWithHead:
    """Wrap ``body`` with a fresh, trainable head; the body's ``requires_grad`` flags are left as
    the fine-tuning method set them (frozen for ``head``, LoRA-only for ``lora``...).

    One exception: a BERT-style ``pooler`` (tanh dense on CLS) is frozen, since the head pools
    ``last_hidden_state`` itself; left trainable it would get no gradient (the audit's catch).
    Not in place: returns the wrapper (whose ``.body`` is the same module object).
    """
    pooler = getattr(body, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    return EncoderWithHead(body, num_outputs, pooling, dropout, cache_features)
