"""From a Config to what the loop needs: model, objective, train/validation data.

A model, a fine-tuning method or a data format changes what goes *into* the loop, never the
loop; this is the one place that choice is made. Everything here runs (and validates the input)
before anything is written to ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.data.dataset import Dataset, TensorDataset
from gradtune.errors import GradtuneError
from gradtune.objective import Classification, Objective, Regression


@dataclass
class Job:
    model: nn.Module
    objective: Objective
    train: Dataset
    val: Optional[Dataset]
    task: str  # "regression" | "classification" | "lm"
    info: dict[str, Any] = field(default_factory=dict)  # written to out_dir/job.json
    # Optimizer parameter groups (e.g. no weight decay on norms); None: every trainable param.
    param_groups: Optional[list[dict[str, Any]]] = None
    # Run with the model right after the first optimizer step of a fresh run (fine-tuning audit:
    # the builder fingerprints the weights, untouched until that step, and compares).
    after_first_step: Optional[Callable[[nn.Module], None]] = None
    # Writes what reloading needs beside the weights (tokenizer, label map), given out_dir.
    save_extra: Optional[Callable[[Path], None]] = None


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle, then the first (1 - val_fraction) for training: (n_train,), (n_val,)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val and n - n_val < 1:
        raise GradtuneError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    return perm[n_val:], perm[:n_val]


def _standardize(x: torch.Tensor, train_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is
    return (x - mean) / std, mean, std


def load_init(model: nn.Module, path: str) -> None:
    """Initial weights from a safetensors file; shapes and names must match exactly."""
    from gradtune.weights import load_weights

    load_weights(model, path)


def build_tabular(cfg: Config) -> Job:
    from gradtune.data import tabular
    from gradtune.models.linear import Linear, closed_form_loss
    from gradtune.models.mlp import MLP

    table = tabular.read_table(cfg.data, cfg.target, cfg.features)
    target = table.target
    task = cfg.task
    if task == "auto":
        if cfg.loss in ("cross_entropy", "bce") or cfg.model == "logistic":
            task = "classification"
        elif cfg.loss in ("mse", "mse_half", "huber"):
            task = "regression"
        else:
            task = "classification" if tabular.looks_categorical(table.y_raw) else "regression"
    train_idx, val_idx = split_indices(len(table.y_raw), cfg.val_fraction, cfg.seed)
    x = table.x
    info: dict[str, Any] = {"data": table.path, "features": table.feature_names, "target": target, "task": task}
    if cfg.standardize:
        x, mean, std = _standardize(x, train_idx)
        info["feature_mean"], info["feature_std"] = mean.tolist(), std.tolist()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if task == "regression":
        y = tabular.regression_targets(table, target)
        if cfg.standardize_target:
            ym, ys = y[train_idx].mean(), y[train_idx].std(unbiased=False).clamp(min=1e-12)
            y = (y - ym) / ys
            info["target_mean"], info["target_std"] = ym.item(), ys.item()
        y = y.to(dtype)
        loss = "mse" if cfg.loss == "auto" else cfg.loss
        if loss not in ("mse", "mse_half", "huber"):
            raise GradtuneError(f"config: loss '{loss}' does not fit a regression target; use mse, mse_half or huber")
        objective: Objective = Regression(loss, cfg.huber_delta)
        out = 1
    else:
        y, classes = tabular.class_targets(table, target, cfg.num_classes)
        info["classes"] = classes
        loss = "cross_entropy" if cfg.loss == "auto" else cfg.loss
        if loss not in ("cross_entropy", "bce"):
            raise GradtuneError(f"config: loss '{loss}' does not fit class labels; use cross_entropy or bce")
        if loss == "bce" and len(classes) != 2:
            raise GradtuneError(f"config: loss 'bce' needs 2 classes, the target has {len(classes)}")
        objective = Classification(loss, cfg.label_smoothing)
        out = 1 if loss == "bce" else len(classes)
    info["loss"] = loss
    x = x.to(dtype)
    torch.manual_seed(cfg.seed)  # the model's random init is part of the seeded run
    n_features = x.shape[1]
    if cfg.model in ("linear", "logistic"):
        model: nn.Module = Linear(n_features, out)
    elif cfg.model == "mlp":
        model = MLP(n_features, cfg.hidden, out, cfg.activation)
    else:
        raise GradtuneError(f"config: model '{cfg.model}' does not take tabular data (linear, logistic, mlp)")
    model = model.to(dtype)
    if cfg.init != "random":
        load_init(model, cfg.init)
    train = TensorDataset(x=x[train_idx], y=y[train_idx])
    val = TensorDataset(x=x[val_idx], y=y[val_idx]) if len(val_idx) else None
    if task == "regression":
        # Variance of the validation target: the denominator of R^2.
        info["val_var"] = y[val_idx].double().var(unbiased=False).item() if len(val_idx) else None
        if cfg.model == "linear" and loss in ("mse", "mse_half"):
            info["closed_form_loss"] = closed_form_loss(x[train_idx], y[train_idx], half=loss == "mse_half")
    return Job(model, objective, train, val, task, info)


# Model name -> builder. Other families (gpt, pretrained folders) register here.
BUILDERS: dict[str, Callable[[Config], Job]] = {
    "linear": build_tabular,
    "logistic": build_tabular,
    "mlp": build_tabular,
}


def build(cfg: Config) -> Job:
    builder = BUILDERS.get(cfg.model)
    if builder is None:
        if "/" in cfg.model or cfg.model.endswith(".gguf") or Path(cfg.model).exists():
            builder = BUILDERS.get("pretrained")
        if builder is None:
            import difflib

            close = difflib.get_close_matches(cfg.model, list(BUILDERS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(BUILDERS)})"
            raise GradtuneError(f"config: unknown model '{cfg.model}'{hint}")
    return builder(cfg)


def _build_gpt(cfg: Config) -> Job:
    from gradtune.job_text import build_text  # lazy: job_text imports this module

    return build_text(cfg)


BUILDERS["gpt"] = _build_gpt


def _build_pretrained(cfg: Config) -> Job:
    from gradtune.job_finetune import build_pretrained  # lazy: transformers loads only here

    return build_pretrained(cfg)


BUILDERS["pretrained"] = _build_pretrained
