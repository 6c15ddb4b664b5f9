"""The estimators' way into the one loop: arrays -> a ``Job`` -> ``loop.fit.fit`` -> fitted state.

    cfg = run_config(model=..., lr=..., ...)     a Config for an in-memory run: no files, no
                                                 checkpoints, no progress, no plot, float64
    job = make_job(cfg, model, x, y, task, ...)  the model, objective and data (no file read)
    cfg = resolve_lr(job, cfg, momentum)         lr / momentum "auto" -> numbers (jobs/curvature.py)
    fitted = run(job, cfg, out_dir, state)       the loop; training curve, stop reason, and the
                                                 optimizer state kept for the next partial_fit

Nothing here copies the loop: every guarantee of ``fit`` (exact gradient of the batch mean, the
guard, convergence and validation early stopping with the best weights) holds as it does for
``gradtune train``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config, EarlyStoppingSection, GuardConfig
from gradtune.config.checks import check_combinations
from gradtune.data.dataset import TensorDataset
from gradtune.data.sampler import epoch_order
from gradtune.jobs import curvature
from gradtune.jobs.job import Job
from gradtune.jobs.tabular import objective_for
from gradtune.loop.callbacks import Callback, Control
from gradtune.loop.fit import Result, fit
from gradtune.models.linear import Linear
from gradtune.models.mlp import MLP
from gradtune.runtime.errors import GradtuneError

IN_MEMORY = "in-memory arrays (gradtune.sklearn): give --data"  # cfg.data of an estimator run: no file behind it


def run_config(**settings: Any) -> Config:
    """A Config for an in-memory fit: the loop's machinery that pays per step or writes files
    (checkpoints, progress, metrics rows per step, noise scale, plot) off; everything else is
    ``settings`` (Config field names), checked as a config file would be (GradtuneError)."""
    base: dict[str, Any] = dict(
        data=IN_MEMORY,
        standardize=False,  # scikit-learn's convention: scaling is the pipeline's job, coef_ in the user's units
        standardize_target=False,
        val_fraction=0.0,
        dtype="float64",
        precision="fp32",
        device="cpu",
        progress="off",
        plot=False,
        noise_scale=False,
        checkpoint_every=0,
        resume="never",
        distributed="none",
    )
    base.update(settings)
    cfg = Config(**base)
    check_combinations(cfg)
    return cfg


class OrderedRows(TensorDataset):
    """Rows served in their own order whatever the sampler draws (``shuffle=False``): the
    sampler's epoch-e order is ``epoch_order(n, seed, e)``, a pure function, so the batch it asks
    for as indices ``order[a:b]`` is served as rows ``a..b-1``. The epoch is counted from the rows
    served (every training step serves its batch exactly once; evaluation reads other sets)."""

    def __init__(self, batch: int, seed: int, **fields: torch.Tensor) -> None:
        super().__init__(**fields)
        self.batch, self.seed, self.served = batch, seed, 0
        self._inverse: dict[int, torch.Tensor] = {}

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        epoch = self.served // self.n
        self.served += int(idx.numel())
        if self.batch >= self.n:  # batch GD: the sampler does not shuffle
            return super().get(idx)
        if epoch not in self._inverse:
            order = epoch_order(self.n, self.seed, epoch)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(self.n)
            self._inverse = {epoch: inverse}  # one epoch at a time
        rows = self._inverse[epoch].index_select(0, idx)
        batch = super().get(rows)
        batch["sample_id"] = rows
        return batch


def make_model(cfg: Config, n_features: int, n_outputs: int) -> nn.Module:
    """``jobs.tabular.make_model``'s model (same seed, same weights on the CPU), float64, seeded
    through the CPU generator only: ``torch.manual_seed`` also seeds every lazily initialised
    accelerator backend and records a stack trace for each, most of a small fit's fixed cost."""
    torch.default_generator.manual_seed(cfg.seed)
    if cfg.model in ("linear", "logistic"):
        model: nn.Module = Linear(n_features, n_outputs)
    else:
        model = MLP(n_features, cfg.hidden, n_outputs, cfg.activation)
    return model.to(torch.float64)


def make_job(
    cfg: Config,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    n_classes: int,
    val_rows: Optional[torch.Tensor] = None,
    shuffle: bool = True,
) -> Job:
    """The Job of an estimator: ``x`` (N, F) float64, ``y`` (N,) float64 targets or long class
    ids; ``val_rows`` (V,) the rows held out for early stopping."""
    objective, loss, _ = objective_for(cfg, task, n_classes)
    info: dict[str, Any] = {"data": IN_MEMORY, "task": task, "loss": loss}
    val = None
    if val_rows is not None and len(val_rows):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[val_rows] = False
        val = TensorDataset(x=x[val_rows], y=y[val_rows])
        x, y = x[keep], y[keep]
        if task == "regression":
            info["val_var"] = val.fields["y"].double().var(unbiased=False).item()
    batch = len(y) if cfg.batch_size == "full" else int(cfg.batch_size)
    train = TensorDataset(x=x, y=y) if shuffle else OrderedRows(batch, cfg.seed, x=x, y=y)
    info["n_train"] = len(y)
    return Job(model, objective, train, val, task, info)


