"""Trainable vs total parameter counts, the first line to read after choosing a method."""

from __future__ import annotations

from collections import Counter

from torch import nn

from gradtune.finetune.gguf_blocks import BLOCK_KINDS
from gradtune.finetune.quantize import quant_layers, weight_bytes


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())  # parameters() de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def quantized(model: nn.Module) -> str:
    """'; 210 linear layers quantised (168 keep the GGUF's q4_1 blocks, 42 nf4), 61.2 MB' or ''."""
    layers = quant_layers(model)
    if not layers:
        return ""
    kinds = Counter(m.kind for m in layers.values())
    parts = [f"{n} keep the GGUF's {k} blocks" if k in BLOCK_KINDS else f"{n} {k}" for k, n in sorted(kinds.items())]
    size = weight_bytes(model)[0]
    shown = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    return f"; {len(layers)} linear layers quantised ({', '.join(parts)}), {shown}"


def summary(model: nn.Module) -> str:
    """One line, e.g. ``trainable 147,456 / 22,860,672 parameters (0.645%)``, with the
    quantisation when the base is quantised (which layers keep a GGUF's own blocks)."""
    trainable, total = count(model)
    share = f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.3g}%)"
    return share + quantized(model)
