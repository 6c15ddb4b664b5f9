"""Decoding for Llama-family transformers causal LMs (llama, mistral, qwen2) without transformers'
per-step machinery: the same weights and arithmetic, fewer and faster kernel calls.

Why: a decoding step is one (B, 1) token through every layer. Through the transformers module
it is ~20 module calls per layer, a DynamicCache that concatenates, masks and rotary tables
rebuilt every step, and seven ``F.linear`` per layer whose weight the GEMM re-packs on every call
at B > 1 (reading the whole weight once more per step; bench/generate.py shows what it costs).
Here:

- at B > 1 (float32) and in bfloat16, weights packed once for the step's batch (``Packed``):
  oneDNN's reordered weight (bfloat16's plain ``F.linear`` at B = 1 takes a slow path), q/k/v
  and gate/up as one GEMM each; float32 at B = 1 (a GEMV, no packing to save) reads the model's
  own weights. Asked to (``keep``), the packed copy is kept for the next call until a parameter
  changes (``weights``: keyed by the parameters' storages and in-place versions);
- per call, one preallocated KV cache (layers, B, Hkv, S, D), written in place; a rotary table for every
  position the call can reach, computed by the model's own rotary module (its rope scaling);
- attention by SDPA on the cache's filled prefix (grouped heads without repeating k/v).
- float32 on the CPU: each cached (B, 1) step through C (models/decode_step.py): at batch 1 one call
  for the whole step, in batches the packed GEMMs with one C call between each two.

Left-padded batches: ``mask`` (B, T) marks real prompt tokens; positions count real tokens only
(as transformers' generate does: cumsum - 1), pads are never attended to.

LoRA layers (gradtune.finetune) are read duck-typed, as their effective weight W + scaling B A
(a copy; the model is not changed). A model ``supported`` does not recognise (another family, a
quantised layer, dynamic rope) decodes through transformers.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from gradtune.models import decode_step

FAMILIES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")  # a table fixed by position alone (not "dynamic")


def _readable(m: nn.Module) -> bool:
    """An nn.Linear, or a LoRA layer over one (not a quantised base: its weight is codes)."""
    base = getattr(m, "base", None)
    return type(m) is nn.Linear or (type(base) is nn.Linear and callable(getattr(m, "delta_weight", None)))


def linear_weight(m: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(effective weight (out, in), bias) of an nn.Linear or a LoRA-wrapped one; None otherwise."""
    if type(m) is nn.Linear:
        return m.weight.detach(), None if m.bias is None else m.bias.detach()
    base, delta = getattr(m, "base", None), getattr(m, "delta_weight", None)
    if type(base) is nn.Linear and callable(delta):
        w = base.weight.detach()
        w = w if getattr(m, "merged", False) else w + delta().detach()
        return w, None if base.bias is None else base.bias.detach()
    return None