def resolve_lr(job: Job, cfg: Config, momentum: Any) -> Config:
    """``lr="auto"`` from the training loss's curvature (jobs/curvature.py): with ``momentum=
    "auto"`` Nesterov's optimal momentum where the smallest curvature is known (linear least
    squares, or alpha > 0), plain 1/L-type steps otherwise. Huber's Hessian is at most least
    squares' with the 1/2 convention (quadratic zone), so its lr is 1/L of that."""
    if cfg.lr != "auto":
        return dataclasses.replace(cfg, momentum=0.0 if momentum == "auto" else momentum)
    loss = job.info["loss"]
    if loss == "huber":
        c = curvature.curvature(dataclasses.replace(job, info={**job.info, "loss": "mse_half"}), cfg)
        mom = 0.0 if momentum == "auto" else momentum
        return dataclasses.replace(cfg, lr=float(f"{1 / c.L:.12g}"), momentum=mom)
    want_nesterov = momentum == "auto" and (loss in ("mse", "mse_half") or cfg.weight_decay > 0)
    trial = dataclasses.replace(cfg, momentum="auto" if want_nesterov else (0.0 if momentum == "auto" else momentum))
    try:
        resolved, info = curvature.resolve(job, trial)
    except GradtuneError:
        if not want_nesterov:
            raise
        # no mu > 0 after all (collinear features): plain steps
        resolved, info = curvature.resolve(job, dataclasses.replace(trial, momentum=0.0))
    if info is not None:
        job.info["lr_auto"] = info
    return resolved


def early_stopping(enabled: bool, patience: int, tol: float) -> EarlyStoppingSection:
    """scikit-learn's ``early_stopping``: the validation loss, ``n_iter_no_change`` evaluations
    (epochs) of patience, improvements under ``tol`` do not count; the best weights kept."""
    return EarlyStoppingSection(enabled=enabled, monitor="val_loss", patience=patience, min_delta=tol)


def guard(enabled: bool) -> GuardConfig:
    """The divergence guard checks each step's loss; the extra gradient norm per step is left
    out (a finite loss with a non-finite gradient does not happen in these models)."""
    return GuardConfig(enabled=enabled, check_grad=False)


class KeepOptimizer(Callback):
    """``partial_fit``: the optimizer state (momentum buffers, Adam moments and step counts)
    carried from one call to the next, in memory. The loop builds a fresh optimizer per ``fit``,
    so this puts the previous call's state in at the start and takes it out at the end."""

    def __init__(self, state: Optional[dict[str, Any]]) -> None:
        self.state, self.opt = state, None

    def on_train_begin(self, control: Control) -> None:
        self.opt = loop_optimizer(control)
        if self.state is not None:
            self.opt.load_state_dict(self.state)

    def on_train_end(self, result: Any) -> None:
        if self.opt is not None:
            self.state = self.opt.state_dict()


def loop_optimizer(control: Control) -> torch.optim.Optimizer:
    """The running loop's optimizer (``Control.optimizer``); refuses loudly rather than silently
    drop the state partial_fit must carry."""
    if not isinstance(control.optimizer, torch.optim.Optimizer):
        raise RuntimeError("gradtune.sklearn: the loop gave its callbacks no optimizer")
    return control.optimizer


@dataclasses.dataclass
class Fitted:
    steps: int
    epochs: int
    stop_reason: str
    loss_curve: list[float]  # the training loss of each evaluation (once per epoch)
    val_curve: list[float]  # the validation loss of each evaluation (early stopping)
    optimizer_state: Optional[dict[str, Any]]
    result: Result


def run(
    job: Job,
    cfg: Config,
    out_dir: Optional[Path] = None,
    optimizer_state: Optional[dict[str, Any]] = None,
    keep_state: bool = False,
) -> Fitted:
    """One ``fit`` of the loop in memory (``out_dir``: also its metrics.jsonl and checkpoints)."""
    keeper = KeepOptimizer(optimizer_state) if keep_state or optimizer_state is not None else None
    result = fit(job, cfg, out_dir, callbacks=[keeper] if keeper else None)
    evals = [r for r in result.history if r.get("kind") == "eval"]
    return Fitted(
        result.steps,
        max(1, math.ceil(result.epochs - 1e-9)),
        result.stop_reason,
        [float(r["loss"]) for r in evals],
        [float(r["val_loss"]) for r in evals if "val_loss" in r],
        keeper.state if keeper else None,
        result,
    )
