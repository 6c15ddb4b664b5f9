"""Dropout with a cheap mask on the CPU.

Why: torch's CPU dropout (``bernoulli_``) draws a float per element; on the attention
probabilities of an encoder (B x H x T x T, e.g. 16 x 12 x 128 x 128 = 3.1M elements a layer)
that is a third of a fine-tuning step's forward. Here each element gets a 15-bit uniform
integer u: on the CPU from one parallel C pass that writes the mask in its final dtype
(models/mask_kernel.py: a counter-based hash of a seed drawn from torch's generator); without a
C compiler (or off the CPU) from torch ops, four per 64-bit ``random_`` draw:

    keep  <=>  u >= round(p * LEVELS),   u uniform on [0, LEVELS)
    q     =  1 - round(p * LEVELS) / LEVELS      the keep probability (|q - (1 - p)| <= 1.6e-5)
    y     =  x * keep / q                        so E[y] = x exactly, as with torch's dropout

The mask is applied as a product with its bytes (``x * keep``, keep a bool mask viewed as uint8):
torch's CPU ``where(mask, 0, x)`` is not vectorised and costs ~10x that product on a
(16, 12, 128, 128) tensor. The backward saves the mask (1 byte an element; torch's CPU dropout
saves a float mask of x's dtype). The draws come from torch's default generator, so a run's RNG
state (saved in checkpoints) fixes every mask: a resumed run draws the same masks. Elsewhere than on the CPU
(CUDA's dropout is one fused kernel) and for p = 1, torch's own dropout runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.models import fused_attention, mask_kernel

LEVELS = 1 << 15  # 15 random bits per element: each int16 of an int64 draw, masked to 15 bits


def _levels(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, int, float]:
    """(u uniform on [0, LEVELS) of ``shape`` as int16, the drop level round(p * LEVELS), q):
    torch ops, where the C kernel (models/mask_kernel.py) is not available."""
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    u = words.view(torch.int16)[:n].bitwise_and_(LEVELS - 1)  # (n,) four per word; the top bit cleared
    drop, q = _drop(p)
    return u.view(shape), drop, q


def _drop(p: float) -> tuple[int, float]:
    """(the drop level round(p * LEVELS), q the keep probability)."""
    drop = round(p * LEVELS)
    return drop, 1.0 - drop / LEVELS


def scaled_keep(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype, on: float) -> torch.Tensor:
    """A mask of ``shape`` in ``dtype``: ``on`` where kept (probability q), 0 where dropped; the
    same draw as ``keep_mask``. On the CPU one parallel C pass writes it (mask_kernel.py)."""
    if device.type == "cpu":
        drop, _ = _drop(p)
        out = mask_kernel.mask(shape, drop, on, dtype)
        if out is not None:
            return out
    keep, _ = keep_mask(shape, p, device)
    out = keep.to(dtype)
    return out.mul_(on) if on != 1.0 else out


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool mask of ``shape``, True (drop) with probability 1 - q; q) for drop probability ``p``."""
    keep, q = keep_mask(shape, p, device)
    return keep.logical_not_(), q


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool mask of ``shape``, True (keep) with probability q; q)."""
    keep, q = keep_bytes(shape, p, device)
    return keep.view(torch.bool), q


def keep_bytes(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """``keep_mask`` as uint8 0/1 (the bool mask's own bytes, no copy), for ``x * keep``."""
    drop, q = _drop(p)
    if device.type == "cpu":
        out = mask_kernel.mask(shape, drop, 1.0, torch.uint8)
        if out is not None:
            return out, q
    u, drop, q = _levels(shape, p, device)
    return (u >= drop).view(torch.uint8), q


class _Masked(torch.autograd.Function):
    """y = x * keep * scale (keep uint8 0/1, so y = 0 where dropped, as torch's dropout: a
    product); backward the same on the gradient, from the saved mask. One pass (two with a
    scale) each way; a uint8 operand is read as is, where a bool one is first copied to x's dtype
    and ``where``/``masked_fill`` run unvectorised on the CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        y = x * keep
        return y.mul_(scale) if scale != 1.0 else y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (keep,) = ctx.saved_tensors
        gx = g * keep
        return (gx.mul_(ctx.scale) if ctx.scale != 1.0 else gx), None, None


class _Seeded(torch.autograd.Function):
    """y = x * mask, the mask (0 or ``on``) regenerated from its seed each way (mask_kernel.py):
    one pass forward and one backward, and no mask kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, drop: int, on: float) -> torch.Tensor:
        ctx.mask = (seed, drop, on)
        return mask_kernel.times(x, seed, drop, on)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return mask_kernel.times(g, *ctx.mask), None, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheap mask on the CPU (module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return F.dropout(x, p, training)
    if mask_kernel.fusable(x):
        drop, q = _drop(p)
        return _Seeded.apply(x, mask_kernel.draw(), drop, 1.0 / q)  # the mask of scaled_keep(.., 1 / q)
    if x.dtype in (torch.float32, torch.float64):
        # The scale inside the mask (0 or 1/q in x's dtype, the value a scalar product uses): one product each way
        # instead of two (and no uint8 -> float copy per product), for a saved mask of x's size.
        q = _drop(p)[1]
        return _Masked.apply(x, scaled_keep(x.shape, p, x.device, x.dtype, 1.0 / q), 1.0)
    keep, q = keep_bytes(x.shape, p, x.device)  # bf16/fp16: 1/q rounded to x's dtype would change the product
    return _Masked.apply(x, keep, 1.0 / q)  # the scale is a Python float


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheap CPU mask; same ``p``, same state (none), same modes."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training)


def swap_dropouts(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` in ``model`` by :class:`Dropout` (same p); returns how many."""
    n = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
                n += 1
    return n


def _keep_times(t: torch.Tensor, keep: "torch.Tensor | tuple[int, int]", inplace: bool) -> torch.Tensor:
    """t * keep: keep a float 0/1 tensor, or (seed, drop) of the mask_kernel mask (regenerated)."""
    if isinstance(keep, torch.Tensor):
        return t.mul_(keep) if inplace else t * keep
    return mask_kernel.times(t, keep[0], keep[1], 1.0, inplace=inplace)


class _DropoutAttention(torch.autograd.Function):
    """out = (softmax(scale q k^T + bias) * keep) @ v / kq for float32 q (B, H, T, D), k, v
    (B, H, S, D), bias additive (broadcast to (B, H, T, S)) or None, keep the float 0/1 mask
    (B, H, T, S), or (seed, drop) of the C kernel's mask (mask_kernel.py), regenerated in
    backward instead of kept. The same products as autograd takes through ``attention``'s
    composite path, but every (B, H, T, S) temporary is this function's own, so the scores take
    the bias in place and backward masks its probability gradient in place: a (B, H, T, S) pass
    and block fewer each way (12.6 MB at 16 x 12 x 128 x 128), and no head-split copies in backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, scale: float, inv_kq: float):
        # Contiguous once (q with its scale, in the same pass): the batched GEMMs would copy a head-split view at
        # every use, twice here and four times in backward; a transposed contiguous operand they take as it is.
        q = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        k, v = k.contiguous(), v.contiguous()
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S)
        if bias is not None:
            scores.add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        dropped = _keep_times(probs, keep, inplace=False)
        tensor = isinstance(keep, torch.Tensor)
        ctx.save_for_backward(q, k, v, probs, dropped, keep if tensor else None)
        ctx.scale, ctx.inv_kq, ctx.seeded = scale, inv_kq, None if tensor else keep
        return torch.matmul(dropped, v).mul_(inv_kq)  # (B, H, T, D)

    @staticmethod
    def backward(ctx, go):  # go (B, H, T, D), often a transposed view
        q, k, v, probs, dropped, keep = ctx.saved_tensors
        keep = keep if ctx.seeded is None else ctx.seeded
        need = ctx.needs_input_grad
        go = torch.mul(go, ctx.inv_kq, out=torch.empty(go.shape, dtype=go.dtype, device=go.device))  # contiguous
        gv = torch.matmul(dropped.transpose(-1, -2), go) if need[2] else None
        gd = _keep_times(torch.matmul(go, v.transpose(-1, -2)), keep, inplace=True)  # (B, H, T, S): dropout's backward
        gs = torch._softmax_backward_data(gd, probs, -1, probs.dtype)
        del gd
        gq = torch.matmul(gs, k).mul_(ctx.scale) if need[0] else None
        gk = torch.matmul(gs.transpose(-1, -2), q) if need[1] else None
        return gq, gk, gv, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA's math path with the cheap mask on the probabilities (SDPA's own CPU dropout leaves
    its fused kernels for the math path anyway and draws with ``bernoulli_``).
    q (B, H, T, D), k/v (B, H, S, D), mask (T, S) or broadcastable: bool (True = attend) or
    additive float; ``causal``: queries see keys up to their own position (aligned at the end).
    Returns (B, H, T, D)."""
    t, s = q.shape[2], k.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if causal and mask is None and t > 1 and q.device.type == "cpu" and fused_attention.takes_causal(q, k, v, p):
        # Decoders (models/gpt.py): one C pass a head each way over the keys each query sees, any p,
        # grouped k/v heads read in place (fused_attention.py). p = 0 draws no seed.
        drop, kq = _drop(p) if p > 0.0 else (0, 1.0)
        return fused_attention.causal(q, k, v, mask_kernel.draw() if p > 0.0 else 0, drop, scale, 1.0 / kq)
    if causal and mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    # The scale on q (B, H, T, D), not on the scores (B, H, T, S): S / D times fewer elements, as SDPA's math path.
    if (
        0.0 < p < 1.0
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and (mask is None or not mask.requires_grad)
    ):
        bias = mask
        if mask is not None and mask.dtype == torch.bool:  # additive: -> finfo.min where masked, as the fill below
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        drop, kq = _drop(p)
        if mask_kernel.fusable(q):
            keep: "torch.Tensor | tuple[int, int]" = (mask_kernel.draw(), drop)  # scaled_keep's draw
            if fused_attention.supports(q, k, v):  # the same mask and products, one C pass a head each way
                return fused_attention.attend(q, k, v, bias, keep[0], drop, scale, 1.0 / kq)
        else:
            keep = scaled_keep(torch.Size((q.shape[0], q.shape[1], t, s)), p, q.device, q.dtype, 1.0)  # 0/1
        return _DropoutAttention.apply(q, k, v, bias, keep, scale, 1.0 / kq)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is not None and mask.dtype == torch.bool:  # a finite fill keeps all-masked rows finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, S)
    if p <= 0.0 or p >= 1.0 or probs.device.type != "cpu":
        return torch.matmul(dropout(probs, p), v)
    # dropout(probs) @ v with its 1/q scale applied to the (B, H, T, D) product instead of the
    # (B, H, T, S) probabilities: the same value up to rounding, S / D times fewer elements.
    keep, kq = keep_bytes(probs.shape, p, probs.device)
    return torch.matmul(_Masked.apply(probs, keep, 1.0), v) * (1.0 / kq)
