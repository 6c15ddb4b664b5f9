"""Checkpointed weights into a live model, and back: what resume, rollback and early stopping's
best/ share. Names are the unwrapped module's (no ``module.`` prefix); tied weights are stored
once and filling one name fills its aliases."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradtune.models.weights import aliases
from gradtune.runtime import distributed
from gradtune.runtime.errors import GradtuneError
from gradtune.state import resume, sharded


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights, copied to host memory (early stopping's best without an out_dir)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in distributed.unwrap(model).state_dict().items()}


def copy_into(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``weights`` (a full, unwrapped state dict) into ``model`` in place."""
    module = distributed.unwrap(model)
    tied = aliases(module)
    with torch.no_grad():
        for k, p in module.state_dict().items():
            if k not in tied:
                p.copy_(weights[k])


def load_newest(root: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The weights of the newest verified checkpoint under ``root`` into ``model`` (a sharded
    checkpoint restores the optimizer's shards too: DCP reads both together)."""
    found = resume.latest(root)
    if found is None:
        raise GradtuneError(f"{root}: no checkpoint to load the weights from")
    if sharded.is_sharded(found.folder):
        sharded.restore(found.folder, model, opt)
    else:
        copy_into(model, found.model)
