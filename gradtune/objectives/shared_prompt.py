"""Log-probabilities of G completions per prompt, each prompt's forward run once.

GRPO scores S = B G rows: G sampled completions of each of B prompts, prompt-major. A forward
over each row's [prompt; completion] spends most of its tokens on the prompt (~50 prompt tokens
for ~10 completion tokens in the README's example), the same prompt G times over. Here the B
prompts run once (left-padded, position ids counted from each prompt's first token), their keys
and values are repeated to the G rows of each group, and only the completions (right-padded,
S rows) run on top, attending to their prompt through the cache. The backward goes through the
repeat, so each prompt position receives the sum of its G completions' gradients: the full
forward's gradient, up to float rounding (other matmul shapes, and the sum taken before the
model's float32 RMSNorm instead of after it). A preference pair is a group of two (``pair_logps``:
chosen row i and rejected row B + i, the prompt being everything before the first scored label).

Only for transformers causal LMs whose forward takes a cache (``cache``, ``past_key_values``
before transformers 5), ``position_ids`` and ``logits_to_keep``; other models (our GPT, activation
checkpointing, which turns the cache off) take the full forward (``supports``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.data.sequences import IGNORE
from gradtune.objectives.logits import float32


def supports(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    # transformers 5.x: is_activation_checkpointing (the old name warns); before: is_gradient_checkpointing
    name = (
        "is_activation_checkpointing"
        if hasattr(type(inner), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(inner, name, False) or not hasattr(inner, "config"):
        return False
    if any(c.__name__ == "FSDPModule" for c in type(inner).__mro__):  # two forwards per backward: not tried
        return False
    return _cache_arg(type(inner)) != ""


@functools.cache
def _cache_arg(cls: type) -> str:
    """The forward's cache argument ("cache" since transformers 5.x, "past_key_values" before), or
    "" where the forward takes no cache, positions or ``logits_to_keep``."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return ""
    if not all(k in params for k in ("position_ids", "logits_to_keep", "use_cache")):
        return ""
    return next((k for k in ("cache", "past_key_values") if k in params), "")


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: torch.Tensor,
    g: int,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token log-probabilities (S, L-1) in ``logits.token_logps``' layout (the value at t
    scores the token at t + 1; 0 where that token is a prompt token or padding) of rows
    input_ids (S, L) = [prompt; completion; pads] (attention_mask (S, L) marks prompt and
    completion), whose G consecutive rows share one prompt of ``prompt_len`` (S,) tokens.
    ``labels`` (S, L): only the completion tokens they do not IGNORE are scored (else all)."""
    s, width = input_ids.shape
    dev = input_ids.device
    plen, total = prompt_len.tolist(), attention_mask.sum(1).tolist()
    heads = list(range(0, s, g))  # the first row of each group holds its prompt
    if any(plen[r] != plen[r + k] for r in heads for k in range(g)):
        raise ValueError("the G rows of a group must share one prompt")
    if min(plen) < 1:  # a row's first token has no prediction to score it
        raise ValueError("each row needs a prompt of at least one token")
    w = max(plen[r] for r in heads)
    prompts = torch.zeros(len(heads), w, dtype=input_ids.dtype, device=dev)  # (B, W), pads on the left
    pmask = torch.zeros(len(heads), w, dtype=attention_mask.dtype, device=dev)
    for b, r in enumerate(heads):
        prompts[b, w - plen[r] :] = input_ids[r, : plen[r]]
        pmask[b, w - plen[r] :] = 1
    inner = getattr(model, "module", model)  # the completions' forward below goes through DDP's
    first = inner(
        input_ids=prompts,
        attention_mask=pmask,
        position_ids=(pmask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,  # (B, 1, V): the prediction of each completion's first token
    )
    arg = _cache_arg(type(inner))
    cache = first.get("cache")  # ModelOutput keys hold the fields that are set
    cache = cache if cache is not None else first.get("past_key_values")
    cache.batch_repeat_interleave(g)  # (B, ...) -> (S, ...), differentiable

    c = max(t - p for t, p in zip(total, plen))
    cols = torch.arange(c, device=dev)
    clen = torch.tensor([t - p for t, p in zip(total, plen)], device=dev)
    cmask = (cols[None] < clen[:, None]).to(attention_mask.dtype)  # (S, C)
    starts = torch.tensor(plen, device=dev)[:, None]
    at = (starts + cols[None]).clamp(max=width - 1)  # (S, C) positions of completion tokens in the rows
    completions = torch.where(cmask.bool(), input_ids.gather(1, at), torch.zeros_like(at))
    logits = model(
        input_ids=completions,
        attention_mask=torch.cat([pmask.repeat_interleave(g, 0), cmask], 1),
        position_ids=starts + cols[None],
        **{arg: cache},
    ).logits  # (S, C, V): column k predicts completion token k + 1
    preds = torch.cat([first.logits.repeat_interleave(g, 0), logits[:, :-1]], 1)  # column k predicts token k
    preds = float32(preds)
    if temperature != 1.0:
        preds = preds / temperature
    targets = torch.where(cmask.bool(), completions, torch.full_like(completions, IGNORE))
    lp = -F.cross_entropy(
        preds.reshape(-1, preds.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(s, c)
    out = lp.new_zeros(s, width - 1)
    keep = cmask.bool() if labels is None else cmask.bool() & (labels.gather(1, at) != IGNORE)
    rows = torch.arange(s, device=dev)[:, None].expand(s, c)
    return out.index_put((rows[keep], (at - 1)[keep]), lp[keep])  # token at p is scored at p - 1


def group_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    g: int,
    temperature: float = 1.0,
) -> Optional[torch.Tensor]:
    """``token_logps`` (S, L-1) of rows whose G consecutive rows share the prompt before their
    first scored label (``labels`` (S, L)); None where they do not (a row without one, a prompt
    that differs or is empty) or the model cannot (``supports``): the caller runs the whole rows."""
    s = input_ids.shape[0]
    scored = labels != IGNORE  # (S, L)
    if s % g or not supports(model) or not bool(scored.any(1).all()):
        return None
    plen = scored.float().argmax(1)  # (S,) the first scored position of each row
    heads, lens = input_ids[0::g], plen[0::g]  # (B, L), (B,): the first row of each group
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    same = (input_ids == heads.repeat_interleave(g, 0)) | (cols >= plen[:, None])  # (S, L)
    if not bool((plen == lens.repeat_interleave(g)).all()) or int(lens.min()) < 1 or not bool(same.all()):
        return None
    return token_logps(model, input_ids, attention_mask, plen, g, temperature, labels)


def pair_logps(model: nn.Module, batch: dict, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """``group_logps`` of preference rows: chosen row i and rejected row B + i, a group of two
    (KTO's second half pairs mismatched prompts: None, as for every row ``group_logps`` refuses)."""
    if "attention_mask" not in batch or "document_ids" in batch or batch["input_ids"].shape[0] % 2:
        return None
    s = batch["input_ids"].shape[0]
    order = torch.arange(s, device=labels.device).view(2, s // 2).t().reshape(-1)  # c0, r0, c1, r1, ...
    out = group_logps(model, batch["input_ids"][order], batch["attention_mask"][order], labels[order], 2)
    return None if out is None else out[torch.argsort(order)]
