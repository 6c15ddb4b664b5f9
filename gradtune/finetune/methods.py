"""Compose the fine-tuning transforms from settings: one entry point for the loop and the CLI.

    model, trainable = methods.apply(model, FinetuneSettings(method="lora", rank=8), num_outputs=2)

``method`` says what in the pretrained body trains; ``num_outputs`` (set by the task) adds a
head on the pooled encoder output, and the head always trains. ``trainable`` is the set of
parameter names the method declares trainable, for ``audit.before(model, trainable)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from gradtune.errors import InputError
from gradtune.finetune.bitfit import bitfit
from gradtune.finetune.freeze import freeze, full
from gradtune.finetune.heads import Pooling, add_head
from gradtune.finetune.lora import DEFAULT_TARGETS, apply_lora

Method = Literal["full", "freeze", "head", "lora", "bitfit"]
METHODS: tuple[str, ...] = ("full", "freeze", "head", "lora", "bitfit")


@dataclass
class FinetuneSettings:
    method: Method = "lora"  # full: best accuracy, most memory; head: cheapest; lora: in between
    # freeze: what trains besides nothing (glob / "re:" patterns on parameter names)
    train: list[str] = field(default_factory=list)
    last_n_blocks: int | None = None  # freeze: train the last N blocks (+ final norm / pooler)
    train_embeddings: bool = False  # freeze: embeddings train too (large vocab: much memory)
    rank: int = 8  # lora: higher = more capacity and memory
    alpha: float = 16.0  # lora: update scale is alpha / rank
    dropout: float = 0.0  # lora: dropout on the LoRA input path
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # lora modules
    pooling: Pooling = "mean"  # head: mean over real tokens, or the first (CLS) token
    head_dropout: float = 0.1  # head: dropout before the head's linear layer


def apply(model: nn.Module, settings: FinetuneSettings,
          num_outputs: int | None = None) -> tuple[nn.Module, frozenset[str]]:
    """Transform ``model`` per ``settings``; add a head when ``num_outputs`` is given.

    Returns the (possibly wrapped) model and the names of the parameters that must train.
    """
    s = settings
    if s.method not in METHODS:
        raise InputError(f"unknown fine-tuning method {s.method!r}; choose one of {', '.join(METHODS)}")
    if s.method == "head" and num_outputs is None:
        raise InputError("method 'head' needs a classification or regression task (it adds a head)")
    if s.method != "freeze" and (s.train or s.last_n_blocks is not None or s.train_embeddings):
        raise InputError(f"train / last_n_blocks / train_embeddings only apply to method 'freeze', "
                         f"not {s.method!r}")
    if s.method == "full":
        full(model)
    elif s.method == "freeze":
        freeze(model, s.train, s.last_n_blocks, s.train_embeddings)
    elif s.method == "head":
        model.requires_grad_(False)
    elif s.method == "lora":
        apply_lora(model, s.rank, s.alpha, s.dropout, s.targets)
    elif s.method == "bitfit":
        bitfit(model)
    if num_outputs is not None:
        model = add_head(model, num_outputs, s.pooling, s.head_dropout)
    return model, frozenset(n for n, p in model.named_parameters() if p.requires_grad)
