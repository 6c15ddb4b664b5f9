"""Float32 linear layers through oneDNN instead of MKL on AMD CPUs.

Why: torch computes a float32 ``F.linear`` on the CPU with MKL's sgemm. On AMD CPUs oneDNN's
GEMM (the one torch itself uses for bf16, reached through ``torch.ops.mkldnn._linear_pointwise``)
is faster at the shapes of fine-tuning, forward and input gradient (the README gives the figures;
``bench/ftprofile.py --kernels`` measures the step with and without it). So on an AMD CPU, for
float32 rows outside autocast, this module computes

    y  = x W^T + b          oneDNN (inner product, fp32 arithmetic)
    dx = dy W               oneDNN (the transposed weight as a view)
    dW = dy^T x,  db = sum(dy)       as before (MKL; oneDNN was slower with transposed operands)

Same values up to float32 rounding (the sums run in another order). Elsewhere -- Intel CPUs (MKL
is Intel's own), no oneDNN, a single row (a decoding step at batch 1: MKL's GEMV), layers under
MIN_WEIGHTS weights,
float64, autocast (bf16 goes to oneDNN already), torch.compile traces -- the plain torch ops run.
The choice is fixed per machine (the CPU vendor), never timed, so two runs of one configuration
on one machine compute the same arithmetic and a resumed run stays exact.

``swap_linears(model)`` routes a model's plain ``nn.Linear`` layers here by their ``forward``
alone (their class stays ``nn.Linear``, so every check of ``type(m) is nn.Linear`` holds);
``rows_linear`` and ``rows_times`` are the two products, for layers that write their own
backward (finetune/lora.py).
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# From 2 rows on, oneDNN gives each row the same result whatever the number of rows (a 1-row product
# takes its GEMV path, other sums; MKL's differ up to 3 rows), so an evaluation's chunk size does not
# change a row's value; 1 row: MKL, as before (and faster there).
MIN_ROWS = 2
# Below this many weights a layer keeps MKL: a oneDNN call costs ~50 us however small the product and
# ~0.7 ms the first time a shape is seen, which a 32 x 32 layer never earns back. Decided per layer,
# never per batch, so a row's value still does not depend on its batch.
MIN_WEIGHTS = 1 << 16


@functools.lru_cache(maxsize=1)
def preferred() -> bool:
    """oneDNN runs float32 linears on this machine: an AMD CPU (Linux /proc/cpuinfo) with oneDNN."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


def _takes(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        rows.dtype is torch.float32
        and weight.dtype is torch.float32
        and rows.device.type == "cpu"
        and rows.shape[0] >= MIN_ROWS
        and weight.numel() >= MIN_WEIGHTS
        and preferred()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _onednn_times(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")


def rows_linear(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """rows (N, in) W^T + b -> (N, out), no autograd (callers write their backward)."""
    if _takes(rows, weight):
        return _onednn_linear(rows, weight, bias)
    return torch.addmm(bias, rows, weight.t()) if bias is not None else rows.mm(weight.t())


def rows_times(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad (N, out) W -> (N, in): a linear layer's input gradient, no autograd."""
    if _takes(grad, weight):
        return _onednn_times(grad, weight)
    return grad.mm(weight)


class _Linear(torch.autograd.Function):
    """y = rows W^T + b on rows (N, in) through oneDNN (the caller checked ``_takes``); backward as
    the module docstring says."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(rows, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # C / oneDNN calls: no graph of their own
    def backward(ctx, gy):  # gy (N, out)
        rows, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = _onednn_times(gy, weight) if need[0] else None
        gw = gy.t().mm(rows) if need[1] else None
        gb = gy.sum(0) if ctx.has_bias and need[2] else None
        return gx, gw, gb


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x.dim() >= 2 and _takes(rows, self.weight):
        y = _Linear.apply(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through ``_forward`` (an instance attribute;
    the class and the state dict are unchanged) when this machine prefers oneDNN; returns how many."""
    if not preferred():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.numel() >= MIN_WEIGHTS:  # noqa: E721 (subclasses keep theirs)
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n


def unswap_linears(model: nn.Module) -> int:
    """Undo ``swap_linears``: every ``nn.Linear`` gets torch's own forward back (a peer model in a
    benchmark must not run ours); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and vars(m).pop("forward", None) is not None:  # noqa: E721
            n += 1
    return n
