"""Measuring a model between steps: loss and task metrics over a dataset, and per-group update
ratios. Runs at evaluation points only, never on the per-step hot path."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from gradtune.data.dataset import Dataset
from gradtune.jobs.job import metrics_for
from gradtune.loop.gradient import to_device
from gradtune.objectives import class_metrics
from gradtune.objectives.output import Objective
from gradtune.objectives.preference import METRICS as PREFERENCE_METRICS
from gradtune.runtime import distributed


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: Objective,
    data: Dataset,
    batch: int,
    device: torch.device,
    amp: contextlib.AbstractContextManager,
) -> tuple[float, float, dict[str, float]]:
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
    # One autocast region for the whole pass: autocast keeps each trainable weight's low-precision
    # copy until the region ends, so every chunk after the first reuses it (entered per chunk, each
    # chunk cast every weight again). The sums below are float64 ops autocast leaves alone.
    with amp:
        for idx in order.split(batch):
            out = objective(model, to_device(data.get(distributed.shard(idx)), device))
            loss_sum += out.loss_sum.double()
            count += float(out.count)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v.double()
    model.train(was_training)
    loss_sum, count, sums = distributed.all_reduce_sums(loss_sum, count, sums)
    total = float(count)
    return float(loss_sum) / max(total, 1.0), total, {k: float(v) for k, v in sums.items()}


class Subset:
    """The samples ``idx`` of ``data`` (a Dataset itself): a fixed evaluation sample."""

    def __init__(self, data: Dataset, idx: torch.Tensor) -> None:
        self.data, self.idx = data, idx
        lengths = getattr(data, "lengths", None)
        self.lengths = lengths[idx] if lengths is not None else None  # (k,) tokens per sample

    def __len__(self) -> int:
        return len(self.idx)

    def get(self, idx: torch.Tensor) -> Any:
        return self.data.get(self.idx[idx])


def tokens_per_sample(data: Dataset) -> torch.Tensor:
    """(n,) tokens of each sample: its length (sequences), else the window's (text windows)."""
    lengths = getattr(data, "lengths", None)
    if lengths is not None:
        return lengths.to(torch.float64)
    n_tokens = getattr(data, "n_tokens", None)
    if n_tokens is None:
        ids = data.get(torch.zeros(1, dtype=torch.long))["input_ids"]  # (1, T)
        return torch.full((len(data),), float(ids.shape[-1]), dtype=torch.float64)
    return torch.full((len(data),), n_tokens / max(len(data), 1), dtype=torch.float64)


def token_sample(data: Dataset, tokens: int, seed: int) -> Optional[Subset]:
    """A fixed, seeded sample of ``data`` of about ``tokens`` tokens (whole samples, at least
    one), the same at every evaluation so curves stay comparable; None when ``data`` holds no
    more than that (evaluate it all)."""
    per = tokens_per_sample(data)
    if float(per.sum()) <= tokens:
        return None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    k = int(torch.searchsorted(torch.cumsum(per[order], 0), float(tokens))) + 1
    return Subset(data, torch.sort(order[:k]).values)


def sample(data: Dataset, k: int, seed: int) -> Subset:
    """A fixed, seeded sample of ``k`` samples of ``data`` (in their order): the final
    evaluation when a full pass would not fit ``max_time`` (loop/time_budget.py)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, torch.sort(order[:k]).values)


PROBE_CHUNKS = 4  # evaluation chunks timed to price an evaluation (max_time)


def seconds_per_sample(evaluate_on: Callable[[Dataset], Any], data: Dataset, batch: int) -> float:
    """What ``evaluate_on`` (``evaluate`` with the run's model and settings, ``batch`` samples a
    chunk) costs per sample of ``data``: the median of its first chunks (up to
    PROBE_CHUNKS) timed one by one, after one untimed chunk (cold caches, lazy set-up). The
    median: a chunk that waited for the cores says little about the thousands that follow."""
    if len(data) == 0:
        return 0.0
    chunks = torch.arange(min(len(data), PROBE_CHUNKS * batch)).split(batch)
    evaluate_on(Subset(data, chunks[0]))  # warm
    per = []
    for idx in chunks:
        t0 = time.perf_counter()
        evaluate_on(Subset(data, idx))
        per.append((time.perf_counter() - t0) / len(idx))
    return float(torch.tensor(per).median())


def task_metrics(
    metrics: "str | tuple[str, ...]",
    info: dict[str, Any],
    prefix: str,
    loss: float,
    count: float,
    sums: dict[str, float],
) -> dict[str, float]:
    """Loss plus the job's ``metrics`` (``Job.metrics``, or a task name: ``jobs.job.METRICS``):
    RMSE (in the target's own units, from ``info["target_std"]``) and R^2, accuracy, perplexity,
    DPO rewards."""
    metrics = metrics_for(metrics) if isinstance(metrics, str) else metrics
    out = {f"{prefix}loss": loss}
    if "sq_err" in sums and count:
        mse = sums["sq_err"] / count
        out[f"{prefix}rmse"] = math.sqrt(mse) * info.get("target_std", 1.0)
        var = info.get("val_var") if prefix == "val_" else None
        if var:
            out[f"{prefix}r2"] = 1.0 - mse / var
    if "correct" in sums and count:
        out[f"{prefix}accuracy"] = sums["correct"] / count
    out.update(class_metrics.derived(prefix, sums, info.get("classes")))  # precision/recall/F1, confusion
    if "ppl" in metrics:
        out[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
    if sums.get("bytes"):  # a language model's loss per UTF-8 byte of the predicted text (nats)
        out[f"{prefix}nats_per_byte"] = loss * count / sums["bytes"]
    if count:  # DPO rewards: means over pairs
        out.update({f"{prefix}{k}": sums[k] / count for k in PREFERENCE_METRICS if k in metrics and k in sums})
    if "reward" in metrics and sums.get("completions"):  # GRPO: a completion's reward, a token's KL
        out[f"{prefix}reward"] = sums["reward_sum"] / sums["completions"]
        if count:
            out[f"{prefix}kl"] = sums.get("kl", 0.0) / count
            out[f"{prefix}clip_fraction"] = sums.get("clipped", 0.0) / count
    # A mixture's tokens per source (data/mixture.SourceTokens): counts, not means.
    out.update({f"{prefix}{k}": v for k, v in sums.items() if k.startswith("tokens_")})
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
        out[f"update_ratio_g{i}"] = (du2**0.5) / max(w2**0.5, 1e-12)
    return out
