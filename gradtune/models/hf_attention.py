"""Attention for Hugging Face models: transformers' SDPA, except where attention dropout is on.

Why: with dropout on the attention probabilities, torch's SDPA on the CPU leaves its fused
kernels for the math path and draws the mask with ``bernoulli_`` (see models/dropout.py); for an
encoder fine-tuned at 128 tokens that mask is the largest single cost of the forward. This
function computes the same attention with the cheap mask:

    q (B, H, T, D), k/v (B, Hkv, S, D)  ->  softmax(q k^T * scale + mask) (B, H, T, S), float32
    -> dropout -> @ v -> (B, T, H, D)

Without dropout (eval, generation, causal LMs that train with none) it is transformers' own
``sdpa_attention_forward`` unchanged. Registered under NAME, with SDPA's mask builder, in
transformers' attention and mask interfaces; ``config._attn_implementation`` is not saved with a
model, so an exported folder still loads with plain transformers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from gradtune.models.dropout import attention as dropout_attention

NAME = "gradtune_sdpa"


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward  # lazy: heavy

    plain = (
        dropout == 0.0
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    out = dropout_attention(query, key, value, attention_mask, causal, dropout, scaling)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make NAME known to transformers (idempotent); returns NAME."""
    from transformers import AttentionInterface  # lazy: heavy
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME
