"""A frozen base held quantised (weight-only, blockwise), dequantised per matmul.

    quantize_model(model, "nf4", skip=[model.get_output_embeddings()])   # before LoRA / head

What is quantised: every ``nn.Linear`` of the pretrained body (attention projections, MLP, a
BERT pooler), each replaced by a ``QuantLinear``. What is not: embeddings, the output head /
``lm_head`` (tied to the embedding in most small LMs: quantising it would untie or double it),
norms and biases (tiny), and everything added afterwards (LoRA factors, a classification head),
which stays float32 and trains.

Formats, per row of W (out, in), in blocks of ``BLOCK`` weights along the input dimension (the
row is zero-padded to a whole number of blocks; padding is never read back):
  * int8: s = absmax / 127 per block (float32); q = round(w / s) in [-127, 127]; w' = q * s, so
    |w - w'| <= s / 2. 1 + 4/64 bytes per weight.
  * nf4 (QLoRA, Dettmers et al. 2023): s = absmax per block (float32); q = the index of the
    nearest of the 16 NormalFloat levels ``NF4`` to w / s, two 4-bit codes per byte (first code
    in the high nibble); w' = NF4[q] * s. 0.5 + 4/64 bytes per weight. No double quantisation.

A .gguf base (``source=``): its layers stored as Q4_0 / Q4_1 / Q8_0 keep the file's own blocks
(gguf_blocks.py; float16 scales, 32 weights each) rather than being re-quantised from the float32
weights transformers expanded them to: the quantised base then computes what the float32 base does.

Codes, scales and bias are buffers, not parameters, so the optimizer, the audit and the
trainable count see nothing there; they are non-persistent, so checkpoints and
model.safetensors do not store them: the base is re-read and re-quantised (deterministically)
on resume and reload. ``dequantized_weights`` gives them back as float32 for a merged export.
"""

from __future__ import annotations

import ctypes
import gc
import platform
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.finetune.gguf_blocks import BLOCK_KINDS, QK, Blocks, dequantize_blocks, gguf_file, read_blocks
from gradtune.runtime.errors import InputError

BLOCK = 64  # weights per scale, along the input dimension
KINDS = ("int8", "nf4")
# QLoRA's NormalFloat4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# Byte -> its two levels (high nibble first): one gather per byte when dequantising. (256, 2)
_NF4_PAIRS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], dim=-1)
_ROWS = 256  # rows per chunk in nf4's nearest-level search: its (rows, in, 16) temporary stays small


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """(out, in) float -> (out, n_blocks, block) float32, zero-padded along in."""
    out, n_in = w.shape
    pad = -n_in % block
    w = w.detach().to(torch.float32)
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out, -1, block)


def quantize_int8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, n_blocks * block), scales float32 (out, n_blocks)) of W (out, in)."""
    b = _blocks(w, block)
    scales = b.abs().amax(dim=-1) / 127.0  # (out, n_blocks)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero block: codes 0
    codes = torch.round(b / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(b.shape[0], -1), scales


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest NF4 level to each x in [-1, 1]; ties take the lower level."""
    flat = x.reshape(x.shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.uint8)
    for i in range(0, flat.shape[0], _ROWS):
        rows = flat[i : i + _ROWS]
        out[i : i + _ROWS] = (rows[..., None] - NF4).abs().argmin(dim=-1).to(torch.uint8)
    return out.reshape(x.shape)


def quantize_nf4(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 (out, n_blocks * block / 2), absmax float32 (out, n_blocks)) of W."""
    if block % 2:
        raise InputError(f"nf4 packs two codes per byte: block must be even, got {block}")
    b = _blocks(w, block)
    scales = b.abs().amax(dim=-1)  # (out, n_blocks)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = nf4_codes(b / safe[..., None]).reshape(b.shape[0], -1)  # (out, n_blocks * block)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], scales


def unpack_nf4(packed: torch.Tensor) -> torch.Tensor:
    """(out, n / 2) uint8 -> (out, n) int64 code indices, the high nibble first."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).long()


def dequantize(
    kind: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    n_in: int,
    dtype: torch.dtype = torch.float32,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' (out, n_in) in ``dtype``: computed in float32, then cast. ``pairs``: the nf4 byte table
    already on the codes' device (else copied there)."""
    out, n_blocks = scales.shape
    if kind == "int8":
        values = codes.to(torch.float32)
    else:
        table = pairs if pairs is not None else _NF4_PAIRS.to(scales.device)
        values = table[codes.long()]  # (out, n / 2, 2)
    w = (values.reshape(out, n_blocks, -1) * scales[..., None]).reshape(out, -1)
    return w[:, :n_in].to(dtype)


class _DequantMatmul(torch.autograd.Function):
    """y = x W'^T with W' rebuilt from the codes in forward and again in backward: autograd
    keeps no (out, in) float weight alive between them (F.linear would save it for backward,
    holding every layer's dequantised weight until the backward pass reaches it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:  # (..., in) -> (..., out)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # (..., out) -> (..., in)
        w = ctx.layer.dequantize(grad.dtype)  # (out, in)
        return (grad @ w).to(ctx.x_dtype), None


class QuantLinear(nn.Linear):
    """A frozen linear layer whose weight is held as int8 or nf4 codes plus float32 block scales,
    or as a GGUF tensor's own Q4_0 / Q4_1 / Q8_0 blocks (``blocks=``; ``kind`` is then theirs).

    An ``nn.Linear`` subclass so that everything that selects linear layers by type (LoRA
    targets, PEFT target names) still finds it, but with no parameters: ``weight`` is a
    read-only property that dequantises (a float32 temporary, for shape / dtype / export).
    """

    def __init__(self, linear: nn.Linear, kind: str, block: int = BLOCK, blocks: Blocks | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        if kind not in KINDS:
            raise InputError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight
        if blocks is not None:  # a GGUF tensor's own blocks (gguf_blocks.py): kept, not re-rounded
            kind, block, codes, scales = blocks.kind, QK, blocks.codes, blocks.scales
        else:
            codes, scales = (quantize_int8 if kind == "int8" else quantize_nf4)(w.detach().cpu(), block)
        self.kind, self.block = kind, block
        self.register_buffer("codes", codes.to(w.device), persistent=False)
        self.register_buffer("scales", scales.to(w.device), persistent=False)
        mins = None if blocks is None or blocks.mins is None else blocks.mins.to(w.device)
        self.register_buffer("mins", mins, persistent=False)  # q4_1's per-block offsets, else None
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        # nf4's byte -> two levels table (2 KiB), a buffer so that it moves with the module
        self.register_buffer("pairs", _NF4_PAIRS.clone() if kind == "nf4" else None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind in BLOCK_KINDS:
            return dequantize_blocks(self.kind, self.codes, self.scales, self.mins, self.in_features, dtype)
        return dequantize(self.kind, self.codes, self.scales, self.in_features, dtype, self.pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return _DequantMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kind={self.kind}, block={self.block}"
        )


def _release() -> None:
    """Collect the float weights just dropped and give the freed heap back to the system
    (glibc keeps freed blocks below its mmap threshold in the heap, counted in RSS)."""
    gc.collect()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def quantize_model(
    model: nn.Module, kind: str, skip: Iterable[nn.Module | None] = (), source: str | Path | None = None
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` but those in ``skip`` by a ``QuantLinear``, one
    at a time, so each float weight is freed as soon as its codes exist. In place; returns the
    names replaced. Raises ``InputError`` if there is none. ``source``: the model's source; when
    it is a .gguf file, layers stored there as Q4_0 / Q4_1 / Q8_0 keep those blocks (``kind``
    applies to the rest)."""
    skipped = {id(m) for m in skip if m is not None}
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and id(m) not in skipped]  # noqa: E721 (not QuantLinear)
    if not names:
        raise InputError(f"quantize={kind}: {type(model).__name__} has no linear layer to quantise")
    path = gguf_file(source)
    kept = read_blocks(path, names) if path is not None else {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear, blocks = getattr(parent, child), kept.pop(name, None)
        if blocks is not None and tuple(blocks.scales.shape) != (linear.out_features, -(-linear.in_features // QK)):
            blocks = None  # not the module the file's tensor names (another architecture): re-quantise
        setattr(parent, child, QuantLinear(linear, kind, blocks=blocks))
    _release()
    return names


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every quantised layer by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantised layers' codes + scales + biases, bytes of every parameter)."""
    quant = sum(b.numel() * b.element_size() for m in quant_layers(model).values() for b in m.buffers())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return quant, params


def dequantized_state(model: nn.Module, lora: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<layer>.weight`` / ``.bias`` of every quantised layer under the names the float model
    had, dequantised to float32, with the LoRA update of a wrapping layer (a name in ``lora``)
    folded in: what a merged export needs, the buffers being absent from ``state_dict``."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in quant_layers(model).items():
        owner = name[: -len(".base")] if name.endswith(".base") else None
        wrapper = lora.get(owner) if owner is not None else None
        key = owner if wrapper is not None else name
        w = layer.dequantize()
        if wrapper is not None and not wrapper.merged:
            w = w + wrapper.delta_weight().detach().to(torch.float32)
        out[f"{key}.weight"] = w
        if layer.bias is not None:
            out[f"{key}.bias"] = layer.bias
    return out
