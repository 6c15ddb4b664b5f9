"""Tables -> linear / logistic regression or an MLP: features standardised with training
statistics, a regression target standardised too (so lr stops depending on units), class
labels mapped to ids, categorical columns one-hot encoded and missing cells filled as
``missing`` says (data/encoding.py). Everything reloading needs to apply the same transforms to
new rows (feature names, encoding, means, standard deviations, classes) goes to ``Job.info``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from gradtune.config import Config
from gradtune.data import table_matrix, tabular
from gradtune.data.dataset import TensorDataset
from gradtune.data.encoding import Encoding
from gradtune.data.split import split_indices
from gradtune.data.text import warn
from gradtune.jobs import memory
from gradtune.jobs.job import Job, eval_chunk, load_init
from gradtune.models.linear import Linear
from gradtune.models.mlp import MLP
from gradtune.objectives import classification, regression
from gradtune.objectives.class_metrics import class_weights
from gradtune.objectives.classification import Classification
from gradtune.objectives.output import Objective
from gradtune.objectives.regression import Regression
from gradtune.runtime.errors import GradtuneError


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
    """Refuse a tensor that went non-finite on its way to the model, naming the first column.
    In numpy, a chunk of rows at a time: ``torch.isfinite`` of the whole (N, F) table takes a
    copy of it (and two bool masks), and is several times slower."""
    flat = x.detach().cpu().reshape(x.shape[0], -1).numpy()
    bad = np.zeros(flat.shape[1], dtype=bool)
    for i in range(0, len(flat), CHUNK):
        ok = np.isfinite(flat[i : i + CHUNK])
        if not ok.all():
            bad |= ~ok.all(0)
    if bad.any():
        col = int(np.flatnonzero(bad)[0])
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
            y = (y - ym).div_(ys)  # one (N,) temporary, not two
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


def read(cfg: Config) -> tabular.Table:
    return tabular.read_table(cfg.data, cfg.target, cfg.features, missing=cfg.missing, categorical=cfg.categorical)


def read_for_run(path: str, info: dict[str, Any], labelled: bool) -> tabular.Table:
    """New rows for a finished run: its feature columns, its categorical columns as categories,
    missing cells as the run treated them, except that rows to predict (``labelled=False``) are
    never dropped: one output per input row."""
    enc = Encoding.from_info(info)
    missing = enc.missing if labelled or enc.missing != "drop" else "error"
    cats = list(enc.categories) or "none"
    return tabular.read_table(path, info["target"], info["features"], labelled, missing=missing, categorical=cats)


def standardized(
    table: tabular.Table,
    enc: Encoding,
    dtype: torch.dtype,
    order: Optional[torch.Tensor],
    n_fit: Optional[int],
    stats: Optional[tuple[list[float], list[float]]],
) -> tuple[torch.Tensor, list[float], list[float]]:
    """(x (N, F') in ``dtype``, mean, std): the encoded inputs one column at a time (the table's
    raw columns are released as they are used: peak memory is x plus one column), rows in
    ``order`` (None: file order). Standardised with ``stats`` (a run's saved mean and std), or
    with the mean and std of the first ``n_fit`` rows of ``order`` (training's); neither: as is.
    The arithmetic is float64 whatever ``dtype``."""
    rows = order.numpy() if order is not None else None
    x = torch.empty(table.n_rows, len(enc.names), dtype=dtype)
    means, stds = [], []
    for j, (name, col) in enumerate(enc.inputs(table, release=True)):
        col = col[rows] if rows is not None else col.copy()  # a copy: scaled in place below
        if stats is not None:
            m, s = stats[0][j], stats[1][j]
        elif n_fit is not None:
            m, s = float(col[:n_fit].mean()), float(col[:n_fit].std())
            s = s if s > 0 else 1.0  # a constant column stays as it is
        else:
            m, s = 0.0, 1.0
        means.append(m)
        stds.append(s)
        if (m, s) != (0.0, 1.0):
            col -= m
            col /= s
        x[:, j] = torch.from_numpy(col)
    return x, means, stds


def features(info: dict[str, Any], table: tabular.Table, dtype: torch.dtype) -> torch.Tensor:
    """A finished run's inputs for ``table`` (N, F'): its encoding and its standardisation."""
    stats = (info["feature_mean"], info["feature_std"]) if "feature_mean" in info else None
    return standardized(table, Encoding.from_info(info), dtype, None, None, stats)[0]


# Above this many cells the least-squares optimum comes from the normal equations, accumulated
# in float64 over row chunks: (F+1, F+1) memory instead of float64 copies of the whole table.
LARGE = 4_000_000
CHUNK = 65_536  # rows per chunk


def optimum_loss(x: torch.Tensor, y: torch.Tensor, half: bool) -> float:
    """Training MSE at the least-squares optimum (the reference the loss curve is drawn to),
    with a rank-revealing solve (gelsd): one-hot columns plus the bias are collinear, and
    ``closed_form_loss``'s default solver returns a far-off point on such a design. Small
    tables solve the design itself; large ones (over ``LARGE`` cells) the normal equations,
    accumulated in float64 over row chunks in one pass ((F+1, F+1) memory instead of float64
    copies of the table)."""
    if x.numel() <= LARGE:
        design = torch.nn.functional.pad(x.double(), (0, 1), value=1.0)  # (N, F+1), bias column
        sol = torch.linalg.lstsq(design, y.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
        mse = float(((design @ sol - y.double()) ** 2).mean())
        return mse / 2 if half else mse
    f, n = x.shape[1], len(x)
    xtx = torch.zeros(f, f, dtype=torch.float64)
    xty = torch.zeros(f, dtype=torch.float64)
    xsum = torch.zeros(f, dtype=torch.float64)
    ysum = yty = 0.0
    for i in range(0, n, CHUNK):  # one float64 copy of a chunk at a time
        xc, yc = x[i : i + CHUNK].double(), y[i : i + CHUNK].double()
        xtx += xc.T @ xc
        xty += xc.T @ yc
        xsum += xc.sum(0)
        ysum += float(yc.sum())
        yty += float(yc @ yc)
    gram = torch.zeros(f + 1, f + 1, dtype=torch.float64)  # [X 1]^T [X 1]
    gram[:f, :f], gram[:f, f], gram[f, :f], gram[f, f] = xtx, xsum, xsum, n
    rhs = torch.cat([xty, torch.tensor([ysum], dtype=torch.float64)])  # [X 1]^T y
    sol = torch.linalg.lstsq(gram, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    # |y - Dw|^2 = y.y - 2 w.(D^T y) + w^T (D^T D) w: no second pass over the table; in float64
    # the cancellation costs ~1e-16 of y.y (standardised targets: y.y = N), far below any loss
    sse = max(yty - 2 * float(sol @ rhs) + float(sol @ gram @ sol), 0.0)
    mse = sse / n
    return mse / 2 if half else mse


def _inputs(
    cfg: Config, dtype: torch.dtype
) -> tuple[tabular.Table, torch.Tensor, torch.Tensor, Encoding, torch.Tensor, list[float], list[float]]:
    """(table, train rows, validation rows, encoding, x (N, F') in ``dtype`` with rows in
    (training, validation) order, feature means, stds). A large all-numeric CSV / Parquet file
    goes straight into x (data/table_matrix.py: one copy of the table); anything else is read by
    columns and encoded one column at a time into x (``standardized``)."""
    args = (cfg.missing, cfg.categorical, dtype, cfg.val_fraction, cfg.seed, cfg.standardize)
    m = table_matrix.read(cfg.data, cfg.target, cfg.features, *args)
    if m is not None:
        enc = Encoding(list(m.table.feature_names), {}, m.fill, cfg.missing)
        return m.table, m.train_idx, m.val_idx, enc, m.x, m.mean, m.std
    table = read(cfg)
    train_idx, val_idx = split_indices(table.n_rows, cfg.val_fraction, cfg.seed)
    enc = Encoding.fit(table, train_idx.numpy(), cfg.missing)
    order = torch.cat([train_idx, val_idx])
    n_fit = len(train_idx) if cfg.standardize else None
    x, mean, std = standardized(table, enc, dtype, order, n_fit, None)
    return table, train_idx, val_idx, enc, x, mean, std


def build_tabular(cfg: Config) -> Job:
    """BUILDERS["linear" | "logistic" | "mlp"]."""
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    table, train_idx, val_idx, enc, x, mean, std = _inputs(cfg, dtype)
    _warn_shape(table)
    task = resolve_task(cfg, table.y_raw)
    info: dict[str, Any] = {
        "data": table.path,
        "features": table.feature_names,
        "target": table.target,
        "task": task,
        "n_train": len(train_idx),
    }
    if enc.categories or enc.fill or cfg.missing != "error":
        info["encoding"], info["inputs"] = enc.to_dict(), enc.names
    y, classes = _targets(cfg, table, task, train_idx, info)
    if task == "classification" and cfg.class_weight is not None:
        info["class_weights"] = class_weights(cfg.class_weight, y[train_idx], classes, len(classes)).tolist()
    objective, info["loss"], n_out = objective_for(cfg, task, len(classes), info.get("class_weights"))
    n = len(train_idx)
    if cfg.standardize:
        info["feature_mean"], info["feature_std"] = mean, std
    # Values under the read limit can still overflow float32 when they are not standardised.
    overflow = f"has values beyond {cfg.dtype}'s range; set standardize=true or dtype=float64"
    check_finite(x, enc.names, table.path, overflow)
    # Rows in (training, validation) order, as x's, so both sets are views of one tensor: no copy.
    y = torch.cat([y[train_idx], y[val_idx]]).to(dtype if task == "regression" else y.dtype)
    if task == "regression":
        check_finite(y, [table.target], table.path, overflow.replace("standardize=", "standardize_target="))
    memory.check_tabular(cfg, x.shape[1], n_out, n)
    model = make_model(cfg, x.shape[1], n_out)
    if cfg.init != "random":
        load_init(model, cfg.init)
    train = TensorDataset(x=x[:n], y=y[:n])
    val = TensorDataset(x=x[n:], y=y[n:]) if len(val_idx) else None
    if task == "regression":
        # Variance of the validation target: the denominator of R^2.
        info["val_var"] = y[n:].double().var(unbiased=False).item() if len(val_idx) else None
        if cfg.model == "linear" and info["loss"] in ("mse", "mse_half"):
            info["closed_form_loss"] = optimum_loss(x[:n], y[:n], half=info["loss"] == "mse_half")
    return Job(model, objective, train, val, task, info, eval_chunk=eval_chunk(cfg, cheap_rows=True))
