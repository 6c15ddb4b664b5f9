"""Tables -> linear / logistic regression or an MLP: features standardised with training
statistics, a regression target standardised too (so lr stops depending on units), class
labels mapped to ids. Everything reloading needs to apply the same transforms to new rows
(feature names, means, standard deviations, classes) goes to ``Job.info``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.data import tabular
from gradtune.data.dataset import TensorDataset
from gradtune.data.split import split_indices
from gradtune.data.text import warn
from gradtune.jobs import memory
from gradtune.jobs.job import Job, load_init
from gradtune.models.linear import Linear, closed_form_loss
from gradtune.models.mlp import MLP
from gradtune.objectives import classification, regression
from gradtune.objectives.class_metrics import class_weights
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


def objective_for(
    cfg: Config, task: str, n_classes: int, weights: Optional[list[float]] = None
) -> tuple[Objective, str, int]:
    """(objective, loss name, model outputs) for ``task``; a loss that does not fit is refused.
    ``weights``: the class weights (C,) the run trained with (``info["class_weights"]``)."""
    if task == "regression" and cfg.class_weight is not None:
        raise GradtuneError("config: class_weight applies to class labels; the target is a regression target")
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
    if loss == "bce" and cfg.class_weight is not None:
        raise GradtuneError("config: class_weight weights the cross-entropy; use loss=cross_entropy (or auto)")
    return Classification(loss, cfg.label_smoothing, weights), loss, 1 if loss == "bce" else n_classes


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


def check_finite(x: torch.Tensor, names: list[str], path: str, why: str) -> None:
    """Refuse a tensor that went non-finite on its way to the model, naming the first column."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1))
    if bad.any():
        col = int(bad.any(0).nonzero()[0])
        raise GradtuneError(f"{path}: column '{names[col]}' {why}")


def _warn_shape(table: tabular.Table) -> None:
    """Legal but most likely a mistake: said once, the run goes on."""
    if table.target in table.feature_names:
        warn(f"{table.path}: the target '{table.target}' is also a feature: the model is given the answer")
    if len(table.y_raw) == 1:
        warn(f"{table.path}: only one data row: there is no pattern to learn from one example")


def _targets(
    cfg: Config, table: tabular.Table, task: str, train_idx: torch.Tensor, info: dict[str, Any]
) -> tuple[torch.Tensor, list[str]]:
    """(y, class names): standardised float targets, or class ids (warning on a single class)."""
    if task == "regression":
        y = tabular.regression_targets(table, table.target)
        if cfg.standardize_target:
            ym, ys = y[train_idx].mean(), y[train_idx].std(unbiased=False).clamp(min=1e-12)
            y = (y - ym) / ys
            info["target_mean"], info["target_std"] = ym.item(), ys.item()
        return y, []
    y, classes = tabular.class_targets(table, table.target, cfg.num_classes)
    if y.unique().numel() == 1:
        warn(
            f"{table.path}: column '{table.target}' holds a single class ({classes[int(y[0])]!r}): "
            f"there is nothing to tell apart"
        )
    info["classes"] = classes
    return y, classes


def build_tabular(cfg: Config) -> Job:
    """BUILDERS["linear" | "logistic" | "mlp"]."""
    table = tabular.read_table(cfg.data, cfg.target, cfg.features)
    _warn_shape(table)
    task = resolve_task(cfg, table.y_raw)
    train_idx, val_idx = split_indices(len(table.y_raw), cfg.val_fraction, cfg.seed)
    x = table.x
    info: dict[str, Any] = {
        "data": table.path,
        "features": table.feature_names,
        "target": table.target,
        "task": task,
        "n_train": len(train_idx),
    }
    if cfg.standardize:
        x, mean, std = standardize(x, train_idx)
        info["feature_mean"], info["feature_std"] = mean.tolist(), std.tolist()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    y, classes = _targets(cfg, table, task, train_idx, info)
    if task == "classification" and cfg.class_weight is not None:
        info["class_weights"] = class_weights(cfg.class_weight, y[train_idx], classes, len(classes)).tolist()
    objective, info["loss"], n_out = objective_for(cfg, task, len(classes), info.get("class_weights"))
    # Values under the read limit can still overflow float32 when they are not standardised.
    overflow = f"has values beyond {cfg.dtype}'s range; set standardize=true or dtype=float64"
    x = x.to(dtype)
    check_finite(x, table.feature_names, table.path, overflow)
    if task == "regression":
        y = y.to(dtype)
        check_finite(y, [table.target], table.path, overflow.replace("standardize=", "standardize_target="))
    memory.check_tabular(cfg, x.shape[1], n_out, len(train_idx))
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
