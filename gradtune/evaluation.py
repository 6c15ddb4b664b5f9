"""Measuring a model between steps: loss and task metrics over a dataset, and per-group update
ratios. Runs at evaluation points only, never on the per-step hot path."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from gradtune import distributed
from gradtune.data.dataset import Dataset
from gradtune.gradient import to_device
from gradtune.job import Job
from gradtune.objective import Objective


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, data: Dataset, batch: int, device: torch.device,
             amp: contextlib.AbstractContextManager) -> tuple[float, float, dict[str, float]]:
    """(mean loss, count, metric sums) over ``data`` in chunks of ``batch`` samples (each rank
    takes its share of every chunk; the sums are global)."""
    was_training = model.training
    model.eval()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    for idx in torch.arange(len(data)).split(batch):
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


def task_metrics(job: Job, prefix: str, loss: float, count: float, sums: dict[str, float]) -> dict[str, float]:
    """Loss plus the metrics that fit the task: RMSE and R^2, accuracy, perplexity."""
    out = {f"{prefix}loss": loss}
    if "sq_err" in sums and count:
        mse = sums["sq_err"] / count
        out[f"{prefix}rmse"] = math.sqrt(mse) * job.info.get("target_std", 1.0)
        var = job.info.get("val_var") if prefix == "val_" else None
        if var:
            out[f"{prefix}r2"] = 1.0 - mse / var
    if "correct" in sums and count:
        out[f"{prefix}accuracy"] = sums["correct"] / count
    if job.task == "lm":
        out[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
    return out


@torch.no_grad()
def update_ratios(opt: torch.optim.Optimizer, before: list[list[torch.Tensor]]) -> dict[str, float]:
    """||update|| / ||weights|| per parameter group: ~1e-3 is healthy; 1e-1 means the lr is too
    large for that group, 1e-5 that it barely moves."""
    out = {}
    for i, (g, old) in enumerate(zip(opt.param_groups, before)):
        if not old:
            continue
        du = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - o) for p, o in zip(g["params"], old)]))
        w = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(o) for o in old]))
        out[f"update_ratio_g{i}"] = float(du / w.clamp(min=1e-12))
    return out
