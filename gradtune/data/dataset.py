"""The one data interface every job uses: a sized collection that gathers a batch by index.

A *batch* is a ``dict[str, torch.Tensor]`` whose tensors share their first dimension B:
  tabular      x (B, F) float, y (B,) float (regression) or long (classes), sample_id (B,) long
  causal LM    input_ids (B, T) long, labels (B, T) long with -100 = ignored, sample_id (B,)
  text classif input_ids (B, T), attention_mask (B, T), labels (B,), sample_id (B,)
``sample_id`` is the row's index in the dataset; it lets tests prove no sample is seen twice
or skipped across resume and ranks. The sampler (data/sampler.py) decides *which* indices
form a step; the dataset only gathers them, so batch GD / SGD / mini-batch GD are one setting.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Dataset(Protocol):
    def __len__(self) -> int:
        """Number of samples (rows, or token windows for text)."""
        ...

    def get(self, idx: torch.Tensor) -> Batch:
        """Gather the samples at ``idx`` (1-D long tensor) into one batch, ``sample_id`` included."""
        ...


class TensorDataset:
    """In-memory tensors: gathering is one index_select per field, no per-sample Python work."""

    def __init__(self, **fields: torch.Tensor) -> None:
        sizes = {k: v.shape[0] for k, v in fields.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"fields differ in length: {sizes}")
        self.fields = fields
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def get(self, idx: torch.Tensor) -> Batch:
        batch = {k: v.index_select(0, idx) for k, v in self.fields.items()}
        batch["sample_id"] = idx
        return batch
