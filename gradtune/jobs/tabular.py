"""Tables -> linear / logistic regression or an MLP: features standardised with training
statistics, a regression target standardised too (so lr stops depending on units), class
labels mapped to ids. Everything reloading needs to apply the same transforms to new rows
(feature names, means, standard deviations, classes) goes to ``Job.info``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradtune.config import Config
from gradtune.data import tabular
from gradtune.data.dataset import TensorDataset
from gradtune.data.split import split_indices
from gradtune.jobs.job import Job, load_init
from gradtune.models.linear import Linear, closed_form_loss
from gradtune.models.mlp import MLP
from gradtune.objectives import classification, regression
from gradtune.objectives.classification import Classification
from gradtune.objectives.output import Objective
from gradtune.objectives.regression import Regression
from gradtune.runtime.errors import GradtuneError


def standardize(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / std with the statistics of ``rows``: (N, F), (F,), (F,). A constant column
    stays as it is (std 1)."""
    mean = x[rows].mean(0)
    std = x[rows].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean, std


def resolve_task(cfg: Config, y_raw: list[Any]) -> str:
    """auto: from the loss or the model, else from the labels' look."""
    if cfg.task != "auto":
        return cfg.task
    if cfg.loss in classification.LOSSES or cfg.model == "logistic":
        return "classification"
    if cfg.loss in regression.LOSSES:
        return "regression"
    return "classification" if tabular.looks_categorical(y_raw) else "regression"


def objective_for(cfg: Config, task: str, n_classes: int) -> tuple[Objective, str, int]:
    """(objective, loss name, model outputs) for ``task``; a loss that does not fit is refused."""
    if task == "regression":
        loss = "mse" if cfg.loss == "auto" else cfg.loss
        if loss not in regression.LOSSES:
            raise GradtuneError(f"config: loss '{loss}' does not fit a regression target; use mse, mse_half or huber")
        return Regression(loss, cfg.huber_delta), loss, 1
    loss = "cross_entropy" if cfg.loss == "auto" else cfg.loss
    if loss not in classification.LOSSES:
        raise GradtuneError(f"config: loss '{loss}' does not fit class labels; use cross_entropy or bce")
    if loss == "bce" and n_classes != 2:
        raise GradtuneError(f"config: loss 'bce' needs 2 classes, the target has {n_classes}")
    return Classification(loss, cfg.label_smoothing), loss, 1 if loss == "bce" else n_classes


def make_model(cfg: Config, n_features: int, n_outputs: int) -> nn.Module:
    """The model ``cfg.model`` names, seeded, in ``cfg.dtype``."""
    torch.manual_seed(cfg.seed)  # the model's random init is part of the seeded run
    if cfg.model in ("linear", "logistic"):
        model: nn.Module = Linear(n_features, n_outputs)
    elif cfg.model == "mlp":
        model = MLP(n_features, cfg.hidden, n_outputs, cfg.activation)
    else:
        raise GradtuneError(f"config: model '{cfg.model}' does not take tabular data (linear, logistic, mlp)")
    return model.to(torch.float64 if cfg.dtype == "float64" else torch.float32)


def build_tabular(cfg: Config) -> Job:
    """BUILDERS["linear" | "logistic" | "mlp"]."""
    table = tabular.read_table(cfg.data, cfg.target, cfg.features)
    task = resolve_task(cfg, table.y_raw)
    train_idx, val_idx = split_indices(len(table.y_raw), cfg.val_fraction, cfg.seed)
    x = table.x
    info: dict[str, Any] = {"data": table.path, "features": table.feature_names, "target": table.target, "task": task}
    if cfg.standardize:
        x, mean, std = standardize(x, train_idx)
        info["feature_mean"], info["feature_std"] = mean.tolist(), std.tolist()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    classes: list[str] = []
    if task == "regression":
        y = tabular.regression_targets(table, table.target)
        if cfg.standardize_target:
            ym, ys = y[train_idx].mean(), y[train_idx].std(unbiased=False).clamp(min=1e-12)
            y = (y - ym) / ys
            info["target_mean"], info["target_std"] = ym.item(), ys.item()
        y = y.to(dtype)
    else:
        y, classes = tabular.class_targets(table, table.target, cfg.num_classes)
        info["classes"] = classes
    objective, info["loss"], n_out = objective_for(cfg, task, len(classes))
    x = x.to(dtype)
    model = make_model(cfg, x.shape[1], n_out)
    if cfg.init != "random":
        load_init(model, cfg.init)
    train = TensorDataset(x=x[train_idx], y=y[train_idx])
    val = TensorDataset(x=x[val_idx], y=y[val_idx]) if len(val_idx) else None
    if task == "regression":
        # Variance of the validation target: the denominator of R^2.
        info["val_var"] = y[val_idx].double().var(unbiased=False).item() if len(val_idx) else None
        if cfg.model == "linear" and info["loss"] in ("mse", "mse_half"):
            info["closed_form_loss"] = closed_form_loss(x[train_idx], y[train_idx], half=info["loss"] == "mse_half")
    return Job(model, objective, train, val, task, info)
