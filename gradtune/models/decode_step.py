"""fast_decoder's float32 (B, 1) decoding steps through models/decode_kernel.py's C library.

Batch 1: ``Step``, the whole step in one call. Batches: ``BatchStep``, the GEMMs of fast_decoder's
torch path (oneDNN-packed, or the model's own weights when a short call does not pack) with
everything between them -- rotary, the cache write, attention over the cache with the pads
masked, residual adds, RMSNorm, SiLU * up -- one C call each: four GEMMs (or their plain parts)
and four calls a layer, where the torch ops path takes ~35 kernel calls.

Both read the Decoder's own weights, cache and rotary tables, so a step taken either way leaves
the cache as the other would (the prefill, t > 1, always runs through torch).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from gradtune.models import decode_kernel
from gradtune.models.decode_kernel import plain


class Step:
    """A fast_decoder.Weights and its Decoder's cache bound for ``decode_f32``: the pointers
    gathered once; ``__call__`` runs one batch-1 step. Holds every tensor it points into."""

    def __init__(self, lib: ctypes.CDLL, w, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.lib, self.w, self.k, self.v, self.cos, self.sin = lib, w, k, v, cos, sin
        layers, _, kvh, cap, d = k.shape
        ptrs, eps = [], []
        for li, (norm_in, qkv, o, norm_post, gate_up, down, _) in enumerate(w.layers):
            (wq, bq), (wk, bk), (wv, bv) = qkv.parts
            (wo, _), (wg, _), (wu, _), (wd, _) = o.parts[0], *gate_up.parts, down.parts[0]
            row = [norm_in[0], wq, wk, wv, bq, bk, bv, wo, norm_post[0], wg, wu, wd]
            ptrs += [0 if t is None else t.data_ptr() for t in row] + [k[li].data_ptr(), v[li].data_ptr()]
            eps += [norm_in[1], norm_post[1]]
        self.ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.eps = (ctypes.c_float * len(eps))(*eps)
        hidden, inter, vocab = w.embed.shape[1], w.layers[0][4].sizes[0], w.head.parts[0][0].shape[0]
        self.dims = (ctypes.c_int64 * 8)(hidden, w.heads, w.kv_heads, d, inter, cap, vocab, layers)
        self.scale, self.vocab, self.cap = float(w.layers[0][6]), vocab, cap
        qd = w.heads * d
        self.scratch = torch.empty(2 * hidden + qd + 2 * kvh * d + qd + 2 * inter + w.heads * cap)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, at: int) -> torch.Tensor:
        """ids (1, 1) at cache row ``at`` (rows < at filled; no pads: its position is ``at`` too)
        -> its logits (1, V)."""
        w, logits, token, pos = self.w, torch.empty(1, self.vocab), int(ids[0, 0]), at
        self.lib.decode_f32(
            self.ptrs, self.eps, self.dims, self.scale,
            w.embed[token].data_ptr(), self.cos[pos].data_ptr(), self.sin[pos].data_ptr(), pos,
            w.norm[0].data_ptr(), w.norm[1], w.head.parts[0][0].data_ptr(),
            logits.data_ptr(), self.scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return logits


def _joined(packed, x: torch.Tensor) -> torch.Tensor:
    """x (B, in) -> (B, sum of out_i): a Packed's layers side by side, one GEMM when oneDNN packed
    them, else its plain GEMMs (biases added) joined."""
    if packed.kind == "onednn":
        return packed.whole(x)
    parts = packed(x)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class BatchStep:
    """A Decoder's float32 weights, cache, rotary tables and pad mask bound for batches:
    ``__call__`` runs one (B, 1) step, four GEMMs (oneDNN-packed or plain) and four C calls a layer."""

    def __init__(self, lib, w, k, v, cos, sin, valid: Optional[torch.Tensor]) -> None:
        self.lib, self.w, self.k, self.v, self.cos, self.sin, self.valid = lib, w, k, v, cos, sin, valid
        _, rows, kvh, cap, d = k.shape
        hidden, inter = w.embed.shape[1], w.layers[0][4].sizes[0]
        self.shape = (rows, w.heads, kvh, d, cap, hidden, inter)
        self.x, self.xn = torch.empty(rows, hidden), torch.empty(rows, hidden)  # residual stream, normed
        self.att, self.h = torch.empty(rows, w.heads * d), torch.empty(rows, inter)
        self.scratch = torch.empty(rows * w.heads * (d + cap))
        self.caches = list(zip((c.data_ptr() for c in k), (c.data_ptr() for c in v)))
        # each layer's output goes through the next layer's input norm, the last one's the final norm
        self.next_norms = [(n.data_ptr(), eps) for (n, eps), *_ in w.layers[1:]] + [(w.norm[0].data_ptr(), w.norm[1])]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, at: int) -> torch.Tensor:
        """ids (B, 1) at cache row ``at``, positions pos (B, 1) -> logits (B, V)."""
        lib, nt, w = self.lib, torch.get_num_threads(), self.w
        rows, heads, kvh, d, cap, hidden, inter = self.shape
        torch.index_select(w.embed, 0, ids.reshape(-1), out=self.x)  # (B, hidden)
        pos = pos.contiguous()
        x, xn, att, h = self.x.data_ptr(), self.xn.data_ptr(), self.att.data_ptr(), self.h.data_ptr()
        common = (
            pos.data_ptr(),
            self.cos.data_ptr(),
            self.sin.data_ptr(),
            0 if self.valid is None else self.valid.data_ptr(),
        )
        norm0 = w.layers[0][0]
        lib.add_rms_f32(x, None, norm0[0].data_ptr(), norm0[1], xn, rows, hidden)
        for (_, qkv, o, (post, eps), gate_up, down, scale), (kc, vc), nxt in zip(
            w.layers, self.caches, self.next_norms
        ):
            y = _joined(qkv, self.xn)  # (B, (heads + 2 kv_heads) d); rotated in place below
            lib.attend_f32(
                y.data_ptr(), kc, vc, rows, heads, kvh, d, cap, at, *common, scale, att, self.scratch.data_ptr(), nt
            )
            out = _joined(o, self.att)  # (B, hidden); held while the call reads it
            lib.add_rms_f32(x, out.data_ptr(), post.data_ptr(), eps, xn, rows, hidden)
            gu = _joined(gate_up, self.xn)  # (B, 2 inter)
            lib.silu_mul_f32(h, gu.data_ptr(), rows, inter, nt)
            out = _joined(down, self.h)
            lib.add_rms_f32(x, out.data_ptr(), nxt[0], nxt[1], xn, rows, hidden)
        return _joined(w.head, self.xn)  # (B, V)


def applies(w) -> bool:
    """Whether fast_decoder's weights ``w`` can run in the C step: the library builds, float32 on
    the CPU, plain (not packed) contiguous weights, biases only on q/k/v, one attention scale."""
    head = w.head.parts[0] if w.head.kind == "plain" else (None, None)
    if head[0] is None or head[1] is not None or not all(plain(t) for t in (head[0], w.embed, w.norm[0])):
        return False
    for norm_in, qkv, o, norm_post, gate_up, down, scale in w.layers:
        packs = (qkv, o, gate_up, down)
        if any(p.kind != "plain" for p in packs) or scale != w.layers[0][6]:
            return False
        if any(b is not None for p in packs[1:] for _, b in p.parts):
            return False
        if not all(plain(t) for t in [norm_in[0], norm_post[0]] + [t for p in packs for part in p.parts for t in part]):
            return False
    return decode_kernel.load() is not None


def batch_applies(w) -> bool:
    """Whether ``w`` can run in BatchStep: float32 on the CPU, each projection packed by oneDNN or
    plain contiguous weights (biases allowed there)."""
    packs = [w.head] + [p for layer in w.layers for p in layer[1:6] if hasattr(p, "kind")]
    if w.embed.dtype != torch.float32 or any(p.kind not in ("onednn", "plain") for p in packs):
        return False
    weights = [t for p in packs if p.kind == "plain" for part in p.parts for t in part]
    norms = [w.norm[0]] + [n for layer in w.layers for n in (layer[0][0], layer[3][0])]
    return all(plain(t) for t in norms + weights) and decode_kernel.load() is not None


def bind(w, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: Optional[torch.Tensor]):
    """A Step (batch 1, no pads) or BatchStep for fast_decoder's weights ``w``, cache (layers, B,
    kv_heads, S, D) ``k``/``v``, rotary tables (S, D) ``cos``/``sin`` (signed) and pad mask (B, S)
    ``valid``; None where neither applies (``applies``, ``batch_applies``; under torch.compile)."""
    if torch.compiler.is_compiling() or not all(plain(t) for t in (k, v, cos, sin)):
        return None
    if k.shape[1] == 1 and valid is None and applies(w):
        return Step(decode_kernel.load(), w, k, v, cos, sin)
    if valid is not None and (valid.dtype != torch.bool or not valid.is_contiguous()):
        return None
    return BatchStep(decode_kernel.load(), w, k, v, cos, sin, valid) if batch_applies(w) else None
