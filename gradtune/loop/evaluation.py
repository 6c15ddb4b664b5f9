"""Measuring a model between steps: loss and task metrics over a dataset, and per-group update
ratios. Runs at evaluation points only, never on the per-step hot path."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from gradtune.runtime import distributed
from gradtune.data.dataset import Dataset
from gradtune.loop.gradient import to_device
from gradtune.objectives.output import Objective


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, data: Dataset, batch: int, device: torch.device,
             amp: contextlib.AbstractContextManager) -> tuple[float, float, dict[str, float]]:
    """(mean loss, count, metric sums) over ``data`` in chunks of ``batch`` samples (each rank
    takes its share of every chunk; the sums are global)."""
    was_training = model.training
    model.eval()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    # Sequences in length order: each chunk pads only to its own longest (sums do not depend
    # on the order; the order is fixed, so results are reproducible).
    lengths = getattr(data, "lengths", None)
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(len(data))
    for idx in order.split(batch):
        with amp:
            out = objective(model, to_device(data.get(distributed.shard(idx)), device))
        loss_sum += out.loss_sum.double()
        count += float(out.count)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v.double()
    model.train(was_training)
    loss_sum, count, sums = distributed.all_reduce_sums(loss_sum, count, sums)
    total = float(count)
    return float(loss_sum) / max(total, 1.0), total, {k: float(v) for k, v in sums.items()}


def task_metrics(task: str, info: dict[str, Any], prefix: str, loss: float, count: float,
                 sums: dict[str, float]) -> dict[str, float]:
    """Loss plus the metrics that fit the job's ``task``: RMSE (in the target's own units, from
    ``info["target_std"]``) and R^2, accuracy, perplexity."""
    out = {f"{prefix}loss": loss}
    if "sq_err" in sums and count:
        mse = sums["sq_err"] / count
        out[f"{prefix}rmse"] = math.sqrt(mse) * info.get("target_std", 1.0)
        var = info.get("val_var") if prefix == "val_" else None
        if var:
            out[f"{prefix}r2"] = 1.0 - mse / var
    if "correct" in sums and count:
        out[f"{prefix}accuracy"] = sums["correct"] / count
    if task == "lm":
        out[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
    return out


SAMPLE = 4096  # elements per tensor kept to measure its update (exact below this size)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter; other tensors as they are."""
    return p.to_local() if hasattr(p, "to_local") else p


def _sample(p: torch.Tensor) -> torch.Tensor:
    """A fixed, evenly strided sample of at most SAMPLE elements of ``p`` (its local shard under
    FSDP2), as a new float64 tensor: (k,)."""
    flat = _local(p).detach().reshape(-1)
    stride = max(1, -(-flat.numel() // SAMPLE))
    return flat[::stride].double()  # a copy (dtype change): the step cannot alter it


@torch.no_grad()
def ratio_snapshot(opt: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Taken just before a step whose update ratios are wanted (see ``update_ratios``)."""
    return [[_sample(p) for p in g["params"]] for g in opt.param_groups]


@torch.no_grad()
def update_ratios(opt: torch.optim.Optimizer, before: list[list[torch.Tensor]]) -> dict[str, float]:
    """||update|| / ||weights|| per parameter group: ~1e-3 is healthy; 1e-1 means the lr is too
    large for that group, 1e-5 that it barely moves.

    Why samples: copying every weight before the step would add a whole model's worth to peak
    memory (90 MB for MiniLM, 28 GB for a 7B model in fp32) once per evaluation. Tensors up to
    SAMPLE elements are measured exactly; larger ones on an evenly strided sample, each
    sample's squared norms scaled by (elements / sampled) to estimate the full sums.
    """
    out = {}
    for i, (g, old) in enumerate(zip(opt.param_groups, before)):
        if not old:
            continue
        du2 = w2 = 0.0
        for p, o in zip(g["params"], old):
            now = _sample(p)
            scale = _local(p).numel() / max(o.numel(), 1)
            du2 += scale * float(torch.sum((now - o) ** 2))
            w2 += scale * float(torch.sum(o * o))
        out[f"update_ratio_g{i}"] = (du2 ** 0.5) / max(w2 ** 0.5, 1e-12)
    return out
