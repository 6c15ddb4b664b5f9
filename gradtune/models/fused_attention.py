"""Float32 attention with dropout on the CPU in one C pass per head, each way (models/dropout.py's
fast path; the C source is models/attention_kernel.py).

Why: through torch ops, dropout attention is eight passes over the (B, H, T, S) scores forward and
backward each (batched GEMMs with a short inner dimension, the bias, softmax, the mask, its
backward), plus copies of the head-split q, k, v and of the output. For an encoder fine-tuned at
128 tokens the batched products run at half the rate of the large GEMMs. Here one OpenMP task per
(batch, head) keeps that head's rows in cache: the scores of four query rows at a time, the bias,
softmax, the mask and the product with v, without a (B, H, T, S) temporary besides the
probabilities kept for backward; backward regenerates the mask, forms the softmax gradient row by
row and accumulates dk and dv in the task's own buffers. q, k, v and the output gradient are read
through their strides (transformers' head-split views need no copy) and the output and gradients
are written in (B, T, H, D) memory, the layout the next linear layer reads.

The arithmetic is the composite path's (dropout.py ``_DropoutAttention``):

    P = softmax(scale * q k^T + bias)            (B, H, T, S), kept for backward
    out = (P * keep) @ v * inv_kq                keep: the seeded mask of mask_kernel.py, 0 or 1
    dP = (go @ v^T) * keep * inv_kq;  dS = P * (dP - rowsum(dP * P))
    dq = scale * dS @ k;  dk = scale * dS^T @ q;  dv = (P * keep)^T @ go * inv_kq

with the same mask for the same seed (element ((b * H + h) * T + i) * S + j of the mask stream), a
polynomial exp (Cephes' expf) and sums in another order, so results agree with the
composite path to float32 rounding. Two more cases, for decoders (models/gpt.py, through
dropout.py ``attention``):

- causal: query i sees keys 0 .. i + S - T. A block of query rows computes scores only up to its
  last row's last key, so the products, the softmax and backward do about half the work of the
  full square; probabilities past a row's keys are 0 and stay so in backward;
- grouped k/v heads (H / G of them, each serving G query heads): read in place, no repeated copies;
  backward runs one task per k/v head and sums its G query heads' dk, dv there.

p = 0 (drop 0) skips the mask's hashing. Heads whose size is not 1 to 8 vectors (of 16 floats on
AVX-512, 8 on AVX2), and CPUs with neither, take the composite path (``supports``); so does
everything where ``load`` gives None (no compiler, a failed build).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from gradtune.models.attention_kernel import Shape, Strides, load


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    """The kernel takes these (B, H, T, D) / (B, H / G, S, D) operands: float32 (or each one of
    ``dtypes``) on the CPU, none empty, k/v heads dividing the q heads, the head size D 1 to 8
    vectors, the kernel built, no torch.compile trace."""
    if not all(x.dtype in dtypes and x.device.type == "cpu" and x.dim() == 4 for x in (q, k, v)):
        return False
    if q.numel() == 0 or k.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False
    lib = load()
    width = lib.attn_width() if lib is not None else 0
    d = q.shape[-1]
    heads, kv = q.shape[1], k.shape[1]
    same = k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[-1] == d
    return width > 0 and d % width == 0 and 1 <= d // width <= 8 and same and heads % kv == 0


# Keys per head dimension up to which a causal window at p = 0 keeps its probabilities for backward:
# (B, H, T, S) floats, at most 8 x the (B, H, T, D) of each of q, k, v and the output, about the size
# of the layer's other saved activations. Longer windows with a gradient to follow take torch's
# flash attention, whose backward recomputes them (memory linear in S); with dropout (the composite
# path kept them too) or without a gradient (nothing kept), the kernel takes any length.
KEPT_KEYS_PER_DIM = 8


def takes_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> bool:
    """``causal`` takes these: float32 or bfloat16 operands (mixed, as autocast leaves them: rotated
    q, k float32, v bfloat16) ``supports`` takes, T <= S, 0 <= p < 1, and at p = 0 with a gradient
    to follow at most KEPT_KEYS_PER_DIM x D keys."""
    if not (0.0 <= p < 1.0 and q.shape[2] <= k.shape[2] and supports(q, k, v, (torch.float32, torch.bfloat16))):
        return False
    keeps = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return p > 0.0 or not keeps or k.shape[2] <= KEPT_KEYS_PER_DIM * q.shape[-1]


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int, drop: int, scale: float, inv_kq: float):
    """Causal ``FusedAttention`` (no bias) as ``takes_causal`` allows. bfloat16 operands (autocast's
    projections) are computed in float32, the kernel's arithmetic (on CPUs without AMX also faster
    than SDPA in bfloat16), and the output is bfloat16 then, as SDPA's under autocast, still in
    (B, T, H, D) memory."""
    out = attend(q.float(), k.float(), v.float(), None, seed, drop, scale, inv_kq, True)
    low = torch.bfloat16 in (q.dtype, k.dtype, v.dtype)
    return out.to(torch.bfloat16) if low else out


def _strides(x: Optional[torch.Tensor]) -> Strides:
    return Strides(0, 0, 0) if x is None else Strides(x.stride(0), x.stride(1), x.stride(2))


def _last_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_last(b: int, h: int, t: int, d: int) -> torch.Tensor:
    """A (B, H, T, D) tensor in (B, T, H, D) memory: what the output projection reads after the
    head merge, so that transpose + contiguous there is free."""
    return torch.empty(b, t, h, d, dtype=torch.float32).transpose(1, 2)


def _forward(q, k, v, bias, seed: int, drop: int, scale: float, inv_kq: float, causal: bool, keep: bool):
    """(out, probs or None, the kernel's Shape, q, k, v as the kernel read them); ``keep``: write the
    probabilities backward needs into a (B, H, T, S) tensor, else only into the tasks' scratch."""
    q, k, v = _last_dense(q), _last_dense(k), _last_dense(v)
    (bsz, heads, t, d), s = q.shape, k.shape[2]
    if causal and t > s:
        raise ValueError(f"causal attention needs T <= S, got T={t}, S={s}")
    if bias is not None:
        bias = _last_dense(bias.to(torch.float32).expand(bsz, heads, t, s))
    out = _heads_last(bsz, heads, t, d)
    width = load().attn_width()  # the kernel stores each row's keys rounded up to whole vectors
    probs = torch.empty(bsz, heads, t, -(-s // width) * width, dtype=torch.float32) if keep else None
    shape = Shape(bsz, heads, t, s, d, _strides(q), _strides(k), _strides(v), _strides(out), _strides(bias))
    shape.scale, shape.inv_kq, shape.seed, shape.drop = scale, inv_kq, seed, drop
    shape.causal, shape.G = int(causal), heads // k.shape[1]
    load().attn_fwd(
        ctypes.byref(shape),
        out.data_ptr(),
        None if probs is None else probs.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        None if bias is None else bias.data_ptr(),
        torch.get_num_threads(),
    )
    return out, probs, shape, q, k, v


def attend(q, k, v, bias, seed: int, drop: int, scale: float, inv_kq: float, causal: bool = False) -> torch.Tensor:
    """``FusedAttention`` where a gradient may follow; without one (evaluation, generation, no_grad)
    the forward alone, keeping no (B, H, T, S) probabilities."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return FusedAttention.apply(q, k, v, bias, seed, drop, scale, inv_kq, causal)
    with torch.profiler.record_function("FusedAttention"):  # as the autograd function shows in a profile
        return _forward(q, k, v, bias, seed, drop, scale, inv_kq, causal, keep=False)[0]


class FusedAttention(torch.autograd.Function):
    """(softmax(scale q k^T + bias) * keep) @ v * inv_kq for q (B, H, T, D), k/v (B, H / G, S, D),
    bias additive, broadcastable to (B, H, T, S), or None; keep the mask_kernel.py mask of
    (seed, drop) over (B, H, T, S); ``causal``: query i sees keys 0 .. i + S - T (T <= S).
    Returns (B, H, T, D) in (B, T, H, D) memory."""

    @staticmethod
    def forward(ctx, q, k, v, bias, seed: int, drop: int, scale: float, inv_kq: float, causal: bool = False):
        out, probs, shape, q, k, v = _forward(q, k, v, bias, seed, drop, scale, inv_kq, causal, keep=True)
        ctx.save_for_backward(q, k, v, probs)
        ctx.shape = shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # C / oneDNN calls: no graph of their own
    def backward(ctx, go):
        q, k, v, probs = ctx.saved_tensors
        go = _last_dense(go)
        (bsz, heads, t, d), (kv, s) = q.shape, k.shape[1:3]
        gq, gk, gv = _heads_last(bsz, heads, t, d), _heads_last(bsz, kv, s, d), _heads_last(bsz, kv, s, d)
        shape = ctx.shape
        shape.o, shape.gq, shape.gk, shape.gv = _strides(go), _strides(gq), _strides(gk), _strides(gv)
        load().attn_bwd(
            ctypes.byref(shape),
            gq.data_ptr(),
            gk.data_ptr(),
            gv.data_ptr(),
            probs.data_ptr(),
            go.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            torch.get_num_threads(),
        )
        return gq, gk, gv, None, None, None, None, None, None
