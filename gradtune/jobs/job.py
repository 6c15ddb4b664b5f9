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

from gradtune.config import Config
from gradtune.data.dataset import Dataset
from gradtune.models.weights import load_weights
from gradtune.objectives.output import Objective
from gradtune.objectives.preference import METRICS as PREFERENCE_METRICS

TASKS = ("regression", "classification", "lm", "preference", "rl")
# The metrics an evaluation row carries besides the loss, by task (train and val_ prefixed;
# r2 on validation only). Each needs its sums from the objective (sq_err, correct, rewards).
METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("rmse", "r2"),
    # f1 = f1_macro; precision/recall/f1 also _weighted, from confusion sums (objectives/class_metrics.py)
    "classification": (
        "accuracy",
        "f1",
        *(f"{k}_{a}" for k in ("precision", "recall", "f1") for a in ("macro", "weighted")),
    ),
    "lm": ("ppl",),
    "preference": PREFERENCE_METRICS,
    # GRPO: mean reward per completion, KL and clipped fraction per completion token
    "rl": ("reward", "kl", "clip_fraction"),
}


def metrics_for(task: str) -> tuple[str, ...]:
    return METRICS.get(task, ())


def eval_chunk(cfg: Config, cheap_rows: bool) -> int:
    """Samples per evaluation chunk where memory is not measured (loop/eval_chunk.py chooses it
    otherwise): large for in-memory tables (cheap rows), the training batch for sequences."""
    if cfg.micro_batch_size:
        return cfg.micro_batch_size
    if cheap_rows:
        return 1024 if cfg.batch_size == "full" else max(int(cfg.batch_size), 256)
    return int(cfg.batch_size) if cfg.batch_size != "full" else 32


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
    # What a step's count counts: "samples" or "tokens" (language models); "" -> from task.
    unit: str = ""
    # Metric names of an evaluation row besides the loss (METRICS); () -> from task.
    metrics: tuple[str, ...] = ()
    # Evaluation chunk where the loop does not choose one from memory (``eval_chunk``); 0 -> the
    # sequence rule.
    eval_chunk: int = 0

    def __post_init__(self) -> None:
        self.unit = self.unit or ("tokens" if self.task == "lm" else "samples")
        self.metrics = self.metrics or metrics_for(self.task)

    def logged(self) -> list[str]:
        """The metric names this job's evaluation rows hold (early_stopping.monitor, plateau)."""
        train = ["loss", *(m for m in self.metrics if m != "r2")]
        val = ["val_loss", *(f"val_{m}" for m in self.metrics)] if self.val is not None else []
        return [*train, *val, "grad_norm"]


def load_init(model: nn.Module, path: str) -> None:
    """Initial weights from a safetensors file (``init=PATH``); names and shapes must match."""
    load_weights(model, path)
