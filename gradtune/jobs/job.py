"""What the loop needs to train anything: a model, an objective, training and validation data.

A model, a fine-tuning method or a data format changes what goes *into* the loop, never the
loop; the builders in this package make that choice (``registry.build``). Every builder runs
(and validates its input) before anything is written to ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from gradtune.data.dataset import Dataset
from gradtune.models.weights import load_weights
from gradtune.objectives.output import Objective

TASKS = ("regression", "classification", "lm", "preference", "rl")


@dataclass
class Job:
    model: nn.Module
    objective: Objective
    train: Dataset
    val: Optional[Dataset]
    task: str  # one of TASKS: which metrics the loss comes with (RMSE, accuracy, perplexity)
    info: dict[str, Any] = field(default_factory=dict)  # written to summary.json["job"]; reloading reads it
    # Optimizer parameter groups (e.g. no weight decay on norms); None: every trainable param.
    param_groups: Optional[list[dict[str, Any]]] = None
    # Run with the model right after the first optimizer step of a fresh run (fine-tuning audit:
    # the builder fingerprints the weights, untouched until that step, and compares).
    after_first_step: Optional[Callable[[nn.Module], None]] = None
    # Run with the model when the loop starts, after distributed wrapping (DDP's start-up
    # broadcast rewrites every weight in place): the audit fingerprints the weights here.
    at_start: Optional[Callable[[nn.Module], None]] = None
    # Writes what reloading needs beside the weights (tokenizer, label map), given out_dir.
    save_extra: Optional[Callable[[Path], None]] = None
    # Loop callbacks the job needs (gradtune.loop.callbacks.Callback's interface; this layer may
    # not import it), passed to ``fit`` by ``train``: e.g. RL's step clock (jobs/rl.py).
    callbacks: list[Any] = field(default_factory=list)


def load_init(model: nn.Module, path: str) -> None:
    """Initial weights from a safetensors file (``init=PATH``); names and shapes must match."""
    load_weights(model, path)
