"""LoRA (Hu et al. 2021) as a model transform: W x  ->  W x + (alpha / rank) * B A x.

A (rank, in) starts kaiming-uniform like PEFT and B (out, rank) starts at zero, so at step 0
the wrapped model computes exactly what the base model computes; only A and B train.
``merge`` folds B A into W for inference (no extra matmuls), ``unmerge`` takes it back out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradtune.runtime.errors import InputError
from gradtune.finetune.patterns import matches

# Attention projections under the names of the common families: Llama/Mistral/Qwen (q_proj...),
# BERT/MiniLM (query, key, value and the output dense of the attention block).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "query", "key", "value", "*.attention.output.dense",
)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``lora_b @ lora_a``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise InputError(f"lora rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # so changing rank does not change the update's scale
        w = base.weight
        # LoRA factors live in float32 even on a bf16/fp16 base: they are small, and the
        # update B A is tiny next to W, so low precision would round it away.
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=torch.float32)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # as PEFT and nn.Linear
        nn.init.zeros_(self.lora_b.weight)  # B = 0: output at step 0 equals the base's
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        h = self.lora_a(self.dropout(x).to(self.lora_a.weight.dtype))  # (..., rank)
        return y + (self.lora_b(h) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) update ``scaling * B A`` in the base weight's dtype."""
        delta = (self.lora_b.weight @ self.lora_a.weight) * self.scaling
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name matches ``targets``; freeze all but the LoRA factors.

    In place; returns ``model``. Raises ``InputError`` if no linear layer matches.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, targets)]
    if not names:
        raise InputError(f"lora targets {list(targets)} match no linear layer of {type(model).__name__}")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (forward then skips the LoRA path)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: subtract each update again so training can go on."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model
