"""Sampling text from a GPT: greedy, temperature, top-k, top-p (nucleus); KV cache by default.

temperature == 0 (or None) is greedy argmax decoding, token-for-token what transformers'
``generate(do_sample=False)`` returns. With a KV cache the prompt runs once (prefill) and each
new token is one (B, 1) forward; without it (``use_cache=False``, or when the text would outgrow
block_size) every step recomputes the last block_size tokens, as nanoGPT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.models.gpt import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top_k / the smallest set with mass >= top_p. (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass *before* it already reaches top_p: the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float | None, top_k: int | None,
               top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B, 1)."""
    if not temperature:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
             temperature: float | None = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extend input_ids (B, T) by up to max_new_tokens -> (B, T + n).

    eos_id: a row that emitted it keeps emitting it (padding); generation stops once all rows
    did. seed makes sampling reproducible without touching the global RNG."""
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    block_size = model.config.block_size
    cache = None
    if use_cache and input_ids.shape[1] + max_new_tokens <= block_size:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, input_ids.shape[0], dtype, input_ids.device)
    out = input_ids
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    step_input = input_ids
    for _ in range(max_new_tokens):
        if cache is None:
            step_input = out[:, -block_size:]  # crop: positions only go up to block_size
        logits = model(step_input, cache=cache)[:, -1, :]  # (B, V): only the last position matters
        tok = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            tok = tok.masked_fill(done, eos_id)
            done |= tok == eos_id
        out = torch.cat([out, tok], dim=1)
        step_input = tok
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return out