class Packed:
    """(x W_1^T (+ b_1), x W_2^T, ...) for x (N, in), one output per layer: the weights packed once
    for N = ``rows`` where that is faster -- bfloat16, and float32 at N > 1: the layers' W
    concatenated into one oneDNN-reordered weight, one GEMM (any N runs on it, the prefill's too;
    faster at N = 8 than F.linear's GEMM, which re-packs W at every call, and than MKL's packed
    sgemm per layer: bench/generate.py) -- and elsewhere (float32 at N = 1, a GPU, biases) the
    model's own weights through F.linear's kernel. Memory: one packed copy of the weights."""

    def __init__(self, mods: list[nn.Module], rows: int, pack: bool = True) -> None:
        parts = [linear_weight(m) for m in mods]
        self.parts: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = [p for p in parts if p is not None]
        assert len(self.parts) == len(mods)  # supported() checked every layer
        w0, self.kind, self.rows = self.parts[0][0], "plain", rows
        self.sizes = [w.shape[0] for w, _ in self.parts]
        if w0.device.type != "cpu" or any(b is not None for _, b in self.parts):
            return
        # float32 at N = 1 is a GEMV: no packing to save (and oneDNN's is slower than mm's there).
        if not (w0.dtype == torch.bfloat16 or (w0.dtype == torch.float32 and rows > 1 and pack)):
            return
        try:
            if torch.backends.mkldnn.is_available():
                w = torch.cat([w for w, _ in self.parts]) if len(self.parts) > 1 else w0.contiguous()
                self.packed, self.kind = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows), "onednn"
                self.parts = []  # the packed copy is all __call__ reads (a LoRA layer's W + B A: freed)
        except (RuntimeError, AttributeError):  # a build without the op: the plain GEMM
            self.kind = "plain"

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, sum of out_i), the layers' outputs side by side (kind "onednn" only)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (N, in) -> (N, out_i) per layer."""
        if self.kind == "onednn":
            y = self.whole(x)
            return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)
        if x.dim() == 2:  # F.linear's own kernel (mm / addmm on W^T), minus its dispatch layers
            return tuple(torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()) for w, b in self.parts)
        return tuple(F.linear(x, w, b) for w, b in self.parts)


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is a Llama-family transformers model of plain (or LoRA) linear layers."""
    config, inner = getattr(model, "config", None), getattr(model, "model", None)
    if getattr(config, "model_type", None) not in FAMILIES or inner is None or model.training:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "sliding_window", None) is not None:
        return False
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ROPE_TYPES:
        return False
    if type(getattr(model, "lm_head", None)) is not nn.Linear or model.lm_head.bias is not None:
        return False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        extra = {n for n, _ in attn.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj"}
        if extra or {n for n, _ in mlp.named_children()} - {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            return False  # q/k norms (qwen3), other attention designs: transformers' path
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(_readable(m) for m in projections):
            return False
    return True


class Weights:
    """The model's weights as decoding reads them: fused, packed for ``rows`` (a copy)."""

    def __init__(self, model: nn.Module, rows: int, pack: bool = True) -> None:
        inner, config = model.model, model.config
        self.embed = inner.embed_tokens.weight.detach()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        for lyr in inner.layers:
            a, m = lyr.self_attn, lyr.mlp
            self.layers.append(
                (
                    (lyr.input_layernorm.weight.detach(), lyr.input_layernorm.variance_epsilon),
                    Packed([a.q_proj, a.k_proj, a.v_proj], rows, pack),
                    Packed([a.o_proj], rows, pack),
                    (lyr.post_attention_layernorm.weight.detach(), lyr.post_attention_layernorm.variance_epsilon),
                    Packed([m.gate_proj, m.up_proj], rows, pack),
                    Packed([m.down_proj], rows, pack),
                    getattr(a, "scaling", self.dim**-0.5),
                )
            )
        self.norm = (inner.norm.weight.detach(), inner.norm.variance_epsilon)
        self.head = Packed([model.lm_head], rows, pack)
        self.rows, self.pack = rows, pack
        # A copy worth keeping for the next call: a packed weight, or a LoRA layer's W + B A.
        self.copied = self.head.kind != "plain" or any(
            getattr(m, "delta_weight", None) is not None and not getattr(m, "merged", False) for m in model.modules()
        )


# model -> (storages, witness, Weights): the last packed copy, for the next generate call (a
# chat, an eval, GRPO's rollouts of one step) while the weights stay as they were.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[list[StorageWeakRef], tuple, Weights]]" = (
    weakref.WeakKeyDictionary()
)


