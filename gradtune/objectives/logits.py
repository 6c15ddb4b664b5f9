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

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.packing import block_causal_mask
from gradtune.data.sequences import IGNORE
from gradtune.runtime.errors import GradtuneError


def logits_of(out: object) -> torch.Tensor:
    """The logits (or predictions) in a model's output: a tensor, a tuple, or an HF output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits  # type: ignore[attr-defined]


def forward(model: nn.Module, batch: Batch, keep: int = 0) -> torch.Tensor:
    """Run ``model`` on the inputs ``batch`` carries and return its logits / predictions.
    ``keep`` > 0: an HF causal LM's logits of the last ``keep`` positions only (B, keep, V)."""
    if "x" in batch:
        return logits_of(model(batch["x"]))
    extra = {"logits_to_keep": keep} if keep else {}
    if "document_ids" in batch:
        return logits_of(
            model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=packed_mask(model, batch["document_ids"]),
                **extra,
            )
        )
    if "attention_mask" in batch:
        return logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra))
    return logits_of(model(batch["input_ids"], **extra))


def forward_trained(model: nn.Module, batch: Batch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V), labels (B, K)) of a causal LM whose ``labels`` (B, T) are aligned with
    its inputs (shifted by the caller: logits at t score the label at t + 1), cut to the last K
    positions from the first that predicts a trained label in any row. Prompts come first, so
    the LM head and the loss's softmax over the vocabulary (V ~ 50k: most of the step's memory,
    a fifth of its matmuls for a small model) skip most prompt positions. Only a model whose
    forward takes ``logits_to_keep`` (transformers' causal LMs) is cut; others give all T."""
    t = labels.shape[1]
    trained = (labels[:, 1:] != IGNORE).any(0).nonzero()  # positions p whose label p + 1 is trained
    keep = t - int(trained[0]) if len(trained) else 1
    if keep >= t or not _keeps_logits(model):
        return forward(model, batch), labels
    return forward(model, batch, keep), labels[:, t - keep :]


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities (S, T-1) of the labels under logits / temperature, 0 where the
    label is IGNORE; the logits at t score the label at t+1. logits (S, T, V), labels (S, T)."""
    logits, labels = float32(logits[:, :-1]), labels[:, 1:]
    if temperature != 1.0:  # a pass over (S, T, V) floats: only where it changes them
        logits = logits / temperature
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    return -nll


def trained_token_logps(model: nn.Module, batch: Batch, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``token_logps`` (S, T-1) of ``model`` on ``batch``, its logits from ``forward_trained``,
    zero-padded in front to the full width: the positions cut are IGNORE labels, 0 either way, and
    a sum over the row then adds the same values in the same layout whatever K the batch had."""
    logits, kept = forward_trained(model, batch, labels)  # (S, K, V), (S, K)
    return F.pad(token_logps(logits, kept, temperature), (labels.shape[1] - kept.shape[1], 0))


def _keeps_logits(model: nn.Module) -> bool:
    return _takes_logits_to_keep(type(getattr(model, "module", model)))  # DDP keeps the model in .module


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    """Read once per model class: the signature is inspected on every micro-batch otherwise."""
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


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
