"""The gradient of one step: accumulated over micro-batches (and ranks), its norm, clipping.

    grad = d(scale * sum of per-sample losses over the whole batch)/d(param)   accumulate()
    grad = grad / (count * scale)                                     the loop, once
    finite?                                                           all_finite() (fp16's scale)
    ||grad||                                                          norm()
    grad = grad * min(1, max_norm / ||grad||)                         clip_()

This runs every step, so it avoids needless work there: one process takes no distributed
branch at all, test hooks are read once per call, and on CPU the norm is one pass of the
optimizer's C kernel returning a Python float (no tensors created, no dispatches). When the
loop clips and nothing reads the mean gradient first, the division by count * scale is not a
pass of its own: ||grad|| is taken on the sums and scaled, and clip_ applies both factors at once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
from torch import nn

from gradtune.data.dataset import Dataset
from gradtune.objectives.output import Objective
from gradtune.optim import fused
from gradtune.runtime import distributed, testhooks

_NULL = contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulate(
    model: nn.Module,
    objective: Objective,
    data: Dataset,
    micro: list[torch.Tensor],
    device: torch.device,
    amp: contextlib.AbstractContextManager,
    first: Optional[list[float]] = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, "int | torch.Tensor", dict]:
    """Backward through every micro-batch; gradients hold d(scale * sum of losses)/d(param).

    Returns (loss_sum, count, metric sums) of the whole batch, as device tensors (no host sync;
    count stays a Python int when the objective knows it on the host).
    Under torch.distributed each rank takes its share of every micro-batch, gradients are summed
    across ranks on the last micro-batch only, and the returned sums are global.
    ``first`` (a list, one process, several micro-batches): gets [|gradient of the first
    micro-batch's loss sum|², its count] appended, for the noise scale (loop/noise_scale.py).
    ``scale``: fp16's loss scale (loop/loss_scale.py), a power of two: the sums are multiplied by
    it before backward so that small fp16 gradients do not flush to zero; the returned sums and
    ``first`` are unscaled.
    """
    dist = distributed.active()
    probe = testhooks.probe_dir()
    loss_sum = count = None
    sums: dict[str, torch.Tensor] = {}
    last = len(micro) - 1
    for i, idx in enumerate(micro):
        batch = data.get(distributed.shard(idx) if dist else idx)
        if probe is not None:
            testhooks.record_micro(probe, batch["sample_id"].tolist())
        with distributed.grad_sync(model, last=i == last) if dist else _NULL:
            with amp:
                out = objective(model, to_device(batch, device))
            (out.loss_sum * scale if scale != 1.0 else out.loss_sum).backward()
        testhooks.hit("micro")
        ls = out.loss_sum.detach()
        if loss_sum is None:  # the common single micro-batch: no additions at all
            loss_sum, count, sums = ls, out.count, dict(out.metrics)
            if first is not None and last > 0:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                first += [(float(norm(grads)) / scale) ** 2, float(out.count)]
            continue
        loss_sum, count = loss_sum + ls, count + out.count
        for k, v in out.metrics.items():
            sums[k] = v if k not in sums else sums[k] + v
    if dist:
        return distributed.all_reduce_sums(loss_sum, count, sums)
    return loss_sum, count, sums


def norm(grads: list[torch.Tensor]) -> Union[float, torch.Tensor]:
    """||grad|| over all tensors: a Python float from the C kernel (CPU float32/float64, one
    dtype; accumulated in float64), else a 0-d tensor (CUDA, DTensor, mixed dtypes) so that no
    host sync is forced."""
    if not grads:
        return 0.0
    if fused.supported(grads):
        lib = fused.load()
        if lib is not None:
            return fused.sumsq(lib, grads) ** 0.5
    # FSDP2: the norm of sharded grads is a DTensor; the clip factor needs the plain global value.
    return distributed.plain(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def all_finite(grads: list[torch.Tensor]) -> bool:
    """No inf or nan in any gradient: their largest |value| (an inf-norm cannot overflow where a
    sum of squares could) is finite. One host read; global under FSDP2."""
    if not grads:
        return True
    if grads[0].dtype == torch.float32 and fused.supported(
        grads
    ):  # float64 sums of float32 squares: finite iff all are
        lib = fused.load()
        if lib is not None:
            return math.isfinite(fused.sumsq(lib, grads))
    top = distributed.plain(torch.stack(torch._foreach_norm(grads, math.inf)).max())
    return bool(torch.isfinite(top))


def clip_(grads: list[torch.Tensor], total_norm: Union[float, torch.Tensor], max_norm: float, pre: float = 1.0) -> None:
    """Scale ``grads`` in place so their norm is at most ``max_norm`` (torch's clip_grad_norm_
    rule: factor max_norm / (norm + 1e-6), capped at 1). ``pre``: a factor ``grads`` still owe
    (the loop's 1 / count, when nothing read the mean gradient before): applied in the same
    pass; ``total_norm`` is the norm after it."""
    if isinstance(total_norm, torch.Tensor):
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0) * pre)
        return
    scale = clip_factor(total_norm, max_norm, pre)
    if scale != 1.0:  # a factor of exactly 1 changes nothing: skip the pass
        torch._foreach_mul_(grads, scale)


def clip_factor(total_norm: float, max_norm: float, pre: float = 1.0) -> float:
    """The factor ``clip_`` multiplies the gradients by (for an optimizer that applies it itself:
    gradtune's AdamW, ``grad_scale``)."""
    return min(max_norm / (total_norm + 1e-6), 1.0) * pre
