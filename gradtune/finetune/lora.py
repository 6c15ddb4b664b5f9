"""LoRA (Hu et al. 2021) as a model transform: W x  ->  W x + (alpha / rank) * B A x.

A (rank, in) starts kaiming-uniform like PEFT and B (out, rank) starts at zero, so at step 0
the wrapped model computes exactly what the base model computes; only A and B train.
``merge`` folds B A into W for inference (no extra matmuls), ``unmerge`` takes it back out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gradtune.finetune.patterns import matches
from gradtune.models.onednn_linear import rows_linear, rows_times
from gradtune.runtime.errors import InputError

# Attention projections under the names of the common families: Llama/Mistral/Qwen (q_proj...),
# BERT/MiniLM (query, key, value and the output dense of the attention block).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "query",
    "key",
    "value",
    "*.attention.output.dense",
)


class _LoRARows(torch.autograd.Function):
    """Y = X W^T + b + s (X A^T) B^T on rows X (N, in), with a backward written out so that the
    input's gradient is one GEMM plus one accumulating GEMM: dX = dY W + s (dY B) A (addmm_ in
    place), where autograd would add the two (N, in) branch gradients in a separate pass.
    Gradients: dA = s (dY B)^T X (rank, in), dB = s dY^T (X A^T) (out, rank); W and b get theirs
    only if they require grad (LoRA freezes them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float):  # x (N, in)
        h = x.mm(a.t())  # (N, rank)
        y = rows_linear(x, weight, bias)  # (N, out); oneDNN on AMD CPUs (models/onednn_linear.py)
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, gy):  # gy (N, out)
        x, weight, a, b, h = ctx.saved_tensors
        s, need = ctx.scaling, ctx.needs_input_grad
        gh = gy.mm(b)  # (N, rank), the scale applied on the small products below
        gx = rows_times(gy, weight).addmm_(gh, a, alpha=s) if need[0] else None
        gw = gy.t().mm(x) if need[1] else None
        gbias = gy.sum(0) if need[2] else None
        ga = gh.t().mm(x).mul_(s) if need[3] else None
        gb = gy.t().mm(h).mul_(s) if need[4] else None
        return gx, gw, gbias, ga, gb, None


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
        if self.merged:
            return self.base(x)
        w = self.lora_a.weight
        if (
            type(self.base) is nn.Linear
            and x.dtype == w.dtype == self.base.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return self._fused(x)
        y = self.base(x)
        h = self.lora_a(self.dropout(x).to(self.lora_a.weight.dtype))  # (..., rank)
        return y + (self.lora_b(h) * self.scaling).to(y.dtype)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for a plain float32/64 ``nn.Linear`` base outside autocast, as two GEMMs on
        (N, in) rows: Y = X W^T + b, then Y += scaling * (X A^T) B^T inside the GEMM's
        accumulate (addmm_, beta 1, alpha scaling) on Y, which is not a view (the 3-D
        ``F.linear`` returns one, where an in-place add would cost autograd two (N, out) copies
        in backward). Saves the (N, out) product, scaled product and sum of ``forward`` and
        their backward passes; equal to ``forward`` up to float rounding."""
        base, rows = self.base, x.reshape(-1, x.shape[-1])  # (N, in)
        if isinstance(self.dropout, nn.Identity) or not self.training:  # one input to both GEMMs
            y = _LoRARows.apply(rows, base.weight, base.bias, self.lora_a.weight, self.lora_b.weight, self.scaling)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = (
            torch.addmm(base.bias, rows, base.weight.t()) if base.bias is not None else rows.mm(base.weight.t())
        )  # (N, out)
        h = self.lora_a(self.dropout(rows))  # (N, rank)
        return y.addmm_(h, self.lora_b.weight.t(), alpha=self.scaling).view(*x.shape[:-1], y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """(out, in) update ``scaling * B A`` in the base weight's dtype."""
        delta = (self.lora_b.weight @ self.lora_a.weight) * self.scaling
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if "weight" not in self.base._parameters:  # a QuantLinear: its W is codes, read-only
            raise InputError("lora merge: the base layer is quantised; export the merged model instead")
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
    model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS
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


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer computes its frozen base alone: bit for bit the base
    model (DPO's reference, without a second copy of the weights). Each layer's ``forward`` is
    pointed at its base's for the block, so the LoRA path costs nothing there; a merged layer's
    base holds its update, so merged layers are refused."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters_disabled: a LoRA layer is merged; unmerge it first")
    for layer in layers:
        layer.forward = layer.base.forward  # an instance attribute: nn.Module.__call__ uses it
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
