"""The one adapter between a batch, a model and its outputs, for every kind of model.

    tabular        model(x (B, F))                                   -> (B, out)
    token windows  model(input_ids (B, T))                           -> (B, T, V)   our GPT
    sequences      model(input_ids=(B, T), attention_mask=(B, T))    -> HF outputs or head (B, K)
    packed windows model(input_ids=(B, T), attention_mask=(B, 1, T, T) block-diagonal causal,
                         position_ids=(B, T) restarting per document)  -> HF outputs (data/packing.py)

A model may return a tensor, a tuple whose first element is the logits, or an object with
``.logits`` (transformers); ``logits_of`` reads all three.
"""

from __future__ import annotations

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.packing import block_causal_mask
from gradtune.runtime.errors import GradtuneError


def logits_of(out: object) -> torch.Tensor:
    """The logits (or predictions) in a model's output: a tensor, a tuple, or an HF output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits  # type: ignore[attr-defined]


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run ``model`` on the inputs ``batch`` carries and return its logits / predictions."""
    if "x" in batch:
        return logits_of(model(batch["x"]))
    if "document_ids" in batch:
        return logits_of(
            model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=packed_mask(model, batch["document_ids"]),
            )
        )
    if "attention_mask" in batch:
        return logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    return logits_of(model(batch["input_ids"]))


def packed_mask(model: nn.Module, document_ids: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) mask of packed windows in the form the model's attention takes:
    transformers passes a 4D mask through unchanged, SDPA reads a bool one (True = attend),
    eager attention adds it to the scores (a bool added there would be silently wrong), and
    flash attention ignores it (documents would see each other): refused."""
    config = getattr(model, "config", None)
    if config is None:  # DDP keeps the model in .module
        config = getattr(getattr(model, "module", None), "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "")
    if impl.startswith("flash") or impl.startswith("flex"):
        raise GradtuneError(f"text.packing needs sdpa or eager attention; the model uses {impl}")
    return block_causal_mask(document_ids, None if impl == "sdpa" else torch.float32)


def targets(batch: Batch) -> torch.Tensor:
    """The labels of a batch: ``y`` for tables, ``labels`` for sequences."""
    return batch["y"] if "y" in batch else batch["labels"]


def float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (bf16 autocast) in float32 for the loss; other dtypes unchanged
    (float64 runs stay float64)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
