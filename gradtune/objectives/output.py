"""What the loop minimises: an Objective maps (model, batch) to a *sum* of per-sample losses.

Why a sum and a count instead of a mean: the loop accumulates gradients of sums over
micro-batches (and, under torch.distributed, over ranks) and divides once by the total count of
samples or non-ignored tokens in the whole batch. That makes micro-batched / multi-process
gradients equal the one-shot gradient exactly, for token losses too, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from gradtune.data.dataset import Batch


@dataclass
class Output:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of per-sample (or per-token) losses
    # Samples or non-ignored tokens in this batch: a Python int when known on the host (rows,
    # sequences), else a scalar long tensor (token counts) so that no host sync is forced.
    count: "int | torch.Tensor"
    # Detached sums to aggregate for metrics, e.g. {"correct": n} or {"sq_err": s}; divided by
    # ``count`` when reported.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Batch) -> Output: ...
