"""Sampling text from a causal LM, our GPT or a Hugging Face one: greedy, temperature, top-k,
top-p (nucleus); KV cache by default.

temperature == 0 (or None) is greedy argmax decoding, token-for-token what transformers'
``generate(do_sample=False)`` returns. With a KV cache the prompt runs once (prefill) and each
new token is one (B, 1) forward; without it (``use_cache=False``), and from the step where the
text would outgrow the model's context, every step recomputes the last ``context_length``
tokens, as nanoGPT does.

The model families differ only in how one forward is called, so one loop serves all:
``_gpt_forward`` (gradtune.models.gpt.GPT and its preallocated KVCache), ``_fast_forward``
(Llama-family transformers models, cached steps: models/fast_decoder.py, the same arithmetic
with packed, fused weights and one preallocated cache) and ``_hf_forward`` (any other
transformers causal LM through its own cache object, and every uncached step). A model
transformed by gradtune.finetune (LoRA swaps nn.Linear layers *inside* it) is still the same
transformers object; the fast decoder reads a LoRA layer as its effective weight W + B A.

Batches of different prompts: left-pad them and pass ``attention_mask`` (B, T), 0 on the pads;
positions count real tokens only, as transformers' generate does.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.models import fast_decoder
from gradtune.models.gpt import GPT, KVCache

# (ids (B, t), cache or None, cached?, mask (B, L) of the whole text so far or None: no pads)
#   -> (last-position logits (B, V), cache to pass next step)
Forward = Callable[[torch.Tensor, Any, bool, Optional[torch.Tensor]], tuple[torch.Tensor, Any]]


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


def next_token(
    logits: torch.Tensor,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B, 1). A list of n generators:
    the B rows are n equal consecutive groups, group i drawn with generator i alone."""
    if not temperature:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (B, V)
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator)
    rows = probs.shape[0] // len(generator)
    return torch.cat(
        [torch.multinomial(probs[i * rows : (i + 1) * rows], 1, generator=g) for i, g in enumerate(generator)]
    )


def context_length(model: nn.Module) -> Optional[int]:
    """The most positions ``model`` attends over: GPT's block_size, an HF config's
    max_position_embeddings (GPT-2 maps n_positions onto it); None when the config names none."""
    if isinstance(model, GPT):
        return model.config.block_size
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def takes_padding(model: nn.Module) -> bool:
    """Whether ``generate`` takes left-padded rows (an ``attention_mask``) for ``model``: every
    transformers causal LM; not our GPT, whose rows must be of equal length."""
    return not isinstance(model, GPT)


