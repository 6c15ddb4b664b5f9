"""The train / validation split: a seeded permutation, the same on any machine and any rank."""

from __future__ import annotations

import torch

from gradtune.runtime.errors import GradtuneError


def split_indices(n: int, val_fraction: float, seed: int, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (n - n_val,), val (n_val,)) long indices from a permutation seeded by ``seed``:
    the first ``round(n * val_fraction)`` positions of it validate, the rest train. ``ordered``
    sorts each part (sequence data keeps its file order, so batches group by length the same
    way on every run); otherwise the permuted order is kept."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val and n - n_val < 1:
        raise GradtuneError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    train, val = perm[n_val:], perm[:n_val]
    if ordered:
        train, val = train.sort().values, val.sort().values
    return train, val