def _witness(model: nn.Module) -> tuple:
    """Per parameter (storage address, in-place version, dtype, shape): changes with every torch
    write (an optimizer step -- gradtune's fused C kernel counts its writes --, load_state_dict,
    a LoRA merge) and every new storage (``.to``, ``p.data = ...``: the kept storages' weak
    references tell a new storage at a freed one's address). Writes that bypass the version
    counter (``p.data.copy_``) are not seen: call ``forget(model)`` after them."""
    return tuple((p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for p in model.parameters())


def weights(model: nn.Module, rows: int, pack: bool = True, keep: bool = True) -> Weights:
    """``Weights(model, rows, pack)``; with ``keep``, the last kept call's copy while ``model``'s
    parameters are unchanged (one packed copy per model kept between calls: the memory of one
    more model copy at most, freed with the model or by ``forget``). keep=False: a fresh copy,
    nothing kept -- for callers whose weights may be written around the version counter."""
    if not keep:
        return Weights(model, rows, pack)
    try:
        witness = _witness(model)
    except (RuntimeError, TypeError, NotImplementedError):  # inference tensors, DTensors: no key
        return Weights(model, rows, pack)
    kept = _PACKED.get(model)
    if kept is not None and kept[1] == witness and not any(r.expired() for r in kept[0]):
        if kept[2].rows == rows and kept[2].pack >= pack:
            return kept[2]
    _PACKED.pop(model, None)  # free the old copy before building the new one
    w = Weights(model, rows, pack)
    if w.copied:
        _PACKED[model] = ([StorageWeakRef(p.untyped_storage()) for p in model.parameters()], witness, w)
    return w


def forget(model: nn.Module) -> None:
    """Drop ``model``'s kept packed copy (after writing its weights around torch's version counter)."""
    _PACKED.pop(model, None)


def _spread(x: torch.Tensor, r: int) -> torch.Tensor:
    """Each row of x r times in a row (dim 0): a group's computed row copied to its r rows."""
    return x if r == 1 else x.repeat_interleave(r, 0)


class Decoder:
    """One ``generate`` call's decoding state: the packed weights, KV cache, rotary table, positions."""

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        capacity: int,
        mask: Optional[torch.Tensor],
        pack: bool = True,
        keep: bool = False,
        repeats: int = 1,
    ) -> None:
        w = weights(model, rows, pack, keep)
        # The prompt (the first call) comes ``repeats`` times in consecutive rows (several samples
        # of one prompt): it runs once per group and its keys and values are copied to the rows.
        self.repeats = repeats
        self.w, self.heads, self.kv_heads, self.dim = w, w.heads, w.kv_heads, w.dim
        p, inner = w.embed, model.model
        # Rotary table (capacity, D) in the model's dtype, from the model's own rotary module.
        positions = torch.arange(capacity, device=p.device)[None]
        cos, sin = inner.rotary_emb(torch.empty(0, dtype=p.dtype, device=p.device), positions)
        half = self.dim // 2
        self.cos, self.sin_signed = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # (S, D)
        shape = (len(w.layers), rows, self.kv_heads, capacity, self.dim)
        self.k = torch.empty(shape, dtype=p.dtype, device=p.device)
        self.v = torch.empty(shape, dtype=p.dtype, device=p.device)
        self.kv = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per layer (B, Hkv, S, D) views
        self.length = 0
        # keys (B, capacity): True where a real token sits; None when no row is padded
        self.valid = None
        self.next_pos = None  # (B, 1) the next token's position in each row
        if mask is not None and not bool(mask.all()):
            self.valid = torch.ones(rows, capacity, dtype=torch.bool, device=p.device)
            self.valid[:, : mask.shape[1]] = mask.bool()
        # float32 on the CPU: each (B, 1) step through C (models/decode_step.py)
        self.step = decode_step.bind(w, self.k, self.v, self.cos, self.sin_signed, self.valid)

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' LlamaRMSNorm (statistics in float32, then w times the result in the input
        dtype) through F.rms_norm: the same values in fewer Python calls."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) for the halves (x1, x2) of D:
        here (x2, x1) * (-sin1, sin2), the same products. x (B, t, H, D), cos/sin (B, t, 1, D)."""
        swapped = x.roll(x.shape[-1] // 2, -1)  # (x2, x1): one kernel, where unflatten/flip/flatten took three calls
        return x * cos + swapped * sin

    def _qkv(
        self, qkv: Packed, x: torch.Tensor, b: int, t: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B t, hidden) -> rotated q (B, t, H, D), rotated k and v (B, t, Hkv, D)."""
        h, hkv, d = self.heads, self.kv_heads, self.dim
        if qkv.kind == "onednn":  # q and k: neighbouring columns of one GEMM's output, one rotation
            y = qkv.whole(x)  # (B t, (H + 2 Hkv) D)
            qk = self._rope(y[:, : (h + hkv) * d].view(b, t, h + hkv, d), cos, sin)
            return qk[:, :, :h], qk[:, :, h:], y[:, (h + hkv) * d :].view(b, t, hkv, d)
        q, k, v = qkv(x)
        return (
            self._rope(q.view(b, t, h, d), cos, sin),
            self._rope(k.view(b, t, hkv, d), cos, sin),
            v.view(b, t, hkv, d),
        )

    def _positions(self, t: int) -> torch.Tensor:
        """(B, t) positions of the t new tokens: real tokens counted (left pads do not move them)."""
        if self.next_pos is None:
            if self.valid is None:
                pos = torch.arange(t, device=self.k.device)[None].expand(self.k.shape[1], t)
            else:
                pos = (self.valid[:, :t].long().cumsum(-1) - 1).clamp(min=0)
        else:
            pos = self.next_pos + torch.arange(t, device=self.k.device)[None]
        self.next_pos = pos[:, -1:] + 1
        return pos

    def _mask(self, t: int, end: int) -> Optional[torch.Tensor]:
        """(B, 1, t, end) bool, True where a query may attend; None: causal only (no pads)."""
        if self.valid is None:
            return None
        keys = self.valid[:, None, None, :end]
        if t == 1:
            return keys
        causal = torch.ones(t, end, dtype=torch.bool, device=keys.device).tril(end - t)
        # A pad query may see nothing real: let it see itself (its output is never used).
        itself = torch.zeros(t, end, dtype=torch.bool, device=keys.device)
        itself[:, end - t :] = torch.eye(t, dtype=torch.bool, device=keys.device)
        return (keys & causal) | itself

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, t) after the ``length`` already cached -> last-position logits (B, V)."""
        b, t = ids.shape
        if t == 1 and self.step is not None:
            logits = self.step(ids, self._positions(1), self.length)  # (B, V)
            self.length += 1
            return logits
        start, end = self.length, self.length + t
        r = self.repeats if start == 0 else 1  # rows computed: one of every r (B / r = b of them)
        pos = self._positions(t)[::r]  # (b, t); all B rows' next positions kept for the later steps
        mask = self._mask(t, end)
        mask = None if mask is None else mask[::r]
        ids, b = ids[::r], b // r
        cos, sin = self.cos[pos][:, :, None], self.sin_signed[pos][:, :, None]  # (b, t, 1, D)
        x = F.embedding(ids, self.w.embed).reshape(b * t, -1)  # (b t, hidden)
        h, hkv, d = self.heads, self.kv_heads, self.dim
        for (norm_in, qkv, o, norm_post, gate_up, down, scale), (k_cache, v_cache) in zip(self.w.layers, self.kv):
            q, k, v = self._qkv(qkv, self._rms(x, *norm_in), b, t, cos, sin)  # (b, t, H | Hkv, D)
            q = q.transpose(1, 2)  # (b, H, t, D)
            k_cache[:, :, start:end] = _spread(k.transpose(1, 2), r)  # (B, Hkv, t, D)
            v_cache[:, :, start:end] = _spread(v.transpose(1, 2), r)
            attn = F.scaled_dot_product_attention(
                q,
                k_cache[::r, :, :end],
                v_cache[::r, :, :end],
                attn_mask=mask,
                is_causal=mask is None and t > 1,
                scale=scale,
                enable_gqa=h != hkv,
            )  # (B, H, t, D)
            x = x + o(attn.transpose(1, 2).reshape(b * t, h * d))[0]
            g, u = gate_up(self._rms(x, *norm_post))
            x = x + down(F.silu(g) * u)[0]
        self.length = end
        last = x.view(b, t, -1)[:, -1]  # (b, hidden)
        return _spread(self.w.head(self._rms(last, *self.w.norm))[0], r)  # (B, V)