def _gpt_forward(model: GPT) -> Forward:
    """Our GPT: a KVCache preallocated to block_size, filled by GPT.forward in place."""

    def forward(
        ids: torch.Tensor, cache: Optional[KVCache], cached: bool, mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        if mask is not None:
            raise ValueError("generate: our GPT takes no attention_mask; give rows of equal length")
        if cached and cache is None:
            dtype = next(model.parameters()).dtype
            cache = KVCache(model.config, ids.shape[0], dtype, ids.device)
        logits = model(ids, cache=cache if cached else None)  # (B, t, V)
        return logits[:, -1, :], cache

    return forward


def _hf_forward(model: nn.Module) -> Forward:
    """A transformers causal LM with its own cache: the first cached call (cache None, use_cache)
    makes one (DynamicCache for most models) and returns it; later calls pass it back with the
    new (B, 1) token, and the model derives positions from the cache's length. Equal-length rows
    need no attention_mask: no padding, so the causal mask is the whole story."""
    params = inspect.signature(model.forward).parameters
    # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40).
    cache_arg = "cache" if "cache" in params else "past_key_values"
    # As transformers' generate: no (B, t, V) logits for a prefill that needs only the last row.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def forward(ids: torch.Tensor, cache: Any, cached: bool, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        kwargs = dict(extra, input_ids=ids, use_cache=cached)
        if mask is not None:  # left pads: transformers' generate's positions (real tokens counted)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, L)
            kwargs.update(attention_mask=mask, position_ids=positions[:, -ids.shape[1] :])
        if cached and cache is not None:
            kwargs[cache_arg] = cache
        out = model(**kwargs)
        if not cached:
            return out.logits[:, -1, :], None
        new_cache = out.get("cache")  # ModelOutput keys hold the fields that are set
        return out.logits[:, -1, :], new_cache if new_cache is not None else out.get("past_key_values")

    return forward


# Packing float32 weights for a batch (fast_decoder.Packed) costs a few passes over them, about
# as much as some decoding steps at that batch, and saves part of every later step; below this
# many new tokens it does not pay back (bfloat16 is always packed: its unpacked GEMM is the slow one).
PACK_MIN_TOKENS = 32


def _fast_forward(
    model: nn.Module, capacity: int, mask: Optional[torch.Tensor], new_tokens: int, keep: bool, repeats: int
) -> Optional[Forward]:
    """Cached steps through fast_decoder (built at the first cached call), uncached ones through
    transformers; None when the fast decoder does not know the model, or under autocast (whose
    per-op casts transformers' forward takes and the packed GEMMs would not)."""
    if not fast_decoder.supported(model) or torch.is_autocast_enabled(next(model.parameters()).device.type):
        return None
    hf_forward = _hf_forward(model)

    def forward(
        ids: torch.Tensor, cache: Any, cached: bool, text_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        if not cached:
            return hf_forward(ids, None, False, text_mask)
        if cache is None:
            pack = new_tokens >= PACK_MIN_TOKENS
            cache = fast_decoder.Decoder(model, ids.shape[0], capacity, mask, pack, keep, repeats)
        return cache(ids), cache

    return forward


def _check_repeats(input_ids: torch.Tensor, mask: Optional[torch.Tensor], repeats: int) -> None:
    rows = input_ids.shape[0]
    if repeats < 1 or rows % repeats:
        raise ValueError(f"generate: repeats={repeats} does not split {rows} rows into equal groups")
    for t in (input_ids, mask):
        if repeats > 1 and t is not None and not torch.equal(t, t[::repeats].repeat_interleave(repeats, 0)):
            raise ValueError(f"generate: repeats={repeats}, but the rows of a group are not the same prompt")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | list[int] | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    keep_packed: bool = False,
    repeats: int = 1,
) -> torch.Tensor:
    """Extend input_ids (B, T) by up to max_new_tokens -> (B, T + n), for our GPT or an HF causal LM.

    eos_id: a row that emitted it keeps emitting it (padding); generation stops once all rows
    did. seed makes sampling reproducible without touching the global RNG; a list of n seeds splits
    the B rows into n equal consecutive groups, each drawing from its own generator (the draws of
    a group do not depend on the other groups: several prompts' samples in one batch). attention_mask
    (B, T), HF models: 1 on tokens, 0 on left pads (prompts of different lengths in one batch).
    keep_packed: keep the fast decoder's packed weights for the next call until a parameter
    changes (fast_decoder.weights): for repeated calls on weights written only by torch ops and
    gradtune's optimizers (a ``p.data`` write is not seen: fast_decoder.forget after one).
    repeats: input_ids (and attention_mask) hold each prompt that many times in consecutive rows
    (several samples of one prompt, as GRPO draws them): the fast decoder runs each prompt once and
    copies its keys and values to the rows (the other paths run every row)."""
    if temperature is not None and (math.isnan(temperature) or temperature < 0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    limit = context_length(model)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)  # (B, T), grows by a column a step
    capacity = input_ids.shape[1] + max_new_tokens if limit is None else min(input_ids.shape[1] + max_new_tokens, limit)
    _check_repeats(input_ids, mask, repeats)
    forward = (
        None
        if isinstance(model, GPT) or not use_cache
        else _fast_forward(model, capacity, mask, max_new_tokens, keep_packed, repeats)
    )
    if forward is None:
        forward = _gpt_forward(model) if isinstance(model, GPT) else _hf_forward(model)
    generator: torch.Generator | list[torch.Generator] | None = None
    if isinstance(seed, list):
        if not seed or input_ids.shape[0] % len(seed):
            raise ValueError(f"generate: {len(seed)} seeds do not split {input_ids.shape[0]} rows into equal groups")
        generator = [torch.Generator(device=input_ids.device).manual_seed(s) for s in seed]
    elif seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    out, step_input, cache, cached = input_ids, input_ids, None, use_cache
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    try:
        for _ in range(max_new_tokens):
            if cached and limit is not None and out.shape[1] > limit:
                # The cache cannot grow past the context: from here on, recompute a sliding
                # window, exactly what the uncached path has done all along.
                cached, cache = False, None
            window = mask
            if not cached:
                step_input = out if limit is None else out[:, -limit:]  # (B, <= limit)
                window = mask if mask is None or limit is None else mask[:, -limit:]
            logits, cache = forward(step_input, cache, cached, window)  # (B, V): the last position only
            tok = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                tok = tok.masked_fill(done, eos_id)
                done |= tok == eos_id
            out = torch.cat([out, tok], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            step_input = tok
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return out
